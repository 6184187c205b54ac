//! A run of packed sublayers as one op: `sublayer_chain`.
//!
//! Between two sublayer ops candle's backward does what it does for every op input: it starts
//! the input's gradient as zeros and adds the op's contribution to it (`GradStore::or_insert`,
//! then an add), even where, as here, the gradient has one contribution. For a chain of
//! sublayers that is an activation-sized fill and add at each link: 42 a ConvMAE-B pretraining
//! step (stage 1 and 2: two blocks of two sublayers each; stage 3: 11 blocks, the decoder: 8,
//! of two each; one link fewer than sublayers per run), at stage 1's size 50176 x 256 rows in
//! bf16 at batch 64 (25.7 MB written, then 51 MB read and 25.7 MB written again).
//!
//! The chain hands each link's input gradient straight to the link before it, so candle sees
//! one node, the chain's input: the same ops in the same order on the same values, so the same
//! bits as the links one by one. The links' packs are not arguments of the op (candle's custom
//! ops take at most three): their gradients go to the packs' sinks (`PackGradSink`), which every
//! link of a chain must have, as the pretraining model's compute copies do.

use std::sync::Mutex;

use candle_core::op::BackpropOp;
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Storage, Tensor};

use super::{Sublayer, SublayerLink};

/// `links` applied to `x` one after another, the input of each the output of the one before:
/// as one op (`Chain`) where every link runs as its one op (`SublayerLink::one_op`) with a sink
/// for its packs' gradients, there are at least two links and `CONVMAE_COMPOSITE_OPS` does not
/// list `sublayer_chain`; otherwise each link as `SublayerLink::apply` runs it alone. The same
/// values and gradients either way (the same bits on the CPU: tests below).
pub fn sublayer_chain(x: &Tensor, links: &[SublayerLink]) -> Result<Tensor> {
    if let Some(chain) = Chain::plan(x, links)? {
        return crate::tape::apply1(x, chain);
    }
    links.iter().try_fold(x.clone(), |x, link| link.apply(&x))
}

/// A link as the chain runs it: its one op and its packs.
struct ChainedLink {
    op: Sublayer,
    weights: Tensor,
    vectors: Tensor,
}

struct Chain {
    links: Vec<ChainedLink>,
    /// The input of every link after the first (the output of the one before it), kept by the
    /// forward for the backward, which takes them.
    inputs: Mutex<Vec<Tensor>>,
}

impl Chain {
    /// The chain for `links` on input `x`, or None where it does not run as one op (see
    /// `sublayer_chain`).
    fn plan(x: &Tensor, links: &[SublayerLink]) -> Result<Option<Self>> {
        if links.len() < 2 || crate::composite::sent_to_composite("sublayer_chain") {
            return Ok(None);
        }
        let mut chained = Vec::with_capacity(links.len());
        for link in links {
            match link.one_op(x)? {
                Some(op) if op.sink.is_some() => {
                    let pack = link.pack();
                    chained.push(ChainedLink { op, weights: pack.weights.clone(), vectors: pack.vectors.clone() });
                }
                _ => return Ok(None),
            }
        }
        Ok(Some(Self { links: chained, inputs: Mutex::new(Vec::new()) }))
    }

