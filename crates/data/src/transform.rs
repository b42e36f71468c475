//! The per-step image transform: resize, random horizontal flip, centre or random crop, then scale to
//! `[-1, 1]`. The geometry follows one of two upstreams, chosen by the dataset's
//! [`Buckets`](crate::Buckets):
//!
//! - **diffusers' SDXL scripts** (`train_text_to_image_lora_sdxl.py`, `preprocess_train`; the square
//!   mode, [`place`]): resize with antialiasing so the image covers the target, the long side
//!   truncated as torchvision's `Resize(int)` does; flip; crop (centre offsets rounded half to even).
//!   The crop's top-left corner is reported in the coordinates of the resized, already flipped image.
//! - **kohya's sd-scripts** (buckets, [`place_kohya`]): resize to the bucket's `resized_size` (each
//!   side `int(x + 0.5)`), crop (centre offsets `spare // 2`, or uniform in `0..=spare`), then flip, as
//!   `trim_and_resize_if_required` and `__getitem__` do. The corner reported for SDXL is kohya's
//!   ([`kohya_crop_top_left`]), not the crop taken.
//!
//! SDXL conditions on the original size, that corner and the target size
//! (`add_time_ids = original_size + crop_top_left + target_size`). Both modes resample with the
//! antialiased bilinear filter of [`apply`] (kohya resizes with OpenCV's `INTER_AREA` when shrinking
//! and PIL's Lanczos when enlarging: the sizes are kohya's, the pixels are not bit-identical).

use std::borrow::Cow;

use fast_image_resize::images::{Image, ImageRef};
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use image::RgbImage;
use tch::Tensor;

use crate::bucket::{Assignment, kohya_crop_top_left};
use crate::record::Origin;
use crate::rng::Rng;
use crate::{Error, Result};

/// Where the crop is taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CropMode {
    /// The middle (square mode: torchvision's `CenterCrop`, offsets rounded half to even as Python's
    /// `round`; buckets: kohya's `spare // 2`).
    Center,
    /// Uniformly anywhere inside the resized image, drawn anew each step (kohya's `random_crop`).
    Random,
}

/// The transform's options.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct TransformConfig {
    /// Centre or random crop.
    pub crop: CropMode,
    /// Flip horizontally with probability ½, drawn anew each step.
    pub random_flip: bool,
    /// Let images smaller than their target be enlarged in the square mode; off by default, where
    /// they are errors. kohya's buckets enlarge as kohya does, unless `--bucket_no_upscale`.
    pub allow_upscale: bool,
    /// The most pixels an image may have, as decoded (checked from its header, before decoding)
    /// and as resized to cover its target; [`MAX_PIXELS`] (PIL's limit) by default. Like PIL's
    /// `Image.MAX_IMAGE_PIXELS`, it bounds the memory and time one image can take.
    pub max_pixels: u64,
}

/// Builder-style setters: the struct is `#[non_exhaustive]`, so outside this crate it is changed
/// from [`Default`] (or a named constructor) by these.
impl TransformConfig {
    /// Sets [`TransformConfig::crop`].
    #[must_use]
    pub fn with_crop(mut self, crop: CropMode) -> Self {
        self.crop = crop;
        self
    }

    /// Sets [`TransformConfig::random_flip`].
    #[must_use]
    pub fn with_random_flip(mut self, random_flip: bool) -> Self {
        self.random_flip = random_flip;
        self
    }

    /// Sets [`TransformConfig::allow_upscale`].
    #[must_use]
    pub fn with_allow_upscale(mut self, allow_upscale: bool) -> Self {
        self.allow_upscale = allow_upscale;
        self
    }

    /// Sets [`TransformConfig::max_pixels`].
    #[must_use]
    pub fn with_max_pixels(mut self, max_pixels: u64) -> Self {
        self.max_pixels = max_pixels;
        self
    }
}

impl Default for TransformConfig {
    fn default() -> Self {
        Self {
            crop: CropMode::Center,
            random_flip: false,
            allow_upscale: false,
            max_pixels: MAX_PIXELS,
        }
    }
}

/// The geometric decisions for one sample at one step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    /// Size `(width, height)` after resizing.
    pub resized: (u32, u32),
    /// Whether the resized image was mirrored left-right.
    pub flipped: bool,
    /// The crop's top-left corner `(top, left)` in the resized, flipped image.
    pub crop_top_left: (u32, u32),
    /// The crop's size `(width, height)`, the bucket's size.
    pub target: (u32, u32),
    /// The corner `(top, left)` reported to SDXL as `crops_coords_top_left`: `crop_top_left` in the
    /// square (diffusers) mode, kohya's letterbox corner with buckets (which may be `-1`).
    pub reported_crop_top_left: (i32, i32),
}

