//! The dynamic 8-bit data type and block-wise quantization of optimizer states.
//!
//! Follows bitsandbytes 0.50: `create_dynamic_map` and `quantize_blockwise` /
//! `dequantize_blockwise` in `bitsandbytes/functional.py`, with the rounding of the CUDA kernel
//! `kOptimizerStatic8bit2StateBlockwise` (`csrc/kernels.cu`, `quantize_2D`): every value goes to
//! the nearest of the 256 codes, and a first-moment value never changes sign.
//!
//! A tensor is cut into blocks of [`BLOCK_SIZE`] consecutive elements of its flattened form (the
//! last block may be shorter). Each block stores one fp32 `absmax`, and each element the index of
//! the code nearest to `value / absmax`. Everything is tensor operations, on whatever device the
//! input lives on.
//!
//! The optimizers use it internally; it is public as bitsandbytes' `functional` is, for code that
//! stores or inspects 8-bit states itself:
//!
//! ```
//! use optim8bit::quantize::{BLOCK_SIZE, QuantMap, dequantize_blockwise, quantize_blockwise};
//! use tch::{Device, Kind, Tensor};
//!
//! let map = QuantMap::signed(Device::Cpu)?;
//! let values = Tensor::randn([1000], (Kind::Float, Device::Cpu));
//! let q = quantize_blockwise(&values, &map, BLOCK_SIZE)?;
//! assert_eq!(q.absmax.size(), [4]); // ceil(1000 / 256) blocks
//! let back = dequantize_blockwise(&q.codes, &q.absmax, &map, BLOCK_SIZE)?;
//! let worst = (&back - &values).abs().max().double_value(&[]);
//! assert!(worst < 0.05 * values.abs().max().double_value(&[]));
//! # Ok::<(), optim8bit::Error>(())
//! ```

use tch::{Device, Kind, Tensor};

use crate::{Error, Result};

/// Elements per quantization block in bitsandbytes' 8-bit optimizers since 0.44.
pub const BLOCK_SIZE: i64 = 256;

/// Entries in an 8-bit code.
pub const CODE_LEN: i64 = 256;

/// A sorted 256-entry code of the dynamic data type, with the midpoints that decide rounding.
#[derive(Debug)]
pub struct QuantMap {
    code: Tensor,
    midpoints: Tensor,
    signed: bool,
    /// Fast exact rounding for maps whose midpoints are far enough apart (the dynamic maps are).
    rounding: Option<RoundingTable>,
    /// Index of the code 0.0 of a signed map, when it has one (the dynamic map: 127).
    zero_index: Option<i64>,
}

/// Float32 mantissa bits that, with sign and exponent, index the rounding table.
const TABLE_MANTISSA_BITS: i64 = 8;
/// Right shift from a float32's bits to its bucket.
const TABLE_SHIFT: i64 = 23 - TABLE_MANTISSA_BITS;
/// Buckets: every float32 with the same sign, exponent and top mantissa bits shares one.
const TABLE_BUCKETS: i64 = 1 << (32 - TABLE_SHIFT);

/// Nearest-code lookup by the bits of a float32, in place of a binary search per element
/// (on the CPU libtorch's `bucketize` is much slower than a gather).
///
/// Each bucket spans a relative width of at most 2⁻⁸, narrower than the closest pair of midpoints
/// of the dynamic maps (0.7 % apart relative to their value), so it holds at most one midpoint:
/// the index of a value is the bucket's `base` plus one if the value lies above the bucket's
/// `threshold` (that midpoint, or +inf). This gives exactly the count of midpoints below the value,
/// the rule of `bucketize` and of the CUDA kernel's search.
#[derive(Debug)]
struct RoundingTable {
    base: Tensor,
    threshold: Tensor,
}

