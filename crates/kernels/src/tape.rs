//! A record of one forward's ops (`record`), so that its backward runs each op's backward once
//! without candle's bookkeeping (`Tape::backward`).
//!
//! Why: candle's backward starts the gradient of every op input at zeros and adds each
//! contribution to it (`GradStore::or_insert`, then an add), even where a gradient has one
//! contribution, which is nearly everywhere in ConvMAE's pretraining graph; and it does so for
//! inputs that need no gradient too (a custom op's backward returns them all). Each costs an
//! allocation and a fill of the tensor's size and an add reading two and writing one, on the
//! device and in host work. Its graph cannot be walked from outside candle (`Tensor::op` is
//! crate-private), so our op entry points record themselves here while a recording is on: the
//! same op object candle's graph holds, its inputs and its output. The tape's backward hands
//! an input its first gradient as it is, adds only a second one, and skips inputs no variable
//! is upstream of. The values are candle's to the bit wherever no input has more than two
//! gradients, as in the pretraining graph (tests compare them): the same backward ops, a kept
//! first gradient is candle's 0 + g (but for the sign of a zero), and two gradients add the same
//! either way round. With three or more, the adds may come in another order than candle's.
//!
//! The tape is used only where it covers the graph (`Tape::covers`): every op node between
//! the root and its variables that candle's graph holds (`Tensor::sorted_nodes`, public) must
//! be an op the tape recorded. An op that does not record itself (candle's own, a composition
//! run in place of one of ours) leaves a node the tape lacks, and the caller falls back to
//! candle's backward. Candle still builds its graph during a recorded forward (that is what
//! `covers` reads, and it holds the same tensors the tape does), so nothing else changes.

use std::cell::RefCell;
use std::collections::hash_map::Entry as MapEntry;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use candle_core::backprop::GradStore;
use candle_core::{CustomOp1, CustomOp2, CustomOp3, DType, Device, Result, Tensor, TensorId};

type Op1 = Arc<Box<dyn CustomOp1 + Send + Sync>>;
type Op2 = Arc<Box<dyn CustomOp2 + Send + Sync>>;
type Op3 = Arc<Box<dyn CustomOp3 + Send + Sync>>;

/// How a recorded output was made from its inputs.
enum Step {
    One { op: Op1, x: Tensor },
    Two { op: Op2, a: Tensor, b: Tensor },
    Three { op: Op3, a: Tensor, b: Tensor, c: Tensor },
    /// `a + b`, same shapes (candle's add): the gradient goes to both unchanged.
    Add { a: Tensor, b: Tensor },
}

struct Recorded {
    step: Step,
    out: Tensor,
}

/// The ops of one forward in the order they ran, those with an input a variable is upstream of.
#[derive(Default)]
pub struct Tape {
    steps: Vec<Recorded>,
    /// The outputs recorded (every one of them has a variable upstream).
    outputs: HashSet<TensorId>,
}

thread_local! {
    static RECORDING: RefCell<Option<Tape>> = const { RefCell::new(None) };
}

/// Runs `f` with its ops (ours, and `add`) recorded on a tape of this thread, and returns the
/// tape with `f`'s result. A recording already on is set aside for `f` and restored after it,
/// also when `f` panics.
pub fn record<R>(f: impl FnOnce() -> R) -> (R, Tape) {
    struct Restore(Option<Tape>);
    impl Drop for Restore {
        fn drop(&mut self) {
            let outer = self.0.take();
            RECORDING.with(|r| *r.borrow_mut() = outer);
        }
    }
    let restore = Restore(RECORDING.with(|r| r.borrow_mut().replace(Tape::default())));
    let result = f();
    let tape = RECORDING.with(|r| r.borrow_mut().take()).unwrap_or_default();
    drop(restore);
    (result, tape)
}

/// `record`, where `CONVMAE_COMPOSITE_OPS` (or `with_composite_ops`) does not list
/// `tape_backward`; else `f` alone, without a tape, for candle's backward (the A/B, and the GPU
/// check's safety valve).
pub fn record_unless_switched_off<R>(f: impl FnOnce() -> R) -> (R, Option<Tape>) {
    if crate::composite::sent_to_composite("tape_backward") {
        return (f(), None);
    }
    let (r, tape) = record(f);
    (r, Some(tape))
}

