//! The MAE decoder's entry as one op: the visible tokens' embeddings and the mask token put back
//! in image order, plus the position table: `out[b, i] = (r < keep ? x[b, r] : mask_token) +
//! pos[i]` with `r = ids_restore[b, i]` (MAE's "append mask tokens, unshuffle, add
//! decoder_pos_embed").
//!
//! As candle's ops that is a broadcast of the mask token, a concatenation, a gather (with its
//! index broadcast to every channel and made contiguous) and a broadcast add; their backward is a
//! scatter-add and a string of gradient adds. In run 7's H100 profile of a ConvMAE-B step at
//! batch 64 (benches/results/gpu-2026-11-26-run7-ncu-raw.csv.gz) the forward was six launches,
//! ~340 us, and the backward a 183 us scatter-add and the adds of its gradients (~390 us in
//! all, by the launches that follow it in the trace). Here the forward is one
//! pass over the output and the backward two passes over its gradient and a small reduction.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};

use crate::{row_major, Element};

const OP_NAME: &str = "restore_tokens";
const GRAD_NAME: &str = "restore_tokens_backward";

/// The sizes: `images` x `tokens` positions of width `d`, `keep` of them visible per image.
#[derive(Clone, Copy, Debug)]
pub(crate) struct TokenSizes {
    pub images: usize,
    pub tokens: usize,
    pub keep: usize,
    pub d: usize,
}

impl TokenSizes {
    /// [dx (images x keep x d) | d mask_token (d) | d pos (tokens x d)]: the backward's packed result.
    fn grads(&self) -> usize {
        self.images * self.keep * self.d + self.d + self.tokens * self.d
    }
}

/// `x` [B, keep, D] (the visible tokens in ids_keep order), `mask_token` (D values, e.g. [1, 1,
/// D]) and `pos` (L x D values, e.g. [1, L, D]) as the [B, L, D] sequence in image order:
/// position i of image b holds `x[b, ids_restore[b, i]]` where that is below keep, the mask
/// token elsewhere, plus `pos[i]`. `ids_restore` ([B, L], u32) is MAE's: each image's inverse
/// shuffle, a permutation of 0..L. Differentiable in `x`, `mask_token` and `pos`.
///
/// Our op where a kernel serves all three (one float dtype; CPU f32 and f64, CUDA f32, bf16 and
/// f16), `ids_restore` is u32 on their device and `CONVMAE_COMPOSITE_OPS` does not list it;
/// else candle's ops: the same values.
pub fn restore_tokens(x: &Tensor, mask_token: &Tensor, pos: &Tensor, ids_restore: &Tensor) -> Result<Tensor> {
    let sizes = check(x, mask_token, pos, ids_restore)?;
    let ours = crate::composite::use_kernel(&[x, mask_token, pos])
        && ids_restore.dtype() == DType::U32
        && ids_restore.device().same_device(x.device())
        && x.dtype() == mask_token.dtype()
        && x.dtype() == pos.dtype()
        && !crate::composite::sent_to_composite(OP_NAME);
    if !ours {
        return crate::composite::restore_tokens(x, mask_token, pos, ids_restore);
    }
    crate::tape::apply3(x, mask_token, pos, RestoreTokens { sizes, ids: ids_restore.clone() })
}

fn check(x: &Tensor, mask_token: &Tensor, pos: &Tensor, ids: &Tensor) -> Result<TokenSizes> {
    let fail = || {
        candle_core::bail!(
            "{OP_NAME}: visible tokens {:?}, mask token {:?}, position table {:?} and ids_restore {:?} do not fit (expected [B, keep, D], D values, L x D values and [B, L] with keep <= L)",
            x.dims(),
            mask_token.dims(),
            pos.dims(),
            ids.dims()
        )
    };
    let (&[images, keep, d], &[ib, tokens]) = (x.dims(), ids.dims()) else { return fail() };
    if ib != images || keep > tokens || mask_token.elem_count() != d || pos.elem_count() != tokens * d {
        return fail();
    }
    Ok(TokenSizes { images, tokens, keep, d })
}

struct RestoreTokens {
    sizes: TokenSizes,
    ids: Tensor,
}

/// ids_restore on the host, checked to be below L. (The CUDA kernels do not check: an index at or
/// past keep reads the mask token there, so none reads out of bounds.)
fn host_ids(ids: &Tensor, s: TokenSizes, op: &str) -> Result<Vec<u32>> {
    let v = ids.flatten_all()?.to_device(&candle_core::Device::Cpu)?.to_vec1::<u32>()?;
    if let Some(bad) = v.iter().find(|&&r| r as usize >= s.tokens) {
        candle_core::bail!("{op}: ids_restore holds {bad}, not below the {} tokens", s.tokens);
    }
    Ok(v)
}

