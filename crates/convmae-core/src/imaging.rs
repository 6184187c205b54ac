//! The native path of the pretraining transform: JPEG decode, crop, bicubic
//! resize, horizontal flip, written as uint8 RGB HWC into a batch buffer.
//!
//! Why it exists: decoding and augmenting a JPEG with sharp costs more CPU per
//! image than PIL does, so a Node loader built on sharp alone cannot keep up
//! with a GPU on few cores. Here the decoder is zune-jpeg (SIMD IDCT and colour
//! conversion) and the resampler is PIL's own algorithm, so the pixels are
//! those torchvision's `RandomResizedCrop(..., BICUBIC)` computes up to the
//! decoders' IDCT/upsampling rounding.
//!
//! The crop box and flip are chosen by the caller (the TypeScript sampler),
//! so this path and the sharp path draw identical augmentations.

use std::sync::{Arc, Mutex};

use rayon::prelude::*;
use zune_core::bytestream::ZCursor;
use zune_core::colorspace::ColorSpace;
use zune_core::options::DecoderOptions;
use zune_jpeg::JpegDecoder;

/// A crop box in source pixels and whether to mirror the result horizontally.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CropFlip {
    pub left: usize,
    pub top: usize,
    pub width: usize,
    pub height: usize,
    pub flip: bool,
}

/// Decoded pixels, interleaved, `channels` = 1 (grey) or 3 (RGB).
pub struct DecodedImage {
    pub pixels: Vec<u8>,
    pub width: usize,
    pub height: usize,
    pub channels: usize,
}

/// Whether `data` starts with a JPEG start-of-image marker.
pub fn is_jpeg(data: &[u8]) -> bool {
    data.len() >= 3 && data[0] == 0xFF && data[1] == 0xD8 && data[2] == 0xFF
}

/// Decodes a JPEG to RGB, or to one grey channel for greyscale files (the
/// caller replicates it, as PIL's `convert('RGB')` does). No EXIF rotation,
/// as PIL/torchvision. Strict: corrupt entropy-coded data is an error rather
/// than grey blocks. CMYK/YCCK files are refused (their inversion conventions
/// differ between decoders); callers fall back to a general decoder.
pub fn decode_jpeg(data: &[u8]) -> Result<DecodedImage, String> {
    if !is_jpeg(data) {
        return Err("not a JPEG file".to_string());
    }
    let options = DecoderOptions::default().set_strict_mode(true);
    let mut decoder = JpegDecoder::new_with_options(ZCursor::new(data), options);
    decoder.decode_headers().map_err(|e| format!("JPEG header: {e:?}"))?;
    let input = decoder.input_colorspace().ok_or("JPEG header: no colour space")?;
    let (out, channels) = match input {
        ColorSpace::Luma => (ColorSpace::Luma, 1),
        ColorSpace::YCbCr | ColorSpace::RGB => (ColorSpace::RGB, 3),
        other => return Err(format!("unsupported JPEG colour space {other:?}")),
    };
    decoder.set_options(options.jpeg_set_out_colorspace(out));
    let (width, height) = decoder.dimensions().ok_or("JPEG header: no dimensions")?;
    let mut pixels = vec![0u8; width * height * channels];
    decoder.decode_into(&mut pixels).map_err(|e| format!("JPEG data: {e:?}"))?;
    Ok(DecodedImage { pixels, width, height, channels })
}

// ---------------------------------------------------------------------------
// Resampling, as Pillow's Resample.c computes it for 8-bit images

/// Pillow's fixed point: 32 bits minus 8 for the pixel and 2 for headroom.
const PRECISION_BITS: u32 = 22;

/// Pillow's resampling filters that this crate uses: BICUBIC for the classification and
/// pretraining crops (torchvision's RandomResizedCrop), BILINEAR for detectron2's resizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Filter {
    /// The triangle, support 1.
    Bilinear,
    /// Keys' cubic with a = -0.5, support 2.
    Bicubic,
}

impl Filter {
    fn support(self) -> f64 {
        match self {
            Filter::Bilinear => 1.0,
            Filter::Bicubic => 2.0,
        }
    }