    /// Runs the links' forwards on storages of one backend (`of` picks a storage of it, `wrap`
    /// makes one into a `Storage`; `forward` is the link op's forward on that backend), keeping
    /// each link's input after the first; returns the last link's output.
    fn forward<S>(
        &self,
        x: &S,
        lx: &Layout,
        of: fn(&Storage) -> Option<&S>,
        wrap: fn(S) -> Storage,
        forward: impl Fn(&Sublayer, (&S, &Layout), (&S, &Layout), (&S, &Layout)) -> Result<(S, Shape)>,
    ) -> Result<(S, Shape)> {
        let device = |what: &str| candle_core::Error::Msg(format!("sublayer_chain: {what} is not on the input's device"));
        let mut inputs: Vec<Tensor> = Vec::with_capacity(self.links.len() - 1);
        for (i, link) in self.links.iter().enumerate() {
            let (ws, lw) = link.weights.storage_and_layout();
            let (vs, lv) = link.vectors.storage_and_layout();
            let w = of(&ws).ok_or_else(|| device("a link's packed weights"))?;
            let v = of(&vs).ok_or_else(|| device("a link's packed vectors"))?;
            let (y, shape) = match inputs.last() {
                None => forward(&link.op, (x, lx), (w, lw), (v, lv))?,
                Some(input) => {
                    let (s, l) = input.storage_and_layout();
                    forward(&link.op, (of(&s).ok_or_else(|| device("a link's input"))?, l), (w, lw), (v, lv))?
                }
            };
            if i + 1 == self.links.len() {
                *self.inputs.lock().unwrap_or_else(|e| e.into_inner()) = inputs;
                return Ok((y, shape));
            }
            inputs.push(Tensor::from_storage(wrap(y), shape, BackpropOp::none(), false));
        }
        unreachable!("a chain has at least two links")
    }
}

