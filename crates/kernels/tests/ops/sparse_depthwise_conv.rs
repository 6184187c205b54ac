use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use convmae_kernels::reference::{
    sparse_depthwise_conv2d_backward, sparse_depthwise_conv2d_forward,
};
use convmae_kernels::{depthwise_conv2d, sparse_depthwise_conv2d, SparseNeighbors, VisibleTokens};

use crate::common::*;

/// Which positions of a `[b, h, w]` grid are visible.
#[derive(Clone, Copy, Debug)]
enum Mask {
    /// Each position independently with this probability.
    Random(f64),
    /// Square blocks of this side (ConvMAE's token blocks), each visible with the probability.
    Blocks(usize, f64),
    AllVisible,
    /// Only one position in the whole batch.
    OneVisible,
}

#[derive(Clone, Copy, Debug)]
struct Case {
    b: usize,
    h: usize,
    w: usize,
    c: usize,
    k: usize,
    mask: Mask,
}

const fn case(b: usize, h: usize, w: usize, c: usize, k: usize, mask: Mask) -> Case {
    Case { b, h, w, c, k, mask }
}

/// Sizes that are multiples of nothing, images smaller than the kernel, K = 5 / 3 / 1 / 7,
/// channel counts exercising the 16-lane blocks, the scalar tail and both.
const CASES: &[Case] = &[
    case(2, 7, 9, 5, 5, Mask::Random(0.5)),
    case(3, 11, 13, 20, 3, Mask::Random(0.3)),
    case(2, 9, 7, 33, 5, Mask::Random(0.8)),
    case(1, 2, 3, 4, 5, Mask::Random(0.6)),
    case(2, 1, 1, 3, 5, Mask::Random(0.5)),
    case(2, 10, 11, 16, 5, Mask::Blocks(2, 0.4)),
    case(1, 13, 12, 17, 3, Mask::Blocks(4, 0.5)),
    case(2, 6, 7, 18, 5, Mask::AllVisible),
    case(1, 3, 4, 2, 3, Mask::AllVisible),
    case(2, 5, 6, 19, 5, Mask::OneVisible),
    case(1, 4, 4, 7, 3, Mask::OneVisible),
    case(1, 3, 3, 2, 1, Mask::Random(0.7)),
    case(1, 6, 5, 17, 7, Mask::Random(0.5)),
];

fn make_mask(rng: &mut Rng, b: usize, h: usize, w: usize, mask: Mask) -> Vec<bool> {
    let coin = |rng: &mut Rng, p: f64| (rng.uniform() + 1.0) / 2.0 < p;
    let n = b * h * w;
    let mut keep = match mask {
        Mask::Random(p) => (0..n).map(|_| coin(rng, p)).collect(),
        Mask::Blocks(s, p) => {
            let (bh, bw) = (h.div_ceil(s), w.div_ceil(s));
            let blocks: Vec<bool> = (0..b * bh * bw).map(|_| coin(rng, p)).collect();
            let mut keep = vec![false; n];
            for bi in 0..b {
                for y in 0..h {
                    for x in 0..w {
                        keep[(bi * h + y) * w + x] = blocks[(bi * bh + y / s) * bw + x / s];
                    }
                }
            }
            keep
        }
        Mask::AllVisible => vec![true; n],
        Mask::OneVisible => {
            let mut keep = vec![false; n];
            keep[rng.next_u64() as usize % n] = true;
            keep
        }
    };
    if !keep.iter().any(|&v| v) {
        keep[rng.next_u64() as usize % n] = true;
    }
    keep
}

fn shuffle<T>(rng: &mut Rng, v: &mut [T]) {
    for i in (1..v.len()).rev() {
        v.swap(i, rng.next_u64() as usize % (i + 1));
    }
}