fn forward<T: Element>(x: &[T], mask_token: &[T], pos: &[T], ids: &[u32], s: TokenSizes) -> Vec<T> {
    let d = s.d;
    let mut out = Vec::with_capacity(s.images * s.tokens * d);
    for (row, &r) in ids.iter().enumerate() {
        let (b, i) = (row / s.tokens, row % s.tokens);
        let src = if (r as usize) < s.keep { &x[(b * s.keep + r as usize) * d..][..d] } else { mask_token };
        out.extend(src.iter().zip(&pos[i * d..][..d]).map(|(&v, &p)| v + p));
    }
    out
}

/// [dx | d mask_token | d pos] from the output's gradient `g`.
fn backward<T: Element>(g: &[T], ids: &[u32], s: TokenSizes) -> Vec<T> {
    let d = s.d;
    let mut out = vec![T::ZERO; s.grads()];
    let (dx, rest) = out.split_at_mut(s.images * s.keep * d);
    let (dmask, dpos) = rest.split_at_mut(d);
    for (row, &r) in ids.iter().enumerate() {
        let (b, i) = (row / s.tokens, row % s.tokens);
        let gr = &g[row * d..][..d];
        let to = if (r as usize) < s.keep { &mut dx[(b * s.keep + r as usize) * d..][..d] } else { &mut *dmask };
        for (o, &v) in to.iter_mut().zip(gr) {
            *o += v;
        }
        for (o, &v) in dpos[i * d..][..d].iter_mut().zip(gr) {
            *o += v;
        }
    }
    out
}

impl CustomOp3 for RestoreTokens {
    fn name(&self) -> &'static str {
        OP_NAME
    }

    fn cpu_fwd(&self, sx: &CpuStorage, lx: &Layout, sm: &CpuStorage, lm: &Layout, sp: &CpuStorage, lp: &Layout) -> Result<(CpuStorage, Shape)> {
        let s = self.sizes;
        let ids = host_ids(&self.ids, s, OP_NAME)?;
        let out = dispatch_float!(OP_NAME, (sx => x, sm => m, sp => p), {
            Element::into_storage(forward(&row_major(x, lx), &row_major(m, lm), &row_major(p, lp), &ids, s))
        });
        Ok((out, Shape::from_dims(&[s.images, s.tokens, s.d])))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        sx: &candle_core::CudaStorage,
        lx: &Layout,
        sm: &candle_core::CudaStorage,
        lm: &Layout,
        sp: &candle_core::CudaStorage,
        lp: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use crate::cuda::{cuda_dispatch, restore_tokens_fwd};
        use candle_core::backend::BackendStorage;
        let s = self.sizes;
        let out = cuda_dispatch!(OP_NAME, sx.dtype(), restore_tokens_fwd(sx, lx, sm, lm, sp, lp, &self.ids, s))?;
        Ok((out, Shape::from_dims(&[s.images, s.tokens, s.d])))
    }

    fn bwd(&self, x: &Tensor, mask_token: &Tensor, pos: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let s = self.sizes;
        let all = grad.apply_op1_no_bwd(&RestoreTokensBackward { sizes: s, ids: self.ids.clone() })?;
        let nx = s.images * s.keep * s.d;
        let part = |t: &Tensor, start: usize, len: usize| -> Result<Option<Tensor>> {
            // Nothing for an input that needs no gradient (the fixed position table).
            if t.track_op() {
                Ok(Some(all.narrow(0, start, len)?.reshape(t.shape())?))
            } else {
                Ok(None)
            }
        };
        Ok((part(x, 0, nx)?, part(mask_token, nx, s.d)?, part(pos, nx + s.d, s.tokens * s.d)?))
    }
}

/// The output's gradient -> [dx | d mask_token | d pos], flat.
struct RestoreTokensBackward {
    sizes: TokenSizes,
    ids: Tensor,
}