impl CustomOp1 for Chain {
    fn name(&self) -> &'static str {
        "sublayer_chain"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        fn of(s: &Storage) -> Option<&CpuStorage> {
            match s {
                Storage::Cpu(s) => Some(s),
                _ => None,
            }
        }
        self.forward(s, l, of, Storage::Cpu, |op, (x, lx), (w, lw), (v, lv)| candle_core::CustomOp3::cpu_fwd(op, x, lx, w, lw, v, lv))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        fn of(s: &Storage) -> Option<&candle_core::CudaStorage> {
            match s {
                Storage::Cuda(s) => Some(s),
                _ => None,
            }
        }
        self.forward(s, l, of, Storage::Cuda, |op, (x, lx), (w, lw), (v, lv)| candle_core::CustomOp3::cuda_fwd(op, x, lx, w, lw, v, lv))
    }

    /// Each link's backward from the last to the first, each link's input gradient the output
    /// gradient of the one before; the packs' gradients go to their sinks.
    fn bwd(&self, x: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let mut inputs = std::mem::take(&mut *self.inputs.lock().unwrap_or_else(|e| e.into_inner()));
        if inputs.len() + 1 != self.links.len() {
            candle_core::bail!("sublayer_chain_backward: the forward's link inputs are missing (a second backward, or one without a forward)");
        }
        let mut grad = grad.clone();
        for (i, link) in self.links.iter().enumerate().rev() {
            // The last input kept is this link's (the first link's is the chain's own); taking
            // it frees it as soon as the link's backward is done.
            let kept = if i == 0 { None } else { inputs.pop() };
            let input = kept.as_ref().unwrap_or(x);
            // (The link op's backward does not read its output, so the chain's stands in.)
            let (dx, _, _) = candle_core::CustomOp3::bwd(&link.op, input, &link.weights, &link.vectors, res, &grad)?;
            // What the link's forward kept is spent: freed now rather than with the graph, so
            // that the gradients the backward allocates next can reuse it.
            *link.op.saved.lock().unwrap_or_else(|e| e.into_inner()) = None;
            grad = dx.ok_or_else(|| candle_core::Error::Msg(format!("sublayer_chain_backward: link {i} gave no input gradient")))?;
        }
        Ok(Some(grad))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use candle_core::{DType, Tensor, Var};

    use crate::test_util::rand;
    use crate::{PackGradSink, PackedSublayer, SparseNeighbors, SublayerLink};

    /// A link's packs as leaves, with the sink the one op gives their gradients to.
    struct Packs {
        weights: Var,
        vectors: Var,
        sink: PackGradSink,
    }

    impl Packs {
        fn new(weights: usize, vectors: usize, seed: u64, dtype: DType) -> Self {
            let var = |n: usize, seed: u64, scale: f64| Var::from_tensor(&(rand(&[n], seed) * scale).unwrap().to_dtype(dtype).unwrap()).unwrap();
            // Weights about 1 / sqrt(fan-in), so that four links keep the activations near 1.
            Self { weights: var(weights, seed, 0.3), vectors: var(vectors, seed + 1, 1.0), sink: PackGradSink::new() }
        }
        fn pack(&self) -> PackedSublayer<'_> {
            PackedSublayer { weights: &self.weights, vectors: &self.vectors, sink: Some(&self.sink) }
        }
    }

    /// The output, the input's gradient and every pack's gradients (delivered from the sinks) of
    /// `sum(out * cot)`, with the links chained (`chain`) or applied one by one.
    fn run(x: &Var, links: &[SublayerLink], packs: &[&Packs], cot: &Tensor, chain: bool) -> Vec<Vec<f64>> {
        // (Planned twice when chained: each plan makes its own link ops, nothing is run.)
        assert!(!chain || super::Chain::plan(x, links).unwrap().is_some(), "the links did not make a chain");
        let y = if chain { super::sublayer_chain(x, links).unwrap() } else { links.iter().fold(x.as_tensor().clone(), |x, l| l.apply(&x).unwrap()) };
        let mut grads = (&y * cot).unwrap().sum_all().unwrap().backward().unwrap();
        let values = |t: &Tensor| t.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let mut out = vec![values(&y), values(grads.get(x).expect("the input's gradient"))];
        for p in packs {
            assert!(grads.get(&p.weights).is_none(), "candle accumulated a pack's gradient although its sink took it");
            p.sink.deliver(&p.weights, &p.vectors, &mut grads).unwrap();
            out.push(values(grads.get(&p.weights).expect("a delivered gradient")));
            out.push(values(grads.get(&p.vectors).expect("a delivered gradient")));
        }
        out
    }

    /// A conv stage's links (conv, MLP, conv, MLP on the sparse rows of a 75% mask) and a
    /// transformer stage's (attention, MLP, attention, MLP), chained and one by one, in f64 and
    /// f32: the same bits, forward, the input's gradient and every pack's.
    #[test]
    fn a_chain_gives_the_links_values_and_gradients_to_the_bit() {
        let (images, side, cell, c, k, hidden) = (2u32, 8u32, 2u32, 6usize, 5usize, 10usize);
        let positions = crate::agreement::visible_positions(images, side, cell);
        let nbrs = Arc::new(SparseNeighbors::from_positions(&positions, images as usize, side as usize, side as usize, k).unwrap());
        for dtype in [DType::F64, DType::F32] {
            let var = |shape: &[usize], seed: u64| Var::from_tensor(&(rand(shape, seed) * 2.0).unwrap().to_dtype(dtype).unwrap()).unwrap();
            // Conv stage.
            let rows = nbrs.rows();
            let conv = [Packs::new(2 * c * c + c * k * k, 5 * c, 60, dtype), Packs::new(2 * hidden * c, 3 * c + hidden, 62, dtype)];
            let conv2 = [Packs::new(2 * c * c + c * k * k, 5 * c, 64, dtype), Packs::new(2 * hidden * c, 3 * c + hidden, 66, dtype)];
            let links = [
                SublayerLink::Conv { pack: conv[0].pack(), eps: 1e-5, neighbours: &nbrs },
                SublayerLink::Mlp { pack: conv[1].pack(), eps: 1e-5, hidden },
                SublayerLink::Conv { pack: conv2[0].pack(), eps: 1e-5, neighbours: &nbrs },
                SublayerLink::Mlp { pack: conv2[1].pack(), eps: 1e-5, hidden },
            ];
            let packs = [&conv[0], &conv[1], &conv2[0], &conv2[1]];
            let x = var(&[rows, c], 70);
            let cot = rand(&[rows, c], 71).to_dtype(dtype).unwrap();
            crate::with_path(crate::Path::Kernels, || assert_eq!(run(&x, &links, &packs, &cot, true), run(&x, &links, &packs, &cot, false), "conv stage {dtype:?}"));
            // Transformer stage.
            let (b, n, d, heads) = (2, 9, 8, 2);
            let blocks = [Packs::new(3 * d * d + d * d, 6 * d, 80, dtype), Packs::new(2 * hidden * d, 3 * d + hidden, 82, dtype), Packs::new(3 * d * d + d * d, 6 * d, 84, dtype), Packs::new(2 * hidden * d, 3 * d + hidden, 86, dtype)];
            let links = [
                SublayerLink::Attention { pack: blocks[0].pack(), eps: 1e-6, heads },
                SublayerLink::Mlp { pack: blocks[1].pack(), eps: 1e-6, hidden },
                SublayerLink::Attention { pack: blocks[2].pack(), eps: 1e-6, heads },
                SublayerLink::Mlp { pack: blocks[3].pack(), eps: 1e-6, hidden },
            ];
            let packs = [&blocks[0], &blocks[1], &blocks[2], &blocks[3]];
            let x = var(&[b, n, d], 90);
            let cot = rand(&[b, n, d], 91).to_dtype(dtype).unwrap();
            crate::with_path(crate::Path::Kernels, || assert_eq!(run(&x, &links, &packs, &cot, true), run(&x, &links, &packs, &cot, false), "transformer stage {dtype:?}"));
        }
    }

    /// The chain runs as one op only where every link does with a sink: candle's graph then has
    /// no node between the links (its backward reaches the chain's input once). A link without a
    /// sink, a single link, or the composite path give the links one by one.
    #[test]
    fn a_chain_is_one_op_only_where_every_link_has_its_one_op_and_a_sink() {
        let (b, n, d, hidden) = (2, 5, 4, 6);
        let x = Var::from_tensor(&rand(&[b, n, d], 1)).unwrap();
        let packs = [Packs::new(2 * hidden * d, 3 * d + hidden, 2, DType::F64), Packs::new(2 * hidden * d, 3 * d + hidden, 4, DType::F64)];
        let link = |i: usize, sink: bool| SublayerLink::Mlp { pack: PackedSublayer { sink: sink.then_some(&packs[i].sink), ..packs[i].pack() }, eps: 1e-6, hidden };
        let is_chain = |links: &[SublayerLink], path: crate::Path| crate::with_path(path, || super::Chain::plan(&x, links).unwrap().is_some());
        assert!(is_chain(&[link(0, true), link(1, true)], crate::Path::Kernels));
        assert!(!is_chain(&[link(0, true), link(1, false)], crate::Path::Kernels));
        assert!(!is_chain(&[link(0, true)], crate::Path::Kernels));
        assert!(!is_chain(&[link(0, true), link(1, true)], crate::Path::Composite));
        // One by one, the links still give the chain's values (the second link's packs'
        // gradients returned to candle, not sunk).
        let y = crate::with_path(crate::Path::Kernels, || super::sublayer_chain(&x, &[link(0, true), link(1, false)]).unwrap());
        let z = crate::with_path(crate::Path::Kernels, || super::sublayer_chain(&x, &[link(0, true), link(1, true)]).unwrap());
        assert_eq!(y.flatten_all().unwrap().to_vec1::<f64>().unwrap(), z.flatten_all().unwrap().to_vec1::<f64>().unwrap());
        // A link whose pack does not fit is named.
        let short = Tensor::zeros(3, DType::F64, &candle_core::Device::Cpu).unwrap();
        let bad = SublayerLink::Mlp { pack: PackedSublayer { weights: &short, vectors: &short, sink: None }, eps: 1e-6, hidden };
        let e = super::sublayer_chain(&x, &[link(0, true), bad]).unwrap_err().to_string();
        assert!(e.contains("mlp_residual") && e.contains("packed weights [3]"), "{e}");
    }
}