/// The visible positions in a random row order (the kernels must not depend on raster order).
fn visible_positions(rng: &mut Rng, keep: &[bool], h: usize, w: usize) -> Vec<(u32, u32, u32)> {
    let mut pos: Vec<(u32, u32, u32)> = (0..keep.len())
        .filter(|&i| keep[i])
        .map(|i| ((i / (h * w)) as u32, (i / w % h) as u32, (i % w) as u32))
        .collect();
    shuffle(rng, &mut pos);
    pos
}

/// The rows of a dense `[b, h, w, c]` map at `positions`, as `[positions.len(), c]`.
fn gather_rows(
    dense: &[f64],
    positions: &[(u32, u32, u32)],
    h: usize,
    w: usize,
    c: usize,
) -> Vec<f64> {
    positions
        .iter()
        .flat_map(|&(b, y, x)| {
            let p = ((b as usize * h + y as usize) * w + x as usize) * c;
            dense[p..p + c].iter().copied()
        })
        .collect()
}

/// A random sparse problem: the neighbour table, sparse inputs `[N, C]` and `[C, K, K]`, and a
/// cotangent `[N, C]`.
struct Problem {
    nbrs: Arc<SparseNeighbors>,
    inputs: Vec<Input>,
    cot: Vec<f64>,
}

fn problem(cs: Case, dtype: DType, seed: u64) -> Problem {
    let mut rng = Rng::new(seed);
    let keep = make_mask(&mut rng, cs.b, cs.h, cs.w, cs.mask);
    let pos = visible_positions(&mut rng, &keep, cs.h, cs.w);
    let nbrs = Arc::new(SparseNeighbors::from_positions(&pos, cs.b, cs.h, cs.w, cs.k).unwrap());
    let n = pos.len();
    let x = rng.values(n * cs.c, 1.0, dtype);
    let wt = rng.values(cs.c * cs.k * cs.k, 0.5, dtype);
    let cot = rng.values(n * cs.c, 1.0, dtype);
    Problem { nbrs, inputs: vec![(x, vec![n, cs.c]), (wt, vec![cs.c, cs.k, cs.k])], cot }
}

fn sparse(nbrs: &Arc<SparseNeighbors>) -> impl Fn(&[Tensor]) -> candle_core::Result<Tensor> + '_ {
    move |ts| sparse_depthwise_conv2d(&ts[0], &ts[1], nbrs)
}

fn check_against_dense(dtype: DType, rtol: f64) {
    for (n, &cs) in CASES.iter().enumerate() {
        let Case { b, h, w, c, k, .. } = cs;
        let mut rng = Rng::new(500 + n as u64);
        let keep = make_mask(&mut rng, b, h, w, cs.mask);
        let pos = visible_positions(&mut rng, &keep, h, w);
        let nbrs = Arc::new(SparseNeighbors::from_positions(&pos, b, h, w, k).unwrap());
        // Dense input zero at masked positions, cotangent supported on visible positions only.
        let mut x = rng.values(b * h * w * c, 1.0, dtype);
        let wt = rng.values(c * k * k, 0.5, dtype);
        let mut cot = rng.values(b * h * w * c, 1.0, dtype);
        for (i, &visible) in keep.iter().enumerate() {
            if !visible {
                x[i * c..(i + 1) * c].fill(0.0);
                cot[i * c..(i + 1) * c].fill(0.0);
            }
        }
        let dense_in = vec![(x.clone(), vec![b, h, w, c]), (wt.clone(), vec![c, k, k])];
        let (out_d, g_d) =
            forward_backward(&dense_in, dtype, &cot, |ts| depthwise_conv2d(&ts[0], &ts[1]));
        let rows = |v: &[f64]| gather_rows(v, &pos, h, w, c);
        let sparse_in = vec![(rows(&x), vec![pos.len(), c]), (wt, vec![c, k, k])];
        let (out_s, g_s) = forward_backward(&sparse_in, dtype, &rows(&cot), sparse(&nbrs));
        let what = format!("{dtype:?} {cs:?} ({} visible rows)", pos.len());
        assert_close(&out_s, &rows(&out_d), rtol, &format!("forward vs dense, {what}"));
        assert_close(&g_s[0], &rows(&g_d[0]), rtol, &format!("grad input vs dense, {what}"));
        assert_close(&g_s[1], &g_d[1], rtol, &format!("grad weight vs dense, {what}"));
    }
}