    fn weight(self, x: f64) -> f64 {
        let x = x.abs();
        match self {
            Filter::Bilinear => {
                if x < 1.0 {
                    1.0 - x
                } else {
                    0.0
                }
            }
            Filter::Bicubic => {
                const A: f64 = -0.5;
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
        }
    }
}

/// The taps of a 1-D resample from `in_size` to `out_size` pixels: for output
/// pixel i, `len[i]` source pixels from `first[i]` with the fixed-point
/// weights `weights[i * stride..]`.
struct Taps {
    first: Vec<usize>,
    len: Vec<usize>,
    stride: usize,
    weights: Vec<i32>,
}

/// Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc` for the box
/// [0, in_size): when shrinking, the kernel is stretched by the scale factor
/// (antialiasing), weights are normalized to sum 1, then rounded half away
/// from zero to 22-bit fixed point.
fn taps(in_size: usize, out_size: usize, filter: Filter) -> Taps {
    let scale = in_size as f64 / out_size as f64;
    let filter_scale = scale.max(1.0);
    let support = filter.support() * filter_scale;
    // As Pillow: times the reciprocal (a division may round otherwise in the last bit, though
    // no case of test/oracles.test.ts tells them apart).
    let inverse_scale = 1.0 / filter_scale;
    let stride = support.ceil() as usize * 2 + 1;
    let mut first = Vec::with_capacity(out_size);
    let mut len = Vec::with_capacity(out_size);
    let mut weights = vec![0i32; out_size * stride];
    let mut row = vec![0f64; stride];
    for i in 0..out_size {
        let center = (i as f64 + 0.5) * scale;
        // Pillow truncates toward zero (C casts), then clamps.
        let lo = ((center - support + 0.5) as i64).max(0) as usize;
        let hi = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
        let n = hi - lo;
        let mut sum = 0.0;
        for (k, w) in row.iter_mut().enumerate().take(n) {
            *w = filter.weight((k as f64 + lo as f64 - center + 0.5) * inverse_scale);
            sum += *w;
        }
        for k in 0..n {
            let w = if sum != 0.0 { row[k] / sum } else { row[k] };
            weights[i * stride + k] = (w * f64::from(1u32 << PRECISION_BITS)).round() as i32;
        }
        first.push(lo);
        len.push(n);
    }
    Taps { first, len, stride, weights }
}

/// Pillow's `clip8`: drop the fraction, clamp to [0, 255].
#[inline]
fn clip8(acc: i32) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

const HALF: i32 = 1 << (PRECISION_BITS - 1);

/// Crops `crop` out of `image`, resizes it to `size` x `size` with Pillow's
/// bicubic, mirrors it when `crop.flip`, and writes size*size*3 bytes of RGB
/// to `out` (grey replicated).
pub fn resized_crop(image: &DecodedImage, crop: CropFlip, size: usize, out: &mut [u8]) -> Result<(), String> {
    resized_crop_to(image, crop, size, size, out)
}

/// `resized_crop` to `out_width` x `out_height`.
pub fn resized_crop_to(image: &DecodedImage, crop: CropFlip, out_width: usize, out_height: usize, out: &mut [u8]) -> Result<(), String> {
    resample_with(image, crop, out_width, out_height, Filter::Bicubic, out)
}

/// The whole image resized to `out_width` x `out_height` as Pillow's `Image.resize(size,
/// filter)` resizes it (RGB out, grey replicated): detectron2's ResizeTransform with BILINEAR.
pub fn resized(image: &DecodedImage, out_width: usize, out_height: usize, filter: Filter) -> Result<Vec<u8>, String> {
    let mut out = vec![0u8; out_width * out_height * 3];
    let whole = CropFlip { left: 0, top: 0, width: image.width, height: image.height, flip: false };
    resample_with(image, whole, out_width, out_height, filter, &mut out)?;
    Ok(out)
}

/// The checks and the dispatch of `resized_crop_to` and `resized`.
fn resample_with(image: &DecodedImage, crop: CropFlip, out_width: usize, out_height: usize, filter: Filter, out: &mut [u8]) -> Result<(), String> {
    if crop.width == 0 || crop.height == 0 || crop.left + crop.width > image.width || crop.top + crop.height > image.height {
        return Err(format!(
            "crop {}x{} at ({}, {}) is outside the {}x{} image",
            crop.width, crop.height, crop.left, crop.top, image.width, image.height
        ));
    }
    if out_width == 0 || out_height == 0 || out.len() != out_width * out_height * 3 {
        return Err(format!("output of {} bytes cannot hold a {out_width}x{out_height} RGB image", out.len()));
    }
    if image.pixels.len() < image.width * image.height * image.channels {
        return Err("decoded image is shorter than its dimensions".to_string());
    }
    if image.channels != 1 && image.channels != 3 {
        return Err(format!("unsupported channel count {}", image.channels));
    }
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2 (checked just above).
        unsafe { resample_avx2(image, crop, out_width, out_height, filter, out) };
        return Ok(());
    }
    if image.channels == 1 {
        resample::<1>(image, crop, out_width, out_height, filter, out);
    } else {
        resample::<3>(image, crop, out_width, out_height, filter, out);
    }
    Ok(())
}