/// Records `out = step(inputs)` on the tape being recorded, if any and if a variable is upstream
/// of one of `inputs` (else nothing flows back through it).
fn push(inputs: &[&Tensor], out: &Tensor, step: impl FnOnce() -> Step) {
    RECORDING.with(|r| {
        if let Some(tape) = r.borrow_mut().as_mut() {
            if inputs.iter().any(|t| tape.needs_grad(t)) {
                tape.outputs.insert(out.id());
                tape.steps.push(Recorded { step: step(), out: out.clone() });
            }
        }
    })
}

/// `x.apply_op1(op)`, recorded.
pub(crate) fn apply1(x: &Tensor, op: impl CustomOp1 + Send + Sync + 'static) -> Result<Tensor> {
    let op: Op1 = Arc::new(Box::new(op));
    let out = x.apply_op1_arc(op.clone())?;
    push(&[x], &out, || Step::One { op, x: x.clone() });
    Ok(out)
}

/// `a.apply_op2(b, op)`, recorded.
pub(crate) fn apply2(a: &Tensor, b: &Tensor, op: impl CustomOp2 + Send + Sync + 'static) -> Result<Tensor> {
    let op: Op2 = Arc::new(Box::new(op));
    let out = a.apply_op2_arc(b, op.clone())?;
    push(&[a, b], &out, || Step::Two { op, a: a.clone(), b: b.clone() });
    Ok(out)
}

/// `a.apply_op3(b, c, op)`, recorded.
pub(crate) fn apply3(a: &Tensor, b: &Tensor, c: &Tensor, op: impl CustomOp3 + Send + Sync + 'static) -> Result<Tensor> {
    let op: Op3 = Arc::new(Box::new(op));
    let out = a.apply_op3_arc(b, c, op.clone())?;
    push(&[a, b, c], &out, || Step::Three { op, a: a.clone(), b: b.clone(), c: c.clone() });
    Ok(out)
}

/// `a + b` (the same shapes), recorded: the model's sums of branches.
pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let out = a.add(b)?;
    push(&[a, b], &out, || Step::Add { a: a.clone(), b: b.clone() });
    Ok(out)
}

impl Tape {
    /// Whether a variable is upstream of `t`, as far as this tape knows: `t` is one, or the
    /// output of a recorded op.
    fn needs_grad(&self, t: &Tensor) -> bool {
        t.is_variable() || self.outputs.contains(&t.id())
    }

    /// The number of ops recorded.
    pub fn len(&self) -> usize {
        self.steps.len()
    }

    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }

    /// Whether every op node of candle's graph between `root` and its variables is an op this
    /// tape recorded, `root` included: then `backward` computes what candle's backward would.
    pub fn covers(&self, root: &Tensor) -> bool {
        self.outputs.contains(&root.id()) && root.sorted_nodes().iter().all(|n| n.is_variable() || self.outputs.contains(&n.id()))
    }

    /// The gradients of the variables upstream of `root` for `seed`, the gradient of `root`
    /// (shaped like it): the recorded ops' backwards from the last to the first, each input's
    /// first gradient taken as it is and later ones added to it. `root` must be covered
    /// (`covers`), or this is an error naming what is not.
    pub fn backward(&self, root: &Tensor, seed: Tensor) -> Result<GradStore> {
        Ok(self.backward_counted(root, seed)?.0)
    }

    /// `backward`, with what it did with the gradients the ops' backwards returned.
    pub fn backward_counted(&self, root: &Tensor, seed: Tensor) -> Result<(GradStore, GradientCounts)> {
        if !self.covers(root) {
            candle_core::bail!("tape backward: the tape does not cover the graph of the root (an op of candle's, or a composition, between it and its variables); use candle's backward");
        }
        if seed.shape() != root.shape() {
            candle_core::bail!("tape backward: seed {:?} for a root of shape {:?}", seed.dims(), root.dims());
        }
        let mut pending: HashMap<TensorId, (Tensor, Tensor)> = HashMap::new();
        pending.insert(root.id(), (root.clone(), seed));
        let mut counts = GradientCounts::default();
        for r in self.steps.iter().rev() {
            // An output nothing downstream of `root`'s graph reached: not on its path.
            let Some((_, grad)) = pending.remove(&r.out.id()) else { continue };
            // As candle does: the backward's own ops build no graph.
            let grad = grad.detach();
            match &r.step {
                Step::One { op, x } => {
                    let gx = op.bwd(x, &r.out, &grad)?;
                    self.accumulate(&mut pending, &mut counts, x, gx)?;
                }
                Step::Two { op, a, b } => {
                    let (ga, gb) = op.bwd(a, b, &r.out, &grad)?;
                    self.accumulate(&mut pending, &mut counts, a, ga)?;
                    self.accumulate(&mut pending, &mut counts, b, gb)?;
                }
                Step::Three { op, a, b, c } => {
                    let (ga, gb, gc) = op.bwd(a, b, c, &r.out, &grad)?;
                    self.accumulate(&mut pending, &mut counts, a, ga)?;
                    self.accumulate(&mut pending, &mut counts, b, gb)?;
                    self.accumulate(&mut pending, &mut counts, c, gc)?;
                }
                Step::Add { a, b } => {
                    self.accumulate(&mut pending, &mut counts, a, Some(grad.clone()))?;
                    self.accumulate(&mut pending, &mut counts, b, Some(grad))?;
                }
            }
        }
        // What is left are the variables' gradients: every recorded output was taken above,
        // after all its consumers (recorded later) had given theirs.
        let mut grads = empty_grad_store()?;
        for (_, (t, g)) in pending {
            grads.insert(&t, g);
        }
        Ok((grads, counts))
    }

    /// Adds `g`, a gradient of `t`, to what `t` has (or gives it `g` as it is), where a variable
    /// is upstream of `t`.
    fn accumulate(&self, pending: &mut HashMap<TensorId, (Tensor, Tensor)>, counts: &mut GradientCounts, t: &Tensor, g: Option<Tensor>) -> Result<()> {
        let Some(g) = g else { return Ok(()) };
        if !self.needs_grad(t) {
            counts.skipped += 1;
            counts.filled_elements += t.elem_count();
            return Ok(());
        }
        match pending.entry(t.id()) {
            MapEntry::Vacant(v) => {
                counts.taken += 1;
                counts.filled_elements += t.elem_count();
                v.insert((t.clone(), g));
            }
            MapEntry::Occupied(mut o) => {
                counts.added += 1;
                let sum = (&o.get().1 + &g)?;
                o.get_mut().1 = sum;
            }
        }
        Ok(())
    }
}