impl candle_core::CustomOp1 for RestoreTokensBackward {
    fn name(&self) -> &'static str {
        GRAD_NAME
    }

    fn cpu_fwd(&self, sg: &CpuStorage, lg: &Layout) -> Result<(CpuStorage, Shape)> {
        let s = self.sizes;
        crate::same_shape(GRAD_NAME, "output-gradient", lg.dims(), "output", &[s.images, s.tokens, s.d])?;
        let ids = host_ids(&self.ids, s, GRAD_NAME)?;
        let out = dispatch_float!(GRAD_NAME, (sg => g), { Element::into_storage(backward(&row_major(g, lg), &ids, s)) });
        Ok((out, Shape::from(s.grads())))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, sg: &candle_core::CudaStorage, lg: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        use crate::cuda::{cuda_dispatch, restore_tokens_bwd};
        use candle_core::backend::BackendStorage;
        let s = self.sizes;
        crate::same_shape(GRAD_NAME, "output-gradient", lg.dims(), "output", &[s.images, s.tokens, s.d])?;
        let out = cuda_dispatch!(GRAD_NAME, sg.dtype(), restore_tokens_bwd(sg, lg, &self.ids, s))?;
        Ok((out, Shape::from(s.grads())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// The op against candle's ops, f64 and f32: the sequence and the gradients of the visible
    /// tokens, the mask token and the position table, with a strided x.
    #[test]
    fn matches_the_composition() {
        for dtype in [DType::F64, DType::F32] {
            let (b, l, keep, d) = (2, 6, 2, 5);
            let rand = |shape: &[usize], seed: u64| Tensor::from_vec(crate::agreement::values(shape.iter().product(), seed), shape, &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
            let xt = Var::from_tensor(&rand(&[b, d, keep], 1)).unwrap();
            let x = xt.as_tensor().transpose(1, 2).unwrap();
            let mask_token = Var::from_tensor(&rand(&[1, 1, d], 2)).unwrap();
            let pos = Var::from_tensor(&rand(&[1, l, d], 3)).unwrap();
            // Image 0 keeps tokens 4 and 1, image 1 keeps 0 and 5 (ids_restore: each token's rank).
            let ids = Tensor::from_vec(vec![2u32, 1, 3, 4, 0, 5, 0, 2, 3, 4, 5, 1], (b, l), &Device::Cpu).unwrap();
            let probe = rand(&[b, l, d], 4);
            let run = |path| {
                crate::with_path(path, || {
                    let out = restore_tokens(&x, &mask_token, &pos, &ids).unwrap();
                    let grads = (&out * &probe).unwrap().sum_all().unwrap().backward().unwrap();
                    let flat = |t: &Tensor| t.flatten_all().unwrap().to_dtype(DType::F64).unwrap().to_vec1::<f64>().unwrap();
                    let g = |v: &Var| flat(grads.get(v.as_tensor()).unwrap());
                    (flat(&out), g(&xt), g(&mask_token), g(&pos))
                })
            };
            let ours = run(crate::Path::Kernels);
            let theirs = run(crate::Path::Composite);
            let tol = if dtype == DType::F64 { 1e-14 } else { 1e-6 };
            for (what, a, r) in [("output", &ours.0, &theirs.0), ("x", &ours.1, &theirs.1), ("mask token", &ours.2, &theirs.2), ("pos", &ours.3, &theirs.3)] {
                assert_eq!(a.len(), r.len(), "{what}");
                for (p, q) in a.iter().zip(r) {
                    assert!((p - q).abs() <= tol, "{dtype:?} {what}: {p} vs {q}");
                }
            }
            // Image 0's position 4 is its first visible token (rank 0), so it is x[0, 0] + pos[4].
            let want = (x.get(0).unwrap().get(0).unwrap() + pos.as_tensor().get(0).unwrap().get(4).unwrap()).unwrap().to_dtype(DType::F64).unwrap().to_vec1::<f64>().unwrap();
            assert_eq!(&ours.0[4 * d..5 * d], want.as_slice());
        }
    }

    #[test]
    fn bad_input_is_named() {
        let x = Tensor::zeros((2, 2, 4), DType::F32, &Device::Cpu).unwrap();
        let m = Tensor::zeros((1, 1, 4), DType::F32, &Device::Cpu).unwrap();
        let pos = Tensor::zeros((1, 6, 4), DType::F32, &Device::Cpu).unwrap();
        let ids = Tensor::from_vec(vec![0u32, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 9], (2, 6), &Device::Cpu).unwrap();
        let e = restore_tokens(&x, &m, &pos, &ids).unwrap_err().to_string();
        assert!(e.contains(OP_NAME) && e.contains("ids_restore holds 9"), "{e}");
        let e = restore_tokens(&x, &m, &pos.narrow(1, 0, 5).unwrap(), &ids).unwrap_err().to_string();
        assert!(e.contains(OP_NAME) && e.contains("position table [1, 5, 4]"), "{e}");
    }
}