/// `resample` compiled for AVX2: the build targets baseline x86-64 (SSE2,
/// which has no 32-bit multiply), and the multiply-add loops are where the
/// time goes. Same integer arithmetic, same result.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn resample_avx2(image: &DecodedImage, crop: CropFlip, out_width: usize, out_height: usize, filter: Filter, out: &mut [u8]) {
    if image.channels == 1 {
        resample::<1>(image, crop, out_width, out_height, filter, out);
    } else {
        resample::<3>(image, crop, out_width, out_height, filter, out);
    }
}

/// Pillow's two-pass resample of the crop (`Image.crop(box).resize(size,
/// filter)`): the horizontal pass first, rounded to 8 bits, over only the
/// rows the vertical pass reads; a pass is skipped when its axis keeps its
/// size, as Pillow does. The flip is applied while writing the output.
#[inline(always)]
fn resample<const C: usize>(image: &DecodedImage, crop: CropFlip, out_width: usize, out_height: usize, filter: Filter, out: &mut [u8]) {
    let src_stride = image.width * C;
    let resize_rows = crop.height != out_height;
    let vertical = taps(crop.height, out_height, filter);
    // Rows of the crop that the vertical pass reads.
    let (row_first, row_end) = if resize_rows {
        (vertical.first[0], vertical.first[out_height - 1] + vertical.len[out_height - 1])
    } else {
        (0, crop.height)
    };

    let line = out_width * C;
    let horizontal_pass: Vec<u8>;
    let (rows, row_stride): (&[u8], usize) = if crop.width != out_width {
        let horizontal = taps(crop.width, out_width, filter);
        let row_count = row_end - row_first;
        let column = row_count * C;
        // The horizontal pass runs as a vertical one on the transposed crop:
        // whole columns are then contiguous and the multiply-adds vectorize,
        // which outweighs the two transposes (same integer sums as Pillow's).
        let mut columns = vec![0u8; crop.width * column];
        for r in 0..row_count {
            let y = crop.top + row_first + r;
            let src = &image.pixels[y * src_stride + crop.left * C..y * src_stride + (crop.left + crop.width) * C];
            for (x, px) in src.chunks_exact(C).enumerate() {
                columns[x * column + r * C..x * column + r * C + C].copy_from_slice(px);
            }
        }
        let mut acc = vec![0i32; column];
        let mut resized_columns = vec![0u8; out_width * column];
        for (x, out_column) in resized_columns.chunks_exact_mut(column).enumerate() {
            let n = horizontal.len[x];
            let first = horizontal.first[x];
            weighted_sum(
                columns[first * column..(first + n) * column].chunks_exact(column),
                &horizontal.weights[x * horizontal.stride..x * horizontal.stride + n],
                &mut acc,
                out_column,
            );
        }
        let mut tmp = vec![0u8; row_count * line];
        for (x, out_column) in resized_columns.chunks_exact(column).enumerate() {
            for (r, px) in out_column.chunks_exact(C).enumerate() {
                tmp[r * line + x * C..r * line + x * C + C].copy_from_slice(px);
            }
        }
        horizontal_pass = tmp;
        (&horizontal_pass, line)
    } else {
        let start = (crop.top + row_first) * src_stride + crop.left * C;
        (&image.pixels[start..], src_stride)
    };

    // Vertical pass, one output row at a time over whole rows (vectorizes).
    let mut acc = vec![0i32; line];
    let mut result = vec![0u8; line];
    for y in 0..out_height {
        if resize_rows {
            let n = vertical.len[y];
            let first = vertical.first[y] - row_first;
            weighted_sum(
                (first..first + n).map(|r| &rows[r * row_stride..r * row_stride + line]),
                &vertical.weights[y * vertical.stride..y * vertical.stride + n],
                &mut acc,
                &mut result,
            );
        } else {
            result.copy_from_slice(&rows[y * row_stride..y * row_stride + line]);
        }
        let dst = &mut out[y * out_width * 3..(y + 1) * out_width * 3];
        for x in 0..out_width {
            let sx = if crop.flip { out_width - 1 - x } else { x };
            for c in 0..3 {
                dst[x * 3 + c] = result[sx * C + if C == 1 { 0 } else { c }];
            }
        }
    }
}

