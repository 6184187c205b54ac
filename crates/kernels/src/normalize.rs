//! Image normalization, `(p / 255 - mean[c]) / std[c]` on uint8 RGB pixels, channels last: the
//! first thing every training step does to its batch.
//!
//! The host path (convmae-core's `train::normalize`) does it in one single-threaded pass and
//! uploads f32, four times the bytes: for 64 images of 224 that is about 20 ms of one core (benches/results/normalize-2026-11-26.md),
//! during which a GPU has nothing to do. On CUDA this op uploads the bytes and normalizes there
//! (cuda/elementwise.cu). Both compute in f32 with the same constants in the same order (IEEE
//! division on the device), so the results are the same bits; the CPU form here is the
//! reference the tests hold the host path to.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};

const OP_NAME: &str = "normalize_rgb";

/// `pixels` (u8 `[.., 3]`, channels last) normalized per channel with `mean` and `std` (already
/// rounded to f32, as the host path rounds them), as f32 of the same shape, on `pixels`' device.
pub fn normalize_rgb(pixels: &Tensor, mean: [f32; 3], std: [f32; 3]) -> Result<Tensor> {
    if pixels.dtype() != DType::U8 || pixels.dims().last() != Some(&3) {
        candle_core::bail!("{OP_NAME}: pixels must be u8 with 3 channels last, got {:?} {:?}", pixels.dtype(), pixels.dims());
    }
    pixels.apply_op1_no_bwd(&NormalizeRgb { mean, std })
}

struct NormalizeRgb {
    mean: [f32; 3],
    std: [f32; 3],
}

fn contiguous_range(l: &Layout) -> Result<std::ops::Range<usize>> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(a..b),
        None => candle_core::bail!("{OP_NAME}: the pixels must be contiguous"),
    }
}

impl CustomOp1 for NormalizeRgb {
    fn name(&self) -> &'static str {
        OP_NAME
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::U8(px) = s else { candle_core::bail!("{OP_NAME}: pixels must be u8") };
        let px = &px[contiguous_range(l)?];
        let out = px.iter().enumerate().map(|(i, &p)| (p as f32 / 255.0 - self.mean[i % 3]) / self.std[i % 3]).collect();
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        let out = crate::cuda::normalize_rgb(s, contiguous_range(l)?, self.mean, self.std)?;
        Ok((out, l.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn normalizes_per_channel_and_names_bad_input() {
        let px = Tensor::from_vec(vec![0u8, 255, 51, 128, 7, 200], (1, 2, 3), &Device::Cpu).unwrap();
        let (mean, std) = ([0.485f32, 0.456, 0.406], [0.229f32, 0.224, 0.225]);
        let got = normalize_rgb(&px, mean, std).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let want: Vec<f32> = [0u8, 255, 51, 128, 7, 200].iter().enumerate().map(|(i, &p)| (p as f32 / 255.0 - mean[i % 3]) / std[i % 3]).collect();
        assert_eq!(got, want);
        let e = normalize_rgb(&px.to_dtype(DType::F32).unwrap(), mean, std).unwrap_err().to_string();
        assert!(e.contains("normalize_rgb") && e.contains("u8"), "{e}");
    }
}