/// The most pixels an image may have by default ([`TransformConfig::max_pixels`]), decoded or
/// resized: PIL's limit (`Image.open` refuses more
/// than twice `Image.MAX_IMAGE_PIXELS` = 89,478,485 as a decompression bomb), which is also what the
/// `image` crate's default allocation limit of 512 MiB holds in 8-bit RGB.
pub const MAX_PIXELS: u64 = 178_956_970;

/// The size `(width, height)` to which a `width × height` image is resized to cover `target`:
/// the binding side becomes the target's, the other keeps the aspect ratio, truncated as torchvision's
/// `Resize(int)` does (`int(short_target * long / short)`), never below the target.
pub fn covering_size(width: u32, height: u32, target: (u32, u32)) -> (u32, u32) {
    let (target_w, target_h) = target;
    let (w, h, tw, th) = (
        u64::from(width),
        u64::from(height),
        u64::from(target_w),
        u64::from(target_h),
    );
    if w * th <= h * tw {
        // Relatively narrower than the target: the width binds.
        let new_h = (h * tw / w.max(1)).max(th);
        (target_w, u32::try_from(new_h).unwrap_or(u32::MAX))
    } else {
        let new_w = (w * th / h.max(1)).max(tw);
        (u32::try_from(new_w).unwrap_or(u32::MAX), target_h)
    }
}

/// Checks that a `width × height` image may be brought to `target` under `config`.
pub fn check_size(
    width: u32,
    height: u32,
    target: (u32, u32),
    config: &TransformConfig,
    origin: &Origin,
) -> Result<()> {
    if config.allow_upscale || (width >= target.0 && height >= target.1) {
        Ok(())
    } else {
        Err(Error::ImageTooSmall {
            origin: origin.clone(),
            width,
            height,
            crop_width: target.0,
            crop_height: target.1,
        })
    }
}

/// Draws the flip and crop for one sample. The flip is drawn first, as diffusers does.
pub fn place(
    width: u32,
    height: u32,
    target: (u32, u32),
    config: &TransformConfig,
    rng: &mut Rng,
) -> Placement {
    let resized = covering_size(width, height, target);
    let flipped = config.random_flip && rng.chance(0.5);
    let (spare_w, spare_h) = (resized.0 - target.0, resized.1 - target.1);
    let crop_top_left = match config.crop {
        CropMode::Center => (half_rounded_even(spare_h), half_rounded_even(spare_w)),
        CropMode::Random => {
            let top = rng.below_or_equal(u64::from(spare_h)) as u32;
            let left = rng.below_or_equal(u64::from(spare_w)) as u32;
            (top, left)
        }
    };
    Placement {
        resized,
        flipped,
        crop_top_left,
        target,
        reported_crop_top_left: signed(crop_top_left),
    }
}

/// Draws the flip and crop for one sample the way kohya's dataset does: the flip first, then the
/// crop of `assignment.resized` to `assignment.bucket`. `original` is the image's size `(width,
/// height)`.
pub fn place_kohya(
    original: (u32, u32),
    assignment: Assignment,
    config: &TransformConfig,
    rng: &mut Rng,
) -> Placement {
    let flipped = config.random_flip && rng.chance(0.5);
    kohya_placement(original, assignment, flipped, config.crop, rng)
}

/// kohya's crop of a resized image into its bucket (`trim_and_resize_if_required`: the width's
/// offset, then the height's, each `spare // 2` or uniform in `0..=spare`), then the flip, and the
/// corner reported for SDXL. `rng` is drawn from only for a random crop.
pub fn kohya_placement(
    original: (u32, u32),
    assignment: Assignment,
    flipped: bool,
    crop: CropMode,
    rng: &mut Rng,
) -> Placement {
    let Assignment { bucket, resized } = assignment;
    let (spare_w, spare_h) = (
        resized.0.saturating_sub(bucket.0),
        resized.1.saturating_sub(bucket.1),
    );
    let mut offset = |spare: u32| match crop {
        CropMode::Center => spare / 2,
        CropMode::Random => rng.below_or_equal(u64::from(spare)) as u32,
    };
    let left = offset(spare_w);
    let top = offset(spare_h);
    // kohya crops, then flips: in the flipped image the window starts at the mirrored offset.
    let left = if flipped { spare_w - left } else { left };
    Placement {
        resized,
        flipped,
        crop_top_left: (top, left),
        target: bucket,
        reported_crop_top_left: kohya_crop_top_left(bucket, original, flipped),
    }
}