#[test]
fn sparse_conv_matches_dense_masked_conv_f64() {
    check_against_dense(DType::F64, 1e-12);
}

#[test]
fn sparse_conv_matches_dense_masked_conv_f32() {
    check_against_dense(DType::F32, 1e-5);
}

fn check_against_reference(dtype: DType, rtol: f64) {
    for (n, &cs) in CASES.iter().enumerate() {
        let p = problem(cs, dtype, 100 + n as u64);
        let (x, wt, table) = (&p.inputs[0].0, &p.inputs[1].0, p.nbrs.table());
        let (out, grads) = forward_backward(&p.inputs, dtype, &p.cot, sparse(&p.nbrs));
        let want = sparse_depthwise_conv2d_forward(x, wt, table, cs.c, cs.k);
        assert_close(&out, &want, rtol, &format!("{dtype:?} forward {cs:?}"));
        let (gx, gw) = sparse_depthwise_conv2d_backward(x, wt, &p.cot, table, cs.c, cs.k);
        assert_close(&grads[0], &gx, rtol, &format!("{dtype:?} grad input {cs:?}"));
        assert_close(&grads[1], &gw, rtol, &format!("{dtype:?} grad weight {cs:?}"));
    }
}

#[test]
fn sparse_conv_forward_and_backward_match_reference_f64() {
    check_against_reference(DType::F64, 1e-12);
}

#[test]
fn sparse_conv_forward_and_backward_match_reference_f32() {
    check_against_reference(DType::F32, 1e-5);
}

#[test]
fn sparse_conv_gradients_match_finite_differences() {
    for cs in [
        case(2, 5, 6, 3, 5, Mask::Random(0.6)),
        case(1, 4, 5, 18, 3, Mask::Random(0.5)),
        case(1, 2, 3, 2, 5, Mask::AllVisible),
    ] {
        let p = problem(cs, DType::F64, 7);
        let (_, grads) = forward_backward(&p.inputs, DType::F64, &p.cot, sparse(&p.nbrs));
        let fd = finite_differences(&p.inputs, &p.cot, sparse(&p.nbrs));
        assert_close(&grads[0], &fd[0], 1e-6, &format!("grad input vs finite differences {cs:?}"));
        assert_close(&grads[1], &fd[1], 1e-6, &format!("grad weight vs finite differences {cs:?}"));
    }
}

#[test]
fn sparse_conv_is_bitwise_reproducible_across_thread_counts() {
    // ~680 rows (22 weight-gradient partials of 32 rows) and ~2500 rows (the partial count
    // capped, 40 rows each); many row chunks in the gathers.
    let cases =
        [case(3, 17, 19, 40, 5, Mask::Random(0.7)), case(4, 30, 30, 20, 5, Mask::Random(0.7))];
    for (cs, dtype) in cases.iter().flat_map(|&cs| [(cs, DType::F32), (cs, DType::F64)]) {
        let p = problem(cs, dtype, 13);
        let runs: Vec<_> = [1, 3, 2, 1]
            .iter()
            .map(|&t| {
                with_threads(t, || forward_backward(&p.inputs, dtype, &p.cot, sparse(&p.nbrs)))
            })
            .collect();
        for run in &runs[1..] {
            assert_eq!(bits(&run.0), bits(&runs[0].0), "{dtype:?} {cs:?} forward bits");
            assert_eq!(bits(&run.1[0]), bits(&runs[0].1[0]), "{dtype:?} {cs:?} grad input bits");
            assert_eq!(bits(&run.1[1]), bits(&runs[0].1[1]), "{dtype:?} {cs:?} grad weight bits");
        }
    }
}