impl RoundingTable {
    /// The table for `midpoints`, or `None` when some finite bucket holds two midpoints.
    fn new(midpoints: &Tensor) -> Result<Option<Self>> {
        let cpu = (Kind::Int64, Device::Cpu);
        let ids = Tensor::f_arange(TABLE_BUCKETS, cpu)?;
        let negative = ids.f_ge(TABLE_BUCKETS / 2)?;
        // The lowest and highest bit patterns of each bucket as int32 values (sign bit included).
        let low_bits = ids
            .f_mul_scalar(1i64 << TABLE_SHIFT)?
            .f_sub(&negative.f_to_kind(Kind::Int64)?.f_mul_scalar(1i64 << 32)?)?;
        let high_bits = low_bits.f_add_scalar((1i64 << TABLE_SHIFT) - 1)?;
        let as_float = |bits: &Tensor| -> Result<Tensor> {
            Ok(bits.f_to_kind(Kind::Int)?.f_view_dtype(Kind::Float)?)
        };
        let (low_float, high_float) = (as_float(&low_bits)?, as_float(&high_bits)?);
        // For negative floats a larger bit pattern is a smaller number.
        let lowest = low_float.f_where_self(&negative.f_logical_not()?, &high_float)?;
        let highest = high_float.f_where_self(&negative.f_logical_not()?, &low_float)?;
        let below_lowest = lowest.f_bucketize(midpoints, false, false)?;
        let below_highest = highest.f_bucketize(midpoints, false, false)?;
        let inside = below_highest.f_sub(&below_lowest)?;
        let finite = lowest.f_isfinite()?.f_logical_and(&highest.f_isfinite()?)?;
        let crowded = inside
            .f_gt(1)?
            .f_logical_and(&finite)?
            .f_any()?
            .f_int64_value(&[])?
            != 0;
        if crowded {
            return Ok(None);
        }
        let last = midpoints.size1()? - 1;
        let candidate = midpoints.f_index_select(0, &below_lowest.f_clamp_max(last)?)?;
        let threshold = candidate.f_masked_fill(&inside.f_eq(0)?, f64::INFINITY)?;
        Ok(Some(Self {
            base: below_lowest,
            threshold,
        }))
    }

    fn to_device(&self, device: Device) -> Result<Self> {
        Ok(Self {
            base: self.base.f_to_device(device)?,
            threshold: self.threshold.f_to_device(device)?,
        })
    }

    /// Number of midpoints below each value of a float32 tensor, int64, same shape.
    fn count_below(&self, values: &Tensor) -> Result<Tensor> {
        let bits = values.f_contiguous()?.f_view_dtype(Kind::Int)?;
        let bucket = bits
            .f_bitwise_right_shift_tensor_scalar(TABLE_SHIFT)?
            .f_bitwise_and(TABLE_BUCKETS - 1)?;
        let flat = bucket.f_reshape([-1])?;
        let base = self.base.f_index_select(0, &flat)?.f_view_(values.size())?;
        let threshold = self
            .threshold
            .f_index_select(0, &flat)?
            .f_view_(values.size())?;
        Ok(base.f_add(&values.f_gt_tensor(&threshold)?)?)
    }
}

impl QuantMap {
    /// The signed dynamic map (bitsandbytes `create_dynamic_map(signed=True)`), used for Adam's
    /// first moment: 127 negative values, 0 at index 127, 128 positive values up to 1.
    pub fn signed(device: Device) -> Result<Self> {
        Self::dynamic(true, device)
    }

    /// The unsigned dynamic map (`create_dynamic_map(signed=False)`), used for Adam's second
    /// moment: 0 at index 0 and 255 positive values up to 1.
    pub fn unsigned(device: Device) -> Result<Self> {
        Self::dynamic(false, device)
    }