/// A corner as signed numbers (a crop inside an image of at most `i32::MAX` pixels a side).
fn signed((top, left): (u32, u32)) -> (i32, i32) {
    let convert = |x: u32| i32::try_from(x).unwrap_or(i32::MAX);
    (convert(top), convert(left))
}

/// `round(n / 2)` with ties to even, like Python's `round` in torchvision's `center_crop`.
fn half_rounded_even(n: u32) -> u32 {
    (f64::from(n) / 2.0).round_ties_even() as u32
}

/// Decodes PNG, JPEG or WebP bytes to 8-bit RGB (alpha dropped, greyscale expanded), like PIL's
/// `convert("RGB")` in the diffusers scripts. An image of more than `max_pixels` pixels is refused
/// from its header, before it is decoded (PIL's `DecompressionBombError`).
pub fn decode(bytes: &[u8], origin: &Origin, max_pixels: u64) -> Result<RgbImage> {
    let undecodable = |source| Error::Undecodable {
        origin: origin.clone(),
        source,
    };
    let reader = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| undecodable(image::ImageError::IoError(e)))?;
    let truncated = match reader.format() {
        Some(image::ImageFormat::Jpeg) => !jpeg_is_complete(bytes),
        Some(image::ImageFormat::WebP) => !webp_is_complete(bytes),
        _ => false,
    };
    if reader.format() == Some(image::ImageFormat::Png) && !png_palette_is_whole(bytes) {
        return Err(undecodable(image::ImageError::Decoding(
            image::error::DecodingError::new(
                image::ImageFormat::Png.into(),
                "its palette (PLTE chunk) is not a whole number of RGB entries",
            ),
        )));
    }
    if let (true, Some(format)) = (truncated, reader.format()) {
        return Err(undecodable(image::ImageError::Decoding(
            image::error::DecodingError::new(
                format.into(),
                "the file is truncated: its data ends before the end its header announces (PIL refuses it too)",
            ),
        )));
    }
    // The header alone, by a second reader over the same bytes.
    let (width, height) = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| undecodable(image::ImageError::IoError(e)))?
        .into_dimensions()
        .map_err(undecodable)?;
    if u64::from(width) * u64::from(height) > max_pixels {
        return Err(Error::TooManyPixels {
            origin: origin.clone(),
            width,
            height,
            max: max_pixels,
        });
    }
    let image = reader.decode().map_err(undecodable)?;
    Ok(image.into_rgb8())
}

/// Whether the palette chunks (`PLTE`) of PNG `bytes` hold whole RGB entries (a length that is a
/// multiple of 3, as the PNG specification requires). The `png` crate (0.18.1) panics on a
/// palette image whose palette is not (found by the `image` fuzz target, docs/RELIABILITY.md).
/// Chunks are walked by their lengths up to the image data; malformed chunks are left to the
/// decoder.
fn png_palette_is_whole(bytes: &[u8]) -> bool {
    let mut i = 8; // the signature
    while let (Some(&[a, b, c, d]), Some(kind)) = (bytes.get(i..i + 4), bytes.get(i + 4..i + 8)) {
        let length = u32::from_be_bytes([a, b, c, d]) as usize;
        match kind {
            b"PLTE" if !length.is_multiple_of(3) => return false,
            b"IDAT" | b"IEND" => return true,
            _ => {}
        }
        i = i.saturating_add(12).saturating_add(length);
    }
    true
}

/// Whether WebP `bytes` are as long as their RIFF header says (the decoder reads a VP8L image cut
/// by a few bytes without complaint; PIL refuses it).
fn webp_is_complete(bytes: &[u8]) -> bool {
    match bytes.get(4..8) {
        Some(&[a, b, c, d]) => {
            bytes.len() as u64 >= u64::from(u32::from_le_bytes([a, b, c, d])) + 8
        }
        _ => false,
    }
}