/// The multiply-add of both passes: `out = clip8(HALF + sum_k weights[k] *
/// lines[k])`, element-wise over equally long lines (`acc` is scratch of
/// their length). Whole lines at a time, so it vectorizes.
#[inline(always)]
fn weighted_sum<'a>(lines: impl Iterator<Item = &'a [u8]>, weights: &[i32], acc: &mut [i32], out: &mut [u8]) {
    acc.fill(HALF);
    for (line, &w) in lines.zip(weights) {
        for (a, &p) in acc.iter_mut().zip(line) {
            *a += i32::from(p) * w;
        }
    }
    for (o, &a) in out.iter_mut().zip(acc.iter()) {
        *o = clip8(a);
    }
}

// ---------------------------------------------------------------------------
// Batches on a dedicated thread pool

/// What a job crops: an encoded JPEG file, or pixels already in memory (an IDX file's digits, a
/// caller's arrays), which take the same crop, resample and flip without a decode.
pub enum CropSource<'a> {
    Jpeg(&'a [u8]),
    Pixels(&'a DecodedImage),
}

/// One image of a batch: its source and its augmentation.
pub struct CropJob<'a> {
    pub source: CropSource<'a>,
    pub crop: CropFlip,
}

/// Decoding threads, kept apart from rayon's global pool, which the training
/// step's matmuls use: the loader must not queue behind (or stall) them.
static POOL: Mutex<Option<(usize, Arc<rayon::ThreadPool>)>> = Mutex::new(None);

fn pool(threads: usize) -> Result<Arc<rayon::ThreadPool>, String> {
    let mut guard = POOL.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((n, p)) = guard.as_ref() {
        if *n == threads {
            return Ok(p.clone());
        }
    }
    let p = Arc::new(
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("convmae-decode-{i}"))
            .build()
            .map_err(|e| format!("cannot start {threads} decode threads: {e}"))?,
    );
    *guard = Some((threads, p.clone()));
    Ok(p)
}