    /// Builds the map as bitsandbytes' `create_dynamic_map` does, in scalar float32 arithmetic so
    /// that every CPU gets the same bits.
    ///
    /// The exponent `e` runs over 0..7; for each, the midpoints of `linspace(0.1, 1, K + 1)`
    /// scaled by `10^(e - 6)` are added, where `K = 2^e` for the signed map (each value also
    /// negated) and `K = 2^(e + 1)` for the unsigned one. Then 0 and 1 are added and all sorted.
    /// bitsandbytes takes `linspace` from PyTorch, whose CPU kernels give other last bits with and
    /// without AVX2; [`torch_cuda::portable::linspace`] is the AVX2 kernels' arithmetic, of which
    /// the map on every machine with AVX2 (and on the GPU machines) is made (docs/NUMERICS.md).
    fn dynamic(signed: bool, device: Device) -> Result<Self> {
        // 10^(e − 6) as the Python float bitsandbytes multiplies by, rounded to float32 by PyTorch.
        const SCALES: [f64; 7] = [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0];
        let mut code = vec![0f32, 1.0];
        for (exponent, scale) in SCALES.iter().enumerate() {
            let fraction_items = if signed {
                (1 << exponent) + 1
            } else {
                (1 << (exponent + 1)) + 1
            };
            // PyTorch rounds the Python float 0.1 to float32.
            let bounds = torch_cuda::portable::linspace(0.1f64 as f32, 1.0, fraction_items);
            for pair in bounds.windows(2) {
                let mean = (pair[0] + pair[1]) / 2.0;
                code.push(mean * *scale as f32);
                if signed {
                    code.push(mean * -*scale as f32);
                }
            }
        }
        code.sort_by(f32::total_cmp);
        Self::from_code(Tensor::f_from_slice(&code)?.f_to_device(device)?, signed)
    }

    /// Wraps a sorted 256-entry float32 code. `signed` turns on the sign-keeping rule.
    pub fn from_code(code: Tensor, signed: bool) -> Result<Self> {
        let code = code.f_to_kind(Kind::Float)?.f_contiguous()?;
        let len = code.size1()?;
        if len != CODE_LEN {
            return Err(Error::Shape(format!(
                "an 8-bit code has {CODE_LEN} entries, got {len}"
            )));
        }
        let ascending = code
            .f_narrow(0, 1, CODE_LEN - 1)?
            .f_gt_tensor(&code.f_narrow(0, 0, CODE_LEN - 1)?)?;
        if ascending.f_all()?.f_int64_value(&[])? == 0 {
            return Err(Error::Shape(
                "an 8-bit code must be sorted strictly ascending".into(),
            ));
        }
        // A value exactly halfway between two codes goes to the lower one, as in the CUDA kernel's
        // upward search; the kernel computes the midpoint as (lower + upper) * 0.5 in fp32, like this.
        let midpoints = code
            .f_narrow(0, 0, CODE_LEN - 1)?
            .f_add(&code.f_narrow(0, 1, CODE_LEN - 1)?)?
            .f_mul_scalar(0.5)?;
        let rounding = RoundingTable::new(&midpoints.f_to_device(Device::Cpu)?)?
            .map(|table| table.to_device(code.device()))
            .transpose()?;
        let zero_index = {
            let zeros = code.f_eq(0.0)?;
            (zeros.f_any()?.f_int64_value(&[])? != 0)
                .then(|| {
                    zeros
                        .f_to_kind(Kind::Int64)?
                        .f_argmax(0, false)?
                        .f_int64_value(&[])
                })
                .transpose()?
        };
        Ok(Self {
            code,
            midpoints,
            signed,
            rounding,
            zero_index,
        })
    }

    /// The 256 code values, sorted ascending, float32.
    pub fn code(&self) -> &Tensor {
        &self.code
    }

    /// Whether the map holds negative values (and keeps signs when rounding).
    pub fn is_signed(&self) -> bool {
        self.signed
    }

    /// The same map on another device.
    pub fn to_device(&self, device: Device) -> Result<Self> {
        Ok(Self {
            code: self.code.f_to_device(device)?,
            midpoints: self.midpoints.f_to_device(device)?,
            signed: self.signed,
            rounding: self
                .rounding
                .as_ref()
                .map(|table| table.to_device(device))
                .transpose()?,
            zero_index: self.zero_index,
        })
    }