#[test]
fn sparse_conv_accepts_strided_inputs_and_broadcast_gradients() {
    // Input built as [C, N] and transposed, weight built as [K, K, C] and permuted: neither is
    // contiguous. `sum_all` hands the op a stride-0 gradient.
    let p = problem(case(2, 6, 7, 5, 3, Mask::Random(0.6)), DType::F64, 17);
    let (n, c, k) = (p.nbrs.rows(), 5, 3);
    let mut rng = Rng::new(18);
    let x_cn = rng.values(c * n, 1.0, DType::F64);
    let w_kkc = rng.values(k * k * c, 1.0, DType::F64);
    let x_var = Var::from_tensor(&tensor(&x_cn, &[c, n], DType::F64)).unwrap();
    let w_var = Var::from_tensor(&tensor(&w_kkc, &[k, k, c], DType::F64)).unwrap();
    let x = x_var.as_tensor().t().unwrap();
    let w = w_var.as_tensor().permute((2, 0, 1)).unwrap();
    assert!(!x.is_contiguous() && !w.is_contiguous());
    let out = sparse_depthwise_conv2d(&x, &w, &p.nbrs).unwrap();
    let grads = out.sum_all().unwrap().backward().unwrap();

    let x_flat = values_of(&x.contiguous().unwrap());
    let w_flat = values_of(&w.contiguous().unwrap());
    let table = p.nbrs.table();
    let want = sparse_depthwise_conv2d_forward(&x_flat, &w_flat, table, c, k);
    assert_close(&values_of(&out), &want, 1e-12, "forward");
    let ones = vec![1.0; out.elem_count()];
    let (gx, gw) = sparse_depthwise_conv2d_backward(&x_flat, &w_flat, &ones, table, c, k);
    let gx_nc = grads.get(x_var.as_tensor()).unwrap().t().unwrap();
    let gw_kkc = grads.get(w_var.as_tensor()).unwrap().permute((2, 0, 1)).unwrap();
    assert_close(&values_of(&gx_nc.contiguous().unwrap()), &gx, 1e-12, "grad input");
    assert_close(&values_of(&gw_kkc.contiguous().unwrap()), &gw, 1e-12, "grad weight");
}

#[test]
fn sparse_conv_skips_gradient_of_a_constant_weight() {
    let p = problem(case(1, 5, 5, 4, 3, Mask::Random(0.5)), DType::F64, 19);
    let x = Var::from_tensor(&tensor(&p.inputs[0].0, &p.inputs[0].1, DType::F64)).unwrap();
    let w = tensor(&p.inputs[1].0, &p.inputs[1].1, DType::F64);
    let out = sparse_depthwise_conv2d(x.as_tensor(), &w, &p.nbrs).unwrap();
    let loss = (&out * &tensor(&p.cot, &p.inputs[0].1, DType::F64)).unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    assert!(grads.get(&w).is_none());
    let (gx, _) = sparse_depthwise_conv2d_backward(
        &p.inputs[0].0,
        &p.inputs[1].0,
        &p.cot,
        p.nbrs.table(),
        4,
        3,
    );
    assert_close(&values_of(grads.get(x.as_tensor()).unwrap()), &gx, 1e-12, "grad input");
}

#[test]
fn sparse_conv_handles_zero_visible_rows() {
    let nbrs = Arc::new(SparseNeighbors::from_positions(&[], 2, 4, 4, 5).unwrap());
    assert_eq!((nbrs.rows(), nbrs.k(), nbrs.table().len()), (0, 5, 0));
    let x = Var::from_tensor(&Tensor::zeros((0, 3), DType::F32, &Device::Cpu).unwrap()).unwrap();
    let w = Var::from_tensor(&Tensor::ones((3, 5, 5), DType::F32, &Device::Cpu).unwrap()).unwrap();
    let out = sparse_depthwise_conv2d(x.as_tensor(), w.as_tensor(), &nbrs).unwrap();
    assert_eq!(out.dims(), &[0, 3]);
    let grads = out.sum_all().unwrap().backward().unwrap();
    assert_eq!(grads.get(x.as_tensor()).unwrap().dims(), &[0, 3]);
    let gw = grads.get(w.as_tensor()).unwrap();
    assert_eq!(gw.dims(), &[3, 5, 5]);
    assert!(values_of(gw).iter().all(|&v| v == 0.0));
}