/// What a tape's backward did with the gradients its ops' backwards returned: `taken`, an
/// input's first, kept as it is; `added`, a later one, added to it; `skipped`, one for an input
/// no variable is upstream of. Candle's backward adds every one of them (`taken + added +
/// skipped` adds) to a gradient it zero-filled for each distinct input among them: the taken
/// and skipped ones' inputs, of `filled_elements` elements in all (where those are distinct).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct GradientCounts {
    pub taken: usize,
    pub added: usize,
    pub skipped: usize,
    pub filled_elements: usize,
}

/// An empty `GradStore` (candle's constructor is crate-private): the backward of a scalar that
/// tracks nothing holds only that scalar's own seed, which is taken out. On the CPU: no device
/// work.
fn empty_grad_store() -> Result<GradStore> {
    let scalar = Tensor::zeros((), DType::F32, &Device::Cpu)?;
    let mut grads = scalar.backward()?;
    grads.remove(&scalar);
    Ok(grads)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::rand;
    use candle_core::Var;

    fn values(t: &Tensor) -> Vec<f64> {
        t.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap()
    }

    /// A small graph of our ops with a branch (one tensor into two ops), a sum of branches,
    /// an op with an input no variable is upstream of, and a parameter used twice.
    fn graph(x: &Var, w: &Var, b: &Var, ln: (&Var, &Var), constant: &Tensor) -> Result<Tensor> {
        let h = crate::linear(x.as_tensor(), w.as_tensor(), b.as_tensor())?;
        let n = crate::layer_norm(&h, ln.0.as_tensor(), ln.1.as_tensor(), 1e-5)?;
        let g = crate::gelu_erf(&n)?;
        let branch = crate::linear(&g, w.as_tensor(), b.as_tensor())?;
        let s = add(&add(&g, &branch)?, &h)?;
        // The constant's linear: no variable upstream of its input, but of its weights.
        let c = crate::linear(constant, w.as_tensor(), b.as_tensor())?;
        add(&s, &c)
    }

    fn inputs(dtype: DType) -> (Var, Var, Var, (Var, Var), Tensor, Tensor) {
        let var = |shape: &[usize], seed: u64| Var::from_tensor(&rand(shape, seed).to_dtype(dtype).unwrap()).unwrap();
        let (x, w, b) = (var(&[6, 8], 1), var(&[8, 8], 2), var(&[8], 3));
        let ln = (var(&[8], 4), var(&[8], 5));
        let constant = rand(&[6, 8], 6).to_dtype(dtype).unwrap();
        let cot = rand(&[6, 8], 7).to_dtype(dtype).unwrap();
        (x, w, b, ln, constant, cot)
    }

    /// The tape's gradients are candle's, to the bit (f32 and f64), where the first
    /// contribution is taken as it is and a second added.
    #[test]
    fn the_tape_gives_candles_gradients_to_the_bit() {
        for dtype in [DType::F32, DType::F64] {
            let (x, w, b, ln, constant, cot) = inputs(dtype);
            let vars = [&x, &w, &b, &ln.0, &ln.1];
            // Candle's backward of sum(out * cot): the seed of out is cot, exactly.
            let out = graph(&x, &w, &b, (&ln.0, &ln.1), &constant).unwrap();
            let candle = (&out * &cot).unwrap().sum_all().unwrap().backward().unwrap();
            let (out, tape) = record(|| graph(&x, &w, &b, (&ln.0, &ln.1), &constant).unwrap());
            // Two linears on the variables' path, the norm, GELU, three adds, and the
            // constant's linear (its weights are variables).
            assert_eq!(tape.len(), 8);
            assert!(tape.covers(&out));
            let (ours, counts) = tape.backward_counted(&out, cot.clone()).unwrap();
            // Added: g's and h's second gradients (each feeds two ops), w's and b's second and
            // third (three linears); skipped: the constant's.
            // Filled by candle: eight [6, 8] tensors taken and the constant, w, b and the norm's two.
            assert_eq!(counts, GradientCounts { taken: 12, added: 6, skipped: 1, filled_elements: 9 * 48 + 64 + 3 * 8 });
            for v in vars {
                let (c, o) = (candle.get(v.as_tensor()).unwrap(), ours.get(v.as_tensor()).unwrap());
                assert_eq!(values(c), values(o), "{dtype:?}");
            }
            // Nothing but the variables: the constant and the intermediate tensors are not there.
            assert!(ours.get(&constant).is_none());
            assert_eq!(ours.get_ids().count(), vars.len());
        }
    }

    /// A node the tape did not record (candle's own op on the path) means the tape does not
    /// cover the graph, and its backward says so rather than dropping that path's gradient.
    #[test]
    fn an_op_the_tape_did_not_record_is_found() {
        let (x, w, b, ln, constant, cot) = inputs(DType::F32);
        let (out, tape) = record(|| {
            let y = graph(&x, &w, &b, (&ln.0, &ln.1), &constant).unwrap();
            // Candle's mul, not recorded.
            (&y * 2.0).unwrap()
        });
        assert!(!tape.covers(&out));
        let e = tape.backward(&out, cot).unwrap_err().to_string();
        assert!(e.contains("does not cover"), "{e}");
        // Nor does a root the tape never saw.
        let (_, empty) = record(|| ());
        assert!(empty.is_empty());
        assert!(!empty.covers(&out));
    }

    /// Outside a recording nothing is kept; a recording inside another is its own, and the outer
    /// one goes on after it (also after a panic).
    #[test]
    fn recordings_nest_and_restore() {
        let (x, w, b, ..) = inputs(DType::F32);
        let _ = crate::linear(x.as_tensor(), w.as_tensor(), b.as_tensor()).unwrap();
        let (inner, outer) = record(|| {
            let _ = crate::linear(x.as_tensor(), w.as_tensor(), b.as_tensor()).unwrap();
            let (_, inner) = record(|| crate::linear(x.as_tensor(), w.as_tensor(), b.as_tensor()).unwrap());
            let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| record(|| panic!("inside"))));
            assert!(caught.is_err());
            let _ = crate::linear(x.as_tensor(), w.as_tensor(), b.as_tensor()).unwrap();
            inner
        });
        assert_eq!((inner.len(), outer.len()), (1, 2));
        RECORDING.with(|r| assert!(r.borrow().is_none()));
    }

    /// A seed of another shape than the root's is refused, naming both.
    #[test]
    fn a_seed_of_the_wrong_shape_is_refused() {
        let (x, w, b, ..) = inputs(DType::F32);
        let (out, tape) = record(|| crate::linear(x.as_tensor(), w.as_tensor(), b.as_tensor()).unwrap());
        let e = tape.backward(&out, Tensor::ones(3, DType::F32, &Device::Cpu).unwrap()).unwrap_err().to_string();
        assert!(e.contains("seed [3]") && e.contains("[6, 8]"), "{e}");
    }
}