    /// Code indices (`int64`) of normalised values in [-1, 1].
    ///
    /// Nearest code; for a signed map, a value whose nearest code has the other sign (only
    /// possible next to zero: a tiny negative value rounds to 0.0, whose sign bit is clear) moves
    /// one code outward, as the CUDA kernel does, so a negative moment stays negative.
    pub(crate) fn nearest_indices(&self, normalized: &Tensor) -> Result<Tensor> {
        let normalized = normalized.f_to_kind(Kind::Float)?;
        let indices = match &self.rounding {
            Some(table) => table.count_below(&normalized)?,
            None => normalized.f_bucketize(&self.midpoints, false, false)?,
        };
        if !self.signed {
            return Ok(indices);
        }
        if let Some(zero) = self.zero_index {
            // With an exact 0.0 in the code only a negative value (or −0.0) rounding to 0.0 can
            // change sign: no negative code is nearer to a positive value than 0.0, and vice versa.
            let flipped = indices
                .f_eq(zero)?
                .f_logical_and(&normalized.f_signbit()?)?;
            return Ok(indices.f_sub(&flipped.f_to_kind(Kind::Int64)?)?);
        }
        let chosen = self.decode(&indices)?;
        let sign_flipped = chosen.f_signbit()?.f_ne_tensor(&normalized.f_signbit()?)?;
        let outward = normalized
            .f_gt(0.0)?
            .f_to_kind(Kind::Int64)?
            .f_mul_scalar(2)?
            .f_sub_scalar(1)?;
        Ok(indices.f_add(&outward.f_mul(&sign_flipped)?)?)
    }

    /// Code indices as stored (`uint8`).
    pub(crate) fn quantize_normalized(&self, normalized: &Tensor) -> Result<Tensor> {
        Ok(self.nearest_indices(normalized)?.f_to_kind(Kind::Uint8)?)
    }

    /// Code values of stored indices, float32, same shape.
    pub(crate) fn decode(&self, codes: &Tensor) -> Result<Tensor> {
        let flat = codes.f_reshape([-1])?.f_to_kind(Kind::Int)?;
        Ok(self.code.f_index_select(0, &flat)?.f_view_(codes.size())?)
    }

    /// Whether rounding uses the bit-indexed table (true for the dynamic maps) rather than a
    /// binary search.
    pub fn has_rounding_table(&self) -> bool {
        self.rounding.is_some()
    }
}

/// A tensor quantized block-wise: one code index per element and one absmax per block.
#[derive(Debug)]
pub struct Quantized {
    /// Code indices, `uint8`, the shape of the quantized tensor.
    pub codes: Tensor,
    /// Largest absolute value of each block, float32 `[ceil(numel / block_size)]`.
    pub absmax: Tensor,
}

/// Number of blocks of `block_size` needed for `numel` elements.
pub fn block_count(numel: i64, block_size: i64) -> i64 {
    (numel + block_size - 1) / block_size
}

/// The flattened tensor as `[blocks, block_size]`, the ragged last block filled with `fill`.
pub(crate) fn as_blocks(flat: &Tensor, block_size: i64, fill: f64) -> Result<Tensor> {
    let numel = flat.size1()?;
    let blocks = block_count(numel, block_size);
    let padding = blocks * block_size - numel;
    let padded = if padding == 0 {
        flat.shallow_clone()
    } else {
        let pad = Tensor::f_full([padding], fill, (flat.kind(), flat.device()))?;
        Tensor::f_cat(&[flat.shallow_clone(), pad], 0)?
    };
    Ok(padded.f_view([blocks, block_size])?)
}

/// `blocks / absmax` per block, with all-zero blocks (absmax 0) giving 0 instead of NaN.
///
/// # Shapes
/// `blocks` `[B, block]`, `absmax` `[B]` → `[B, block]`.
pub(crate) fn normalize(blocks: &Tensor, absmax: &Tensor) -> Result<Tensor> {
    let safe = absmax.f_masked_fill(&absmax.f_eq(0.0)?, 1.0)?;
    Ok(blocks.f_div(&safe.f_unsqueeze(1)?)?)
}