#[test]
fn from_positions_builds_the_expected_table() {
    // Image 0 is 2 x 3 with (0,0), (1,1), (0,1) visible as rows 0, 1, 2; image 1 has only
    // (0,0), as row 3, which must not see image 0.
    let pos = [(0, 0, 0), (0, 1, 1), (0, 0, 1), (1, 0, 0)];
    let nbrs = SparseNeighbors::from_positions(&pos, 2, 2, 3, 3).unwrap();
    assert_eq!((nbrs.rows(), nbrs.k()), (4, 3));
    #[rustfmt::skip]
    let want = [
        -1, -1, -1,  -1, 0, 2,  -1, -1, 1,
         0,  2, -1,  -1, 1, -1, -1, -1, -1,
        -1, -1, -1,   0, 2, -1, -1, 1, -1,
        -1, -1, -1,  -1, 3, -1, -1, -1, -1,
    ];
    assert_eq!(nbrs.table(), &want);
    // The same table is accepted by `new`.
    assert_eq!(SparseNeighbors::new(4, 3, want.to_vec()).unwrap(), nbrs);
}

#[test]
fn from_positions_rejects_a_position_listed_twice() {
    let pos = [(0, 1, 2), (1, 1, 2), (0, 1, 2)];
    let Err(e) = SparseNeighbors::from_positions(&pos, 2, 3, 4, 5) else {
        panic!("a duplicated position must be an error");
    };
    let msg = e.to_string();
    assert!(msg.contains("listed twice") && msg.contains("rows 0 and 2"), "{msg}");
    assert!(msg.contains("image 0, y 1, x 2"), "{msg}");
}