/// Whether JPEG `bytes` hold an end-of-image marker (`FF D9`) after their first scan.
///
/// The JPEG decoder fills the rest of an image whose data stops early with grey and reports
/// nothing; PIL refuses such a file ("image file is truncated"), also one that lacks only its
/// final marker. The segments before the first scan are walked by their lengths (an EXIF
/// thumbnail's own markers lie inside them); in the scan data a `FF` byte is always followed by
/// `00` or a restart marker, so `FF D9` after it is the real end. Bytes that do not start as a
/// JPEG are left to the decoder.
fn jpeg_is_complete(bytes: &[u8]) -> bool {
    if bytes.get(..2) != Some(&[0xFF, 0xD8][..]) {
        return true;
    }
    let mut i = 2;
    loop {
        // A marker: one or more FF, then its code.
        while bytes.get(i) == Some(&0xFF) {
            i += 1;
        }
        let Some(&code) = bytes.get(i) else {
            return false;
        };
        i += 1;
        match code {
            // The end before any scan: the decoder reports what is missing.
            0xD9 => return true,
            // Markers without a length.
            0x01 | 0xD0..=0xD7 => {}
            0xDA => return bytes[i..].windows(2).any(|w| w == [0xFF, 0xD9]),
            _ => match bytes.get(i..i + 2) {
                Some(&[high, low]) => i += usize::from(u16::from_be_bytes([high, low])),
                _ => return false,
            },
        }
    }
}

/// Applies `placement` to an image: antialiased bilinear resize to 8 bits (PIL's
/// `Image.resize(size, BILINEAR)`, which the diffusers scripts' `transforms.Resize` runs on PIL
/// images: a triangle filter widened by the downscale factor), flip, crop, and scaling to `[-1, 1]`.
///
/// The result is plain memory: the loader's workers never call into libtorch, whose intra-op pool
/// they would oversubscribe; the consumer makes one tensor per batch.
pub fn apply(image: &RgbImage, placement: &Placement) -> Result<Pixels> {
    let (width, height) = image.dimensions();
    let (resized_w, resized_h) = placement.resized;
    let (target_w, target_h) = placement.target;
    let (top, left) = placement.crop_top_left;
    let resized: Cow<'_, [u8]> = if (resized_w, resized_h) == (width, height) {
        Cow::Borrowed(image.as_raw())
    } else {
        let source = ImageRef::new(width, height, image.as_raw(), PixelType::U8x3)?;
        let mut target = Image::new(resized_w, resized_h, PixelType::U8x3);
        let bilinear =
            ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Bilinear));
        Resizer::new().resize(&source, &mut target, &bilinear)?;
        Cow::Owned(target.into_vec())
    };
    // Cropping the flipped image at `left` is flipping the crop taken at the mirrored offset.
    let unflipped_left = if placement.flipped {
        resized_w - target_w - left
    } else {
        left
    };
    // Crop, flip, HWC -> CHW and scaling in one pass.
    let (target_w, target_h, row_len) =
        (target_w as usize, target_h as usize, resized_w as usize * 3);
    let mut chw = vec![0f32; 3 * target_h * target_w];
    let (plane, top, left) = (target_h * target_w, top as usize, unflipped_left as usize);
    for y in 0..target_h {
        let row = &resized[(top + y) * row_len + left * 3..][..target_w * 3];
        for x in 0..target_w {
            let source_x = if placement.flipped {
                target_w - 1 - x
            } else {
                x
            };
            for c in 0..3 {
                chw[c * plane + y * target_w + x] = f32::from(row[source_x * 3 + c]) / 127.5 - 1.0;
            }
        }
    }
    Ok(Pixels {
        data: chw,
        height: placement.target.1,
        width: placement.target.0,
    })
}

/// An image as `[3, height, width]` float32 values in `[-1, 1]`, channel-major, in plain memory.
#[derive(Debug, Clone, PartialEq)]
pub struct Pixels {
    data: Vec<f32>,
    height: u32,
    width: u32,
}

impl Pixels {
    /// The values, channel-major (`[3, height, width]`).
    pub fn data(&self) -> &[f32] {
        &self.data
    }

    /// Height in pixels.
    pub fn height(&self) -> u32 {
        self.height
    }

    /// Width in pixels.
    pub fn width(&self) -> u32 {
        self.width
    }