/// Decodes (where the source is a file) and augments every job on `threads`
/// threads into `out` (one size*size*3 block per job, in order). Returns one
/// entry per job: None when its block was written, else why it failed (its
/// block is then unspecified). A panic while decoding one file fails that job
/// only.
pub fn decode_crop_batch(jobs: &[CropJob], size: usize, threads: usize, out: &mut [u8]) -> Result<Vec<Option<String>>, String> {
    let block = size * size * 3;
    if out.len() != jobs.len() * block {
        return Err(format!("output of {} bytes does not hold {} images of {size}x{size}x3", out.len(), jobs.len()));
    }
    let run = |job: &CropJob, dst: &mut [u8]| -> Option<String> {
        let attempt = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match job.source {
            CropSource::Jpeg(data) => resized_crop(&decode_jpeg(data)?, job.crop, size, dst),
            CropSource::Pixels(image) => resized_crop(image, job.crop, size, dst),
        }));
        match attempt {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e),
            Err(_) => Some("internal error (Rust panic) while decoding".to_string()),
        }
    };
    let pool = pool(threads.max(1))?;
    Ok(pool.install(|| out.par_chunks_mut(block).zip(jobs.par_iter()).map(|(dst, job)| run(job, dst)).collect()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(width: usize, height: usize, channels: usize) -> DecodedImage {
        let pixels = (0..width * height * channels).map(|i| ((i * 37 + i / 7 * 11) % 256) as u8).collect();
        DecodedImage { pixels, width, height, channels }
    }

    #[test]
    fn taps_are_normalized_and_stay_inside_the_source() {
        for &(inp, out) in &[(500, 224), (224, 224), (100, 224), (37, 5), (5, 37), (1, 3)] {
            let t = taps(inp, out, Filter::Bicubic);
            for i in 0..out {
                assert!(t.first[i] + t.len[i] <= inp, "{inp}->{out} tap {i}");
                let sum: i64 = t.weights[i * t.stride..i * t.stride + t.len[i]].iter().map(|&w| i64::from(w)).sum();
                // Rounding each weight moves the sum by at most half a unit per tap.
                assert!((sum - (1 << PRECISION_BITS)).abs() <= t.len[i] as i64, "{inp}->{out} tap {i}: sum {sum}");
            }
        }
    }

    #[test]
    fn same_size_crop_is_a_copy_and_flip_mirrors_it() {
        let img = image(9, 7, 3);
        let crop = CropFlip { left: 2, top: 1, width: 5, height: 5, flip: false };
        let mut out = vec![0u8; 5 * 5 * 3];
        resized_crop(&img, crop, 5, &mut out).unwrap();
        let mut flipped = vec![0u8; 5 * 5 * 3];
        resized_crop(&img, CropFlip { flip: true, ..crop }, 5, &mut flipped).unwrap();
        for y in 0..5 {
            for x in 0..5 {
                for c in 0..3 {
                    let src = img.pixels[((1 + y) * 9 + 2 + x) * 3 + c];
                    assert_eq!(out[(y * 5 + x) * 3 + c], src);
                    assert_eq!(flipped[(y * 5 + 4 - x) * 3 + c], src);
                }
            }
        }
    }

    #[test]
    fn constant_image_stays_constant_and_grey_is_replicated() {
        let img = DecodedImage { pixels: vec![123; 40 * 30], width: 40, height: 30, channels: 1 };
        let mut out = vec![0u8; 16 * 16 * 3];
        resized_crop(&img, CropFlip { left: 3, top: 4, width: 33, height: 21, flip: true }, 16, &mut out).unwrap();
        assert!(out.iter().all(|&v| v == 123));
    }

    /// Values from Pillow 13.0: `im = Image.frombytes('RGB', (7, 5), bytes(range(105)))`,
    /// then `im.resize((3, 4), Image.BICUBIC)`, `im.resize((9, 8), Image.BICUBIC)` and
    /// `im.crop((1, 1, 6, 4)).resize((4, 6), Image.BICUBIC).transpose(Image.FLIP_LEFT_RIGHT)`.
    #[test]
    fn matches_pillow_bicubic_exactly() {
        let img = DecodedImage { pixels: (0..105u8).collect(), width: 7, height: 5, channels: 3 };
        let full = CropFlip { left: 0, top: 0, width: 7, height: 5, flip: false };
        let mut down = vec![0u8; 3 * 4 * 3];
        resized_crop_to(&img, full, 3, 4, &mut down).unwrap();
        assert_eq!(down, PILLOW_DOWN);
        let mut up = vec![0u8; 9 * 8 * 3];
        resized_crop_to(&img, full, 9, 8, &mut up).unwrap();
        assert_eq!(up, PILLOW_UP);
        let mut cropped = vec![0u8; 4 * 6 * 3];
        resized_crop_to(&img, CropFlip { left: 1, top: 1, width: 5, height: 3, flip: true }, 4, 6, &mut cropped).unwrap();
        assert_eq!(cropped, PILLOW_CROP_FLIP);
    }

    const PILLOW_DOWN: [u8; 36] = [
        5, 6, 7, 12, 13, 14, 19, 20, 21, 31, 32, 33, 38, 39, 40, 45, 46, 47, 57, 58, 59, 64, 65, 66, 71, 72, 73, 83, 84, 85, 90, 91, 92, 97,
        98, 99,
    ];
    const PILLOW_UP: [u8; 216] = [
        0, 0, 0, 0, 1, 2, 2, 3, 4, 5, 6, 7, 7, 8, 9, 9, 10, 11, 12, 13, 14, 14, 15, 16, 16, 17, 18, 7, 8, 9, 9, 10, 11, 11, 12, 13, 14, 15,
        16, 16, 17, 18, 18, 19, 20, 21, 22, 23, 23, 24, 25, 25, 26, 27, 22, 23, 24, 24, 25, 26, 26, 27, 28, 29, 30, 31, 31, 32, 33, 33, 34,
        35, 36, 37, 38, 38, 39, 40, 40, 41, 42, 35, 36, 37, 37, 38, 39, 39, 40, 41, 42, 43, 44, 44, 45, 46, 46, 47, 48, 49, 50, 51, 51, 52,
        53, 53, 54, 55, 49, 50, 51, 51, 52, 53, 53, 54, 55, 56, 57, 58, 58, 59, 60, 60, 61, 62, 63, 64, 65, 65, 66, 67, 67, 68, 69, 62, 63,
        64, 64, 65, 66, 66, 67, 68, 69, 70, 71, 71, 72, 73, 73, 74, 75, 76, 77, 78, 78, 79, 80, 80, 81, 82, 77, 78, 79, 79, 80, 81, 81, 82,
        83, 84, 85, 86, 86, 87, 88, 88, 89, 90, 91, 92, 93, 93, 94, 95, 95, 96, 97, 86, 87, 88, 88, 89, 90, 90, 91, 92, 93, 94, 95, 95, 96,
        97, 97, 98, 99, 100, 101, 102, 102, 103, 104, 104, 105, 106,
    ];
    const PILLOW_CROP_FLIP: [u8; 72] = [
        34, 35, 36, 30, 31, 32, 26, 27, 28, 22, 23, 24, 40, 41, 42, 36, 37, 38, 32, 33, 34, 28, 29, 30, 51, 52, 53, 47, 48, 49, 43, 44, 45,
        39, 40, 41, 63, 64, 65, 59, 60, 61, 55, 56, 57, 51, 52, 53, 74, 75, 76, 70, 71, 72, 66, 67, 68, 62, 63, 64, 80, 81, 82, 76, 77, 78,
        72, 73, 74, 68, 69, 70,
    ];

    #[test]
    fn batch_reports_failures_per_job() {
        let jobs = [
            CropJob { source: CropSource::Jpeg(b"not a jpeg"), crop: CropFlip { left: 0, top: 0, width: 1, height: 1, flip: false } },
            CropJob { source: CropSource::Jpeg(&[0xFF, 0xD8, 0xFF, 0xE0, 0, 0]), crop: CropFlip { left: 0, top: 0, width: 1, height: 1, flip: false } },
        ];
        let mut out = vec![0u8; 2 * 4 * 4 * 3];
        let errors = decode_crop_batch(&jobs, 4, 2, &mut out).unwrap();
        assert_eq!(errors[0].as_deref(), Some("not a JPEG file"));
        assert!(errors[1].is_some());
    }

    #[test]
    fn pixel_jobs_are_the_resized_crop_of_their_pixels_and_fail_alone() {
        let grey = image(30, 20, 1);
        let rgb = image(17, 23, 3);
        let short = DecodedImage { pixels: vec![0; 5], ..image(4, 4, 1) };
        let crop = |left, top, width, height, flip| CropFlip { left, top, width, height, flip };
        let jobs = [
            CropJob { source: CropSource::Pixels(&grey), crop: crop(3, 2, 20, 15, true) },
            CropJob { source: CropSource::Pixels(&short), crop: crop(0, 0, 4, 4, false) },
            CropJob { source: CropSource::Pixels(&rgb), crop: crop(1, 4, 16, 12, false) },
        ];
        let block = 8 * 8 * 3;
        let mut out = vec![0u8; 3 * block];
        let errors = decode_crop_batch(&jobs, 8, 2, &mut out).unwrap();
        assert_eq!(errors[0], None);
        assert_eq!(errors[1].as_deref(), Some("decoded image is shorter than its dimensions"));
        assert_eq!(errors[2], None);
        for (k, img) in [(0, &grey), (2, &rgb)] {
            let mut want = vec![0u8; block];
            resized_crop(img, jobs[k].crop, 8, &mut want).unwrap();
            assert_eq!(&out[k * block..(k + 1) * block], &want[..], "job {k}");
        }
    }
}