fn neighbors_error(r: candle_core::Result<SparseNeighbors>) -> String {
    match r {
        Ok(n) => panic!("expected an error, got a table of {} rows", n.rows()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn sparse_neighbors_reject_bad_tables_and_positions() {
    let msg = neighbors_error(SparseNeighbors::new(2, 3, vec![-1; 17]));
    assert!(msg.contains("17 entries") && msg.contains("2 * 3 * 3"), "{msg}");
    let msg = neighbors_error(SparseNeighbors::new(2, 2, vec![-1; 8]));
    assert!(msg.contains("kernel size 2") && msg.contains("odd"), "{msg}");
    let msg = neighbors_error(SparseNeighbors::new(2, 1, vec![0, 2]));
    assert!(msg.contains("entry 2") && msg.contains("row 1") && msg.contains("0..2"), "{msg}");
    let msg = neighbors_error(SparseNeighbors::new(2, 1, vec![-2, 1]));
    assert!(msg.contains("entry -2") && msg.contains("row 0"), "{msg}");

    let msg = neighbors_error(SparseNeighbors::from_positions(&[(0, 0, 0), (0, 3, 0)], 1, 3, 4, 3));
    assert!(msg.contains("position 1") && msg.contains("outside"), "{msg}");
    let msg = neighbors_error(SparseNeighbors::from_positions(&[(2, 0, 0)], 2, 3, 4, 3));
    assert!(msg.contains("image 2") && msg.contains("outside"), "{msg}");
    let msg = neighbors_error(SparseNeighbors::from_positions(&[(0, 0, 0)], 1, 3, 4, 4));
    assert!(msg.contains("kernel size 4"), "{msg}");

    // A mask given as VisibleTokens: 2 images of a 2 x 2 grid, one token kept each.
    let tokens = |ids_keep: Vec<u32>, slot: Vec<i32>| VisibleTokens { images: 2, grid: 2, cell: 2, len_keep: 1, ids_keep, slot };
    let ok = SparseNeighbors::of_visible_tokens(tokens(vec![3, 0], vec![-1, -1, -1, 0, 0, -1, -1, -1]), 3).unwrap();
    assert_eq!((ok.rows(), ok.k()), (8, 3));
    let msg = neighbors_error(SparseNeighbors::of_visible_tokens(tokens(vec![3], vec![-1; 8]), 3));
    assert!(msg.contains("VisibleTokens") && msg.contains("1 ids_keep"), "{msg}");
    let msg = neighbors_error(SparseNeighbors::of_visible_tokens(tokens(vec![3, 4], vec![-1, -1, -1, 0, 0, -1, -1, -1]), 3));
    assert!(msg.contains("image 1") && msg.contains("ids_keep[0] = 4"), "{msg}");
    let msg = neighbors_error(SparseNeighbors::of_visible_tokens(tokens(vec![3, 0], vec![0, -1, -1, 0, 0, -1, -1, -1]), 3));
    assert!(msg.contains("3 slots for 2 visible tokens"), "{msg}");
    let msg = neighbors_error(SparseNeighbors::of_visible_tokens(tokens(vec![3, 0], vec![-1, -1, -1, 0, 0, -1, -1, -1]), 2));
    assert!(msg.contains("kernel size 2"), "{msg}");
}

#[test]
fn sparse_neighbors_check_symmetry_in_debug_builds() {
    // Row 0 sees row 1 to its right (tap (1, 2)), but row 1 does not see row 0 to its left.
    let mut table = vec![-1; 2 * 9];
    table[4] = 0;
    table[9 + 4] = 1;
    table[5] = 1;
    let result = SparseNeighbors::new(2, 3, table.clone());
    if cfg!(debug_assertions) {
        let msg = neighbors_error(result);
        assert!(msg.contains("not symmetric") && msg.contains("row 0, tap (1, 2)"), "{msg}");
        table[9 + 3] = 0;
        SparseNeighbors::new(2, 3, table).unwrap();
    } else {
        // Release builds skip the O(rows * k * k) check, as documented.
        assert!(result.is_ok());
    }
}

#[test]
fn sparse_conv_rejects_bad_shapes_and_dtypes() {
    let cpu = &Device::Cpu;
    let pos: Vec<(u32, u32, u32)> = (0..7).map(|i| (0, i / 5, i % 5)).collect();
    let nbrs = Arc::new(SparseNeighbors::from_positions(&pos, 1, 4, 5, 5).unwrap());
    let x = Tensor::zeros((7, 3), DType::F32, cpu).unwrap();
    let w = Tensor::zeros((3, 5, 5), DType::F32, cpu).unwrap();
    sparse_depthwise_conv2d(&x, &w, &nbrs).unwrap();
    for (x_shape, w_shape, texts) in [
        (vec![6, 3], vec![3, 5, 5], ["[6, 3]", "[3, 5, 5]"]),
        (vec![7, 3], vec![3, 3, 3], ["[7, 3]", "[3, 3, 3]"]),
        (vec![7, 3], vec![4, 5, 5], ["[7, 3]", "[4, 5, 5]"]),
        (vec![7, 3], vec![3, 5, 3], ["[7, 3]", "[3, 5, 3]"]),
        (vec![7, 3, 1], vec![3, 5, 5], ["[7, 3, 1]", "[3, 5, 5]"]),
        (vec![7, 3], vec![3, 25], ["[7, 3]", "[3, 25]"]),
    ] {
        let x = Tensor::zeros(x_shape, DType::F32, cpu).unwrap();
        let w = Tensor::zeros(w_shape, DType::F32, cpu).unwrap();
        let msg = error_text(sparse_depthwise_conv2d(&x, &w, &nbrs));
        assert!(msg.contains("sparse_depthwise_conv2d"), "{msg}");
        assert!(msg.contains(texts[0]) && msg.contains(texts[1]), "{msg}");
        assert!(msg.contains("7 rows") && msg.contains("kernel size 5"), "{msg}");
    }

    let (x16, w16) = (x.to_dtype(DType::F16).unwrap(), w.to_dtype(DType::F16).unwrap());
    // Half precision has no kernel of ours: it runs through the composite (see composite.rs).
    let y16 = sparse_depthwise_conv2d(&x16, &w16, &nbrs).unwrap();
    assert_eq!((y16.dtype(), y16.dims()), (DType::F16, x16.dims()));
    let w64 = w.to_dtype(DType::F64).unwrap();
    let msg = error_text(sparse_depthwise_conv2d(&x, &w64, &nbrs));
    assert!(
        msg.contains("sparse_depthwise_conv2d") && msg.contains("F32") && msg.contains("F64"),
        "{msg}"
    );
}

// ---------------------------------------------------------------------------------------------
// Timing at ConvMAE-B shapes. Ignored by default; run with
// `cargo test -p convmae-kernels --release -- --ignored --nocapture bench_sparse`.

const ITERS: usize = 15;

/// Times `f` (after one warm-up call) and returns the median in milliseconds: the build
/// machines are shared, and the median shrugs off the runs that lost their cores.
fn time_ms(mut f: impl FnMut()) -> f64 {
    f();
    let mut ms: Vec<f64> = (0..ITERS)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    ms.sort_by(f64::total_cmp);
    ms[ITERS / 2]
}

fn random_var(shape: &[usize], seed: u64) -> Var {
    let n = shape.iter().product();
    Var::from_tensor(&tensor(&Rng::new(seed).values(n, 1.0, DType::F32), shape, DType::F32))
        .unwrap()
}

/// Forward and forward+backward (seeded with ones, both arguments tracked) in ms.
fn fwd_and_fwd_bwd(f: impl Fn() -> Tensor) -> (f64, f64) {
    let fwd = time_ms(|| {
        f();
    });
    let fwd_bwd = time_ms(|| {
        f().backward().unwrap();
    });
    (fwd, fwd_bwd)
}

/// MAE-style masking on a `grid x grid` map per image: the map is cut into tokens of
/// `block x block` positions, `keep` of the tokens of each image are visible (chosen at
/// random, kept in raster token order), and each visible token contributes its block of
/// positions in raster order.
fn token_positions(
    rng: &mut Rng,
    images: usize,
    grid: usize,
    block: usize,
    keep: usize,
) -> Vec<(u32, u32, u32)> {
    let side = grid / block;
    let mut pos = Vec::with_capacity(images * keep * block * block);
    for b in 0..images {
        let mut tokens: Vec<usize> = (0..side * side).collect();
        shuffle(rng, &mut tokens);
        let mut kept = tokens[..keep].to_vec();
        kept.sort_unstable();
        for t in kept {
            let (ty, tx) = (t / side, t % side);
            for dy in 0..block {
                for dx in 0..block {
                    pos.push((b as u32, (ty * block + dy) as u32, (tx * block + dx) as u32));
                }
            }
        }
    }
    pos
}

#[test]
#[ignore]
fn bench_sparse_depthwise_conv_convmae_b() {
    // Stage 1: 56 x 56, 4 x 4 positions per 16-px token; stage 2: 28 x 28, 2 x 2 per token.
    // 49 of the 196 tokens of each image are visible (25 %).
    for (stage, grid, block, c) in [(1, 56, 4, 256), (2, 28, 2, 384)] {
        let (b, k) = (8, 5);
        let pos = token_positions(&mut Rng::new(stage), b, grid, block, 49);
        let build_ms = time_ms(|| {
            SparseNeighbors::from_positions(&pos, b, grid, grid, k).unwrap();
        });
        let nbrs = Arc::new(SparseNeighbors::from_positions(&pos, b, grid, grid, k).unwrap());
        let n = nbrs.rows();
        let xs = random_var(&[n, c], 1);
        let xd = random_var(&[b, grid, grid, c], 2);
        let wt = random_var(&[c, k, k], 3);
        let (sf, sfb) = fwd_and_fwd_bwd(|| {
            sparse_depthwise_conv2d(xs.as_tensor(), wt.as_tensor(), &nbrs).unwrap()
        });
        let (df, dfb) =
            fwd_and_fwd_bwd(|| depthwise_conv2d(xd.as_tensor(), wt.as_tensor()).unwrap());
        println!(
            "stage {stage} f32 C={c} K={k}, {} threads: sparse [{n},{c}] forward {sf:.2} ms, \
             forward+backward {sfb:.2} ms (table build {build_ms:.2} ms) | dense \
             [{b},{grid},{grid},{c}] forward {df:.2} ms, forward+backward {dfb:.2} ms | \
             speed-up {:.1}x / {:.1}x",
            rayon::current_num_threads(),
            df / sf,
            dfb / sfb
        );
        // Each gradient alone: the other argument is a constant, so its gradient is skipped.
        let (xs_const, wt_const) = (xs.as_tensor().detach(), wt.as_tensor().detach());
        let (_, gi) =
            fwd_and_fwd_bwd(|| sparse_depthwise_conv2d(xs.as_tensor(), &wt_const, &nbrs).unwrap());
        let (_, gw) =
            fwd_and_fwd_bwd(|| sparse_depthwise_conv2d(&xs_const, wt.as_tensor(), &nbrs).unwrap());
        println!("  sparse fwd+bwd: grad input only {gi:.2} ms, grad weight only {gw:.2} ms");
    }
}

/// The rows as any shape of N rows of C (here [N / 2, 2, C]) and PyTorch's [C, 1, K, K] kernel,
/// with no reshape node: the same values and gradients as [N, C] and [C, K, K], the gradients
/// shaped like the inputs; by our kernel and by the composition.
#[test]
fn sparse_conv_takes_rows_of_any_shape_and_a_four_dim_kernel() {
    let p = problem(case(2, 6, 7, 5, 3, Mask::AllVisible), DType::F64, 23);
    let (n, c, k) = (p.nbrs.rows(), 5, 3);
    assert_eq!(n % 2, 0);
    for path in [convmae_kernels::Path::Kernels, convmae_kernels::Path::Composite] {
        convmae_kernels::with_path(path, || {
            let x = Var::from_tensor(&tensor(&p.inputs[0].0, &[n / 2, 2, c], DType::F64)).unwrap();
            let w = Var::from_tensor(&tensor(&p.inputs[1].0, &[c, 1, k, k], DType::F64)).unwrap();
            let out = sparse_depthwise_conv2d(x.as_tensor(), w.as_tensor(), &p.nbrs).unwrap();
            assert_eq!(out.dims(), &[n / 2, 2, c]);
            let cot = tensor(&p.cot, &[n / 2, 2, c], DType::F64);
            let grads = (&out * &cot).unwrap().sum_all().unwrap().backward().unwrap();
            let want = sparse_depthwise_conv2d_forward(&p.inputs[0].0, &p.inputs[1].0, p.nbrs.table(), c, k);
            assert_close(&values_of(&out), &want, 1e-12, "forward");
            let (gx, gw) = sparse_depthwise_conv2d_backward(&p.inputs[0].0, &p.inputs[1].0, &p.cot, p.nbrs.table(), c, k);
            let (got_x, got_w) = (grads.get(x.as_tensor()).unwrap(), grads.get(w.as_tensor()).unwrap());
            assert_eq!((got_x.dims(), got_w.dims()), (&[n / 2, 2, c][..], &[c, 1, k, k][..]), "{path:?}");
            assert_close(&values_of(got_x), &gx, 1e-12, "grad input");
            assert_close(&values_of(got_w), &gw, 1e-12, "grad weight");
        });
    }
    // A leading shape that is not N rows is named.
    let x = tensor(&p.inputs[0].0[..(n - 1) * c], &[n - 1, c], DType::F64);
    let w = tensor(&p.inputs[1].0, &[c, 1, k, k], DType::F64);
    let e = sparse_depthwise_conv2d(&x, &w, &p.nbrs).unwrap_err().to_string();
    assert!(e.contains("sparse_depthwise_conv2d") && e.contains(&format!("[{}, {c}]", n - 1)), "{e}");
}
