//! Slow, single-threaded f64 implementations written straight from the definitions, used by
//! the tests as ground truth for the optimised kernels.
//!
//! They deliberately avoid the tricks the kernels rely on: the convolution backward scatters
//! through the forward's index map instead of using a rotated kernel, and the LayerNorm and
//! softmax backwards multiply by the explicit Jacobian instead of using the closed forms.
//! All tensors are row-major `&[f64]` with the shapes given in each function's docs.

/// Shape of a depthwise convolution: input and output `[b, h, w, c]`, weight `[c, k, k]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvDims {
    pub b: usize,
    pub h: usize,
    pub w: usize,
    pub c: usize,
    pub k: usize,
}

impl ConvDims {
    fn input_index(&self, b: usize, y: usize, x: usize, c: usize) -> usize {
        ((b * self.h + y) * self.w + x) * self.c + c
    }

    fn weight_index(&self, c: usize, i: usize, j: usize) -> usize {
        (c * self.k + i) * self.k + j
    }

    /// Calls `f(output_index, input_index, weight_index)` for every tap that reads inside the
    /// image; the forward and both gradients are written in terms of this one map.
    fn for_each_tap(&self, mut f: impl FnMut(usize, usize, usize)) {
        let p = (self.k / 2) as isize;
        for b in 0..self.b {
            for y in 0..self.h {
                for x in 0..self.w {
                    for c in 0..self.c {
                        for i in 0..self.k {
                            for j in 0..self.k {
                                let yy = y as isize + i as isize - p;
                                let xx = x as isize + j as isize - p;
                                if yy < 0 || xx < 0 || yy >= self.h as isize || xx >= self.w as isize {
                                    continue;
                                }
                                f(
                                    self.input_index(b, y, x, c),
                                    self.input_index(b, yy as usize, xx as usize, c),
                                    self.weight_index(c, i, j),
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}

/// `out[b,y,x,c] = sum_{i,j} weight[c,i,j] * input[b, y+i-k/2, x+j-k/2, c]`, zero outside.
pub fn depthwise_conv2d_forward(input: &[f64], weight: &[f64], d: ConvDims) -> Vec<f64> {
    let mut out = vec![0.0; d.b * d.h * d.w * d.c];
    d.for_each_tap(|o, i, w| out[o] += weight[w] * input[i]);
    out
}

/// Returns `(grad_input, grad_weight)` for the given gradient of the output.
pub fn depthwise_conv2d_backward(
    input: &[f64],
    weight: &[f64],
    grad_out: &[f64],
    d: ConvDims,
) -> (Vec<f64>, Vec<f64>) {
    let mut grad_input = vec![0.0; input.len()];
    let mut grad_weight = vec![0.0; weight.len()];
    d.for_each_tap(|o, i, w| {
        grad_input[i] += weight[w] * grad_out[o];
        grad_weight[w] += input[i] * grad_out[o];
    });
    (grad_input, grad_weight)
}

fn mean_rstd(row: &[f64], eps: f64) -> (f64, f64) {
    let n = row.len() as f64;
    let mean = row.iter().sum::<f64>() / n;
    let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n;
    (mean, 1.0 / (var + eps).sqrt())
}

/// LayerNorm over rows of length `d` (`x` is `[rows, d]`, weight and bias `[d]`).
pub fn layer_norm_forward(x: &[f64], weight: &[f64], bias: &[f64], d: usize, eps: f64) -> Vec<f64> {
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks(d) {
        let (mean, rstd) = mean_rstd(row, eps);
        for i in 0..d {
            out.push((row[i] - mean) * rstd * weight[i] + bias[i]);
        }
    }
    out
}

/// Returns `(grad_x, grad_weight, grad_bias)`.
///
/// grad_x uses the explicit Jacobian of the normalisation,
/// `d xhat_i / d x_j = rstd * (delta_ij - 1/d - xhat_i * xhat_j / d)`.
pub fn layer_norm_backward(
    x: &[f64],
    weight: &[f64],
    grad_out: &[f64],
    d: usize,
    eps: f64,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let mut grad_x = vec![0.0; x.len()];
    let mut grad_weight = vec![0.0; d];
    let mut grad_bias = vec![0.0; d];
    let n = d as f64;
    for (r, row) in x.chunks(d).enumerate() {
        let (mean, rstd) = mean_rstd(row, eps);
        let xhat: Vec<f64> = row.iter().map(|v| (v - mean) * rstd).collect();
        let g = &grad_out[r * d..(r + 1) * d];
        for i in 0..d {
            grad_weight[i] += g[i] * xhat[i];
            grad_bias[i] += g[i];
            for j in 0..d {
                let delta = if i == j { 1.0 } else { 0.0 };
                let jac = rstd * (delta - 1.0 / n - xhat[i] * xhat[j] / n);
                grad_x[r * d + j] += g[i] * weight[i] * jac;
            }
        }
    }
    (grad_x, grad_weight, grad_bias)
}

/// Softmax over rows of length `d`, max-subtracted.
pub fn softmax_last_dim_forward(x: &[f64], d: usize) -> Vec<f64> {
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks(d) {
        let max = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let exps: Vec<f64> = row.iter().map(|v| (v - max).exp()).collect();
        let sum: f64 = exps.iter().sum();
        out.extend(exps.iter().map(|e| e / sum));
    }
    out
}

/// grad_x from the explicit Jacobian `d y_i / d x_j = y_i * (delta_ij - y_j)`.
pub fn softmax_last_dim_backward(x: &[f64], grad_out: &[f64], d: usize) -> Vec<f64> {
    let y = softmax_last_dim_forward(x, d);
    let mut grad_x = vec![0.0; x.len()];
    for r in 0..x.len() / d.max(1) {
        for i in 0..d {
            for j in 0..d {
                let delta = if i == j { 1.0 } else { 0.0 };
                let yi = y[r * d + i];
                grad_x[r * d + j] += grad_out[r * d + i] * yi * (delta - y[r * d + j]);
            }
        }
    }
    grad_x
}

/// Calls `f(output_index, input_index, weight_index)` for every live tap of the sparse masked
/// depthwise convolution: rows of `input` / output are `[rows, c]`, the weight `[c, k, k]`,
/// and `table` holds `k * k` neighbour rows (or -1) per row, tap-major.
fn for_each_sparse_tap(table: &[i32], c: usize, k: usize, mut f: impl FnMut(usize, usize, usize)) {
    let kk = k * k;
    for n in 0..table.len() / kk.max(1) {
        for ch in 0..c {
            for i in 0..k {
                for j in 0..k {
                    let m = table[n * kk + i * k + j];
                    if m < 0 {
                        continue;
                    }
                    f(n * c + ch, m as usize * c + ch, (ch * k + i) * k + j);
                }
            }
        }
    }
}

/// `out[n, c] = sum_{i,j} weight[c, i, j] * input[table[n, i*k+j], c]`, zero where the entry
/// is -1; `input` and the result are `[rows, c]` with `rows = table.len() / (k * k)`.
pub fn sparse_depthwise_conv2d_forward(
    input: &[f64],
    weight: &[f64],
    table: &[i32],
    c: usize,
    k: usize,
) -> Vec<f64> {
    let mut out = vec![0.0; table.len() / (k * k).max(1) * c];
    for_each_sparse_tap(table, c, k, |o, i, w| out[o] += weight[w] * input[i]);
    out
}

/// Returns `(grad_input, grad_weight)` of the sparse convolution, scattering through the
/// forward's index map (it does not assume the table is symmetric).
pub fn sparse_depthwise_conv2d_backward(
    input: &[f64],
    weight: &[f64],
    grad_out: &[f64],
    table: &[i32],
    c: usize,
    k: usize,
) -> (Vec<f64>, Vec<f64>) {
    let mut grad_input = vec![0.0; input.len()];
    let mut grad_weight = vec![0.0; weight.len()];
    for_each_sparse_tap(table, c, k, |o, i, w| {
        grad_input[i] += weight[w] * grad_out[o];
        grad_weight[w] += input[i] * grad_out[o];
    });
    (grad_input, grad_weight)
}