/// The values of block-wise codes, `code[c] · absmax[block]`, as the 8-bit optimizer kernels
/// dequantize their states.
///
/// # Shapes
/// `codes` `[B, block]` (`uint8`), `absmax` `[B]` → float32 `[B, block]`.
pub(crate) fn dequantize_blocks(map: &QuantMap, codes: &Tensor, absmax: &Tensor) -> Result<Tensor> {
    Ok(map.decode(codes)?.f_mul(&absmax.f_unsqueeze(1)?)?)
}

/// New block scales and nearest codes of updated states, as the 8-bit optimizer kernels requantize
/// them: `absmax` is each block's largest `|value|`, each code the nearest to `value / absmax`
/// (keeping the sign for a signed map).
///
/// # Shapes
/// `values` `[B, block]` float32 → (codes `uint8` `[B, block]`, absmax `[B]`).
pub(crate) fn requantize_blocks(map: &QuantMap, values: &Tensor) -> Result<(Tensor, Tensor)> {
    let absmax = values.f_abs()?.f_amax([1i64].as_slice(), false)?;
    let codes = map.quantize_normalized(&normalize(values, &absmax)?)?;
    Ok((codes, absmax))
}

/// Quantizes `values` block-wise to the nearest codes of `map` (see the module docs).
///
/// # Shapes
/// `values` any shape (float) → codes of the same shape, absmax `[ceil(numel / block_size)]`.
pub fn quantize_blockwise(values: &Tensor, map: &QuantMap, block_size: i64) -> Result<Quantized> {
    if block_size <= 0 {
        return Err(Error::InvalidBlockSize(block_size));
    }
    let numel = values.numel() as i64;
    let flat = values.f_to_kind(Kind::Float)?.f_reshape([numel])?;
    let (codes, absmax) = requantize_blocks(map, &as_blocks(&flat, block_size, 0.0)?)?;
    let codes = codes
        .f_reshape([-1])?
        .f_narrow(0, 0, numel)?
        .f_reshape(values.size())?;
    Ok(Quantized { codes, absmax })
}

