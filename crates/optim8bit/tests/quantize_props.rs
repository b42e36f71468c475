//! Properties of block-wise quantization with the dynamic maps, for tensors of any length and
//! blocks of any size (ragged last blocks included).
//!
//! For every element `x` of a block with scale `absmax`, dequantize(quantize(x)) = `x̃` satisfies:
//! - `|x̃ − x| ≤ ½ · (local code spacing) · absmax`, the spacing of the two codes around `x/absmax`
//!   (plus float32 rounding of `x/absmax`); the one exception is the sign rule of the signed map:
//!   a negative `x` in the half-interval next to 0.0 goes to the smallest negative code instead of
//!   0.0, which is within one spacing;
//! - signs are kept: `x̃ · x ≥ 0`, and negative values stay negative with the signed map;
//! - zero maps to zero.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failing loudly is the point

use optim8bit::quantize::{QuantMap, block_count, dequantize_blockwise, quantize_blockwise};
use proptest::prelude::*;
use tch::{Device, Tensor};

/// Values over ten decades, with signs and exact zeros, so blocks mix tiny and large entries.
fn value() -> impl Strategy<Value = f32> {
    prop_oneof![
        1 => Just(0.0f32),
        12 => (any::<bool>(), 1.0f32..10.0, -8i32..3).prop_map(|(negative, mantissa, exponent)| {
            let magnitude = mantissa * 10f32.powi(exponent);
            if negative { -magnitude } else { magnitude }
        }),
    ]
}

fn check(values: &[f32], block_size: i64, signed: bool) -> Result<(), TestCaseError> {
    tch::set_num_threads(1); // small tensors: threads only add overhead on a shared machine
    let map = if signed {
        QuantMap::signed(Device::Cpu)
    } else {
        QuantMap::unsigned(Device::Cpu)
    }
    .unwrap();
    let code: Vec<f64> = Vec::<f32>::try_from(map.code())
        .unwrap()
        .into_iter()
        .map(f64::from)
        .collect();
    let input = Tensor::from_slice(values);
    let quantized = quantize_blockwise(&input, &map, block_size).unwrap();
    prop_assert_eq!(quantized.codes.size(), input.size());
    prop_assert_eq!(
        quantized.absmax.size(),
        vec![block_count(values.len() as i64, block_size)]
    );
    let restored = Vec::<f32>::try_from(
        dequantize_blockwise(&quantized.codes, &quantized.absmax, &map, block_size).unwrap(),
    )
    .unwrap();
    let absmax = Vec::<f32>::try_from(&quantized.absmax).unwrap();

    for (index, (&x, &back)) in values.iter().zip(&restored).enumerate() {
        let scale = f64::from(absmax[index / block_size as usize]);
        let (x, back) = (f64::from(x), f64::from(back));
        if x == 0.0 {
            prop_assert_eq!(back, 0.0, "zero at {} came back as {}", index, back);
            continue;
        }
        prop_assert!(
            back * x >= 0.0,
            "sign of {} flipped to {} at {}",
            x,
            back,
            index
        );
        if signed && x < 0.0 {
            prop_assert!(back < 0.0, "negative {} became {} at {}", x, back, index);
        }
        let normalized = x / scale;
        let lower = code
            .partition_point(|&c| c <= normalized)
            .saturating_sub(1)
            .min(254);
        let spacing = code[lower + 1] - code[lower];
        let next_to_zero = signed && x < 0.0 && code[lower + 1] == 0.0;
        let allowed = if next_to_zero { spacing } else { spacing / 2.0 };
        // float32 rounding of x/absmax and of code·absmax.
        let slack = 2.0 * f64::from(f32::EPSILON) * scale;
        prop_assert!(
            (back - x).abs() <= allowed * scale + slack,
            "{} → {} at {}: error {:e} > {:e} (absmax {})",
            x,
            back,
            index,
            (back - x).abs(),
            allowed * scale + slack,
            scale
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn signed_roundtrip_error_is_bounded(values in prop::collection::vec(value(), 1..1500), block_size in 1i64..600) {
        check(&values, block_size, true)?;
    }

    #[test]
    fn unsigned_roundtrip_error_is_bounded(values in prop::collection::vec(value().prop_map(f32::abs), 1..1500), block_size in 1i64..600) {
        check(&values, block_size, false)?;
    }

    #[test]
    fn optimizer_block_size_with_ragged_tail(values in prop::collection::vec(value(), 257..1300)) {
        check(&values, 256, true)?;
    }
}