    /// A CPU tensor holding a copy.
    ///
    /// # Shapes
    /// `[3, height, width]`, float32.
    pub fn to_tensor(&self) -> Result<Tensor> {
        Ok(Tensor::f_from_slice(&self.data)?.f_view([
            3,
            i64::from(self.height),
            i64::from(self.width),
        ])?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn covering_size_follows_torchvision_for_squares() {
        // torchvision Resize(512) on 1000x750 (w x h): short side 750 -> 512, long int(512*1000/750)=682.
        assert_eq!(covering_size(1000, 750, (512, 512)), (682, 512));
        assert_eq!(covering_size(750, 1000, (512, 512)), (512, 682));
        assert_eq!(covering_size(64, 64, (32, 32)), (32, 32));
        // A bucket wider than the image's aspect: the width binds.
        assert_eq!(covering_size(100, 100, (64, 32)), (64, 64));
    }

    #[test]
    fn centre_crop_rounds_like_python() {
        let config = TransformConfig::default();
        let mut rng = Rng::keyed(0, &[]);
        // 35 spare rows: round(17.5) = 18; 33 spare: round(16.5) = 16.
        assert_eq!(
            place(32, 67, (32, 32), &config, &mut rng).crop_top_left,
            (18, 0)
        );
        assert_eq!(
            place(65, 32, (32, 32), &config, &mut rng).crop_top_left,
            (0, 16)
        );
    }

    #[test]
    fn truncated_jpegs_are_refused_and_complete_ones_decoded() {
        use image::ImageEncoder;
        let mut image = RgbImage::new(40, 24);
        for (x, y, p) in image.enumerate_pixels_mut() {
            *p = image::Rgb([(x * 6) as u8, (y * 10) as u8, ((x + y) * 3) as u8]);
        }
        let mut jpeg = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 90)
            .encode_image(&image)
            .unwrap();
        let origin = Origin::File(std::path::PathBuf::from("cut.jpg"));
        assert!(jpeg_is_complete(&jpeg));
        assert_eq!(
            decode(&jpeg, &origin, MAX_PIXELS).unwrap().dimensions(),
            (40, 24)
        );
        // Trailing bytes after the end marker are accepted, as PIL accepts them.
        let mut trailing = jpeg.clone();
        trailing.extend_from_slice(b"trailer");
        decode(&trailing, &origin, MAX_PIXELS).unwrap();
        let mut webp = Vec::new();
        image::codecs::webp::WebPEncoder::new_lossless(&mut webp)
            .encode(image.as_raw(), 40, 24, image::ExtendedColorType::Rgb8)
            .unwrap();
        assert_eq!(
            decode(&webp, &origin, MAX_PIXELS).unwrap().dimensions(),
            (40, 24)
        );
        let message = decode(&webp[..webp.len() - 2], &origin, MAX_PIXELS)
            .unwrap_err()
            .to_string();
        assert!(message.contains("truncated"), "{message}");
        // A PNG cut short: the decoder itself refuses it.
        let mut png = Vec::new();
        image::codecs::png::PngEncoder::new(&mut png)
            .write_image(image.as_raw(), 40, 24, image::ExtendedColorType::Rgb8)
            .unwrap();
        decode(&png, &origin, MAX_PIXELS).unwrap();
        decode(&png[..png.len() / 2], &origin, MAX_PIXELS).unwrap_err();
        for cut in [jpeg.len() / 2, jpeg.len() - 2, jpeg.len() - 10, 200] {
            let message = decode(&jpeg[..cut], &origin, MAX_PIXELS)
                .unwrap_err()
                .to_string();
            assert!(
                message.starts_with("cut.jpg: cannot decode the image")
                    && message.contains("truncated"),
                "cut at {cut}: {message}"
            );
        }
    }

    #[test]
    fn transform_resizes_flips_crops_and_scales() {
        // A 4x2 image whose columns are 0, 85, 170, 255: no resize, crop 2x2 at left 2 after a flip.
        let mut image = RgbImage::new(4, 2);
        for (x, _, p) in image.enumerate_pixels_mut() {
            *p = image::Rgb([(x * 85) as u8; 3]);
        }
        let placement = Placement {
            resized: (4, 2),
            flipped: true,
            crop_top_left: (0, 2),
            target: (2, 2),
            reported_crop_top_left: (0, 2),
        };
        let out = apply(&image, &placement).unwrap().to_tensor().unwrap();
        assert_eq!(out.size(), [3, 2, 2]);
        let row: Vec<f32> = Vec::try_from(out.get(0).get(0)).unwrap();
        // Flipped columns: 255, 170, 85, 0; the crop keeps 85, 0.
        assert!(
            (row[0] - (85.0 / 127.5 - 1.0)).abs() < 1e-6 && (row[1] + 1.0).abs() < 1e-6,
            "{row:?}"
        );
        // Downscaling a constant image keeps it constant and inside [-1, 1].
        let flat = RgbImage::from_pixel(50, 30, image::Rgb([200, 10, 255]));
        let placement = place(
            50,
            30,
            (16, 16),
            &TransformConfig::default(),
            &mut Rng::keyed(1, &[]),
        );
        let out = apply(&flat, &placement).unwrap().to_tensor().unwrap();
        assert_eq!(out.size(), [3, 16, 16]);
        let expected =
            Tensor::from_slice(&[200.0f32 / 127.5 - 1.0, 10.0 / 127.5 - 1.0, 1.0]).view([3, 1, 1]);
        assert!((out - expected).abs().max().double_value(&[]) < 1e-5);
    }
}