/// Turns block-wise codes back into float32 values: `code[index] * absmax[block]`.
///
/// # Shapes
/// `codes` any shape (`uint8`), `absmax` `[ceil(numel / block_size)]` → float32, shape of `codes`.
pub fn dequantize_blockwise(
    codes: &Tensor,
    absmax: &Tensor,
    map: &QuantMap,
    block_size: i64,
) -> Result<Tensor> {
    if block_size <= 0 {
        return Err(Error::InvalidBlockSize(block_size));
    }
    let numel = codes.numel() as i64;
    let blocks = as_blocks(&codes.f_reshape([numel])?, block_size, 0.0)?;
    let expected = blocks.size()[0];
    if absmax.numel() as i64 != expected {
        return Err(Error::Shape(format!(
            "{numel} codes in blocks of {block_size} need {expected} absmax values, got {}",
            absmax.numel()
        )));
    }
    let values = map
        .decode(&blocks)?
        .f_mul(&absmax.f_to_kind(Kind::Float)?.f_reshape([expected, 1])?)?;
    Ok(values
        .f_reshape([-1])?
        .f_narrow(0, 0, numel)?
        .f_reshape(codes.size())?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn to_vec(t: &Tensor) -> Vec<f32> {
        Vec::<f32>::try_from(t.to_kind(Kind::Float).reshape([-1])).unwrap()
    }

    #[test]
    fn maps_have_the_documented_shape() {
        let signed = to_vec(QuantMap::signed(Device::Cpu).unwrap().code());
        assert_eq!(signed.len(), 256);
        assert_eq!(signed[127], 0.0);
        assert_eq!(signed[255], 1.0);
        assert!((signed[0] + 0.99297).abs() < 1e-5, "{}", signed[0]);
        assert!(signed.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(signed.iter().filter(|&&v| v < 0.0).count(), 127);
        assert!((signed[128] - 5.5e-7).abs() < 1e-8, "{}", signed[128]);

        let unsigned = to_vec(QuantMap::unsigned(Device::Cpu).unwrap().code());
        assert_eq!(unsigned.len(), 256);
        assert_eq!(unsigned[0], 0.0);
        assert_eq!(unsigned[255], 1.0);
        assert!(unsigned.windows(2).all(|w| w[0] < w[1]));
        assert!((unsigned[1] - 3.25e-7).abs() < 1e-8, "{}", unsigned[1]);
    }

    #[test]
    fn rounding_table_equals_binary_search() {
        for map in [
            QuantMap::signed(Device::Cpu).unwrap(),
            QuantMap::unsigned(Device::Cpu).unwrap(),
        ] {
            assert!(map.has_rounding_table());
            let code = map.code();
            let mids = &map.midpoints;
            let specials =
                Tensor::from_slice(&[0.0f32, -0.0, 1.0, -1.0, 1e-45, -1e-45, 1e-38, 3e-7, -3e-7]);
            let below = |t: &Tensor| {
                Tensor::from_slice(
                    &Vec::<f32>::try_from(t)
                        .unwrap()
                        .iter()
                        .map(|v| v.next_down())
                        .collect::<Vec<_>>(),
                )
            };
            let above = |t: &Tensor| {
                Tensor::from_slice(
                    &Vec::<f32>::try_from(t)
                        .unwrap()
                        .iter()
                        .map(|v| v.next_up())
                        .collect::<Vec<_>>(),
                )
            };
            let uniform = Tensor::rand([200_000], (Kind::Float, Device::Cpu)) * 2.0 - 1.0;
            let log_spread = Tensor::rand([200_000], (Kind::Float, Device::Cpu))
                .g_mul_scalar(-9.0 * std::f64::consts::LN_10)
                .exp()
                * (Tensor::rand([200_000], (Kind::Float, Device::Cpu)) - 0.5).sign();
            let values = Tensor::cat(
                &[
                    specials,
                    code.copy(),
                    mids.copy(),
                    below(mids),
                    above(mids),
                    below(code),
                    above(code),
                    uniform,
                    log_spread,
                ],
                0,
            )
            .clamp(-1.0, 1.0);
            let fast = map.rounding.as_ref().unwrap().count_below(&values).unwrap();
            let search = values.bucketize(mids, false, false);
            assert!(
                fast.equal(&search),
                "{} of {} differ",
                fast.ne_tensor(&search).sum(Kind::Int64).int64_value(&[]),
                values.numel()
            );
        }
    }

    #[test]
    fn tiny_negative_moment_keeps_its_sign() {
        let map = QuantMap::signed(Device::Cpu).unwrap();
        let x = Tensor::from_slice(&[-1e-9f32, 1e-9, 0.0, -1.0, 1.0]);
        let codes = Vec::<u8>::try_from(map.quantize_normalized(&x).unwrap()).unwrap();
        assert_eq!(codes, vec![126, 127, 127, 0, 255]);
    }

    #[test]
    fn ragged_roundtrip_and_bad_absmax() {
        let map = QuantMap::unsigned(Device::Cpu).unwrap();
        let x = Tensor::from_slice(&[0.5f32, 0.25, 0.0, 1.0, 2.0]).reshape([5]);
        let q = quantize_blockwise(&x, &map, 2).unwrap();
        assert_eq!(q.absmax.size(), vec![3]);
        assert_eq!(to_vec(&q.absmax), vec![0.5, 1.0, 2.0]);
        let back = dequantize_blockwise(&q.codes, &q.absmax, &map, 2).unwrap();
        assert_eq!(to_vec(&back), vec![0.5, to_vec(&back)[1], 0.0, 1.0, 2.0]);
        assert!(dequantize_blockwise(&q.codes, &q.absmax.narrow(0, 0, 2), &map, 2).is_err());
        assert!(matches!(
            quantize_blockwise(&x, &map, 0),
            Err(Error::InvalidBlockSize(0))
        ));
        assert!(QuantMap::from_code(map.code().flip([0]), false).is_err());
        assert!(QuantMap::from_code(map.code().narrow(0, 0, 255), false).is_err());
    }
}
