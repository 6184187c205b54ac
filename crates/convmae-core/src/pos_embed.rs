//! The fixed 2-D sin-cos position table of MAE (`util/pos_embed.py`), for any square grid.

/// Returns `grid*grid` rows of `dim` values, row-major over tokens (t = row * grid + col).
/// Channels [0, D/4) hold sin(col*w), [D/4, D/2) cos(col*w), then the same for the row:
/// the official meshgrid puts the column coordinate first. Computed in f64 like numpy.
pub fn sincos_2d(dim: usize, grid: usize) -> Vec<f64> {
    assert!(dim.is_multiple_of(4), "sin-cos table width {dim} must be a multiple of 4");
    let quarter = dim / 4;
    let omega: Vec<f64> = (0..quarter)
        .map(|k| 1.0 / 10000f64.powf(k as f64 / quarter as f64))
        .collect();
    let mut table = vec![0.0; grid * grid * dim];
    for row in 0..grid {
        for col in 0..grid {
            let out = &mut table[(row * grid + col) * dim..][..dim];
            for (k, w) in omega.iter().enumerate() {
                let (c, r) = (col as f64 * w, row as f64 * w);
                out[k] = c.sin();
                out[quarter + k] = c.cos();
                out[2 * quarter + k] = r.sin();
                out[3 * quarter + k] = r.cos();
            }
        }
    }
    table
}

#[cfg(test)]
mod tests {
    #[test]
    fn first_half_encodes_the_column() {
        let t = super::sincos_2d(8, 3);
        // token (row 0, col 1): sin(1*1) in channel 0, row channels are sin(0)=0, cos(0)=1
        let tok = &t[8..16];
        assert!((tok[0] - 1f64.sin()).abs() < 1e-15);
        assert_eq!(tok[4], 0.0);
        assert_eq!(tok[6], 1.0);
    }
}

/// torch's bicubic kernel constant (`upsample_bicubic2d`, A = -0.75).
const CUBIC_A: f64 = -0.75;

/// The [out, in] matrix of torch's `interpolate(mode='bicubic', align_corners=False)` along one
/// axis: source coordinate `(o + 0.5) * in / out - 0.5` (not clamped, unlike bilinear), four taps
/// around its floor with Keys' cubic weights, taps past an edge read the edge sample.
pub fn bicubic_matrix(inp: usize, out: usize) -> Vec<f64> {
    let near = |x: f64| ((CUBIC_A + 2.0) * x - (CUBIC_A + 3.0)) * x * x + 1.0;
    let far = |x: f64| ((CUBIC_A * x - 5.0 * CUBIC_A) * x + 8.0 * CUBIC_A) * x - 4.0 * CUBIC_A;
    let mut m = vec![0.0; out * inp];
    let scale = inp as f64 / out as f64;
    for o in 0..out {
        let src = (o as f64 + 0.5) * scale - 0.5;
        let base = src.floor();
        let t = src - base;
        let weights = [far(t + 1.0), near(t), near(1.0 - t), far(2.0 - t)];
        for (k, w) in weights.into_iter().enumerate() {
            let tap = (base as isize - 1 + k as isize).clamp(0, inp as isize - 1) as usize;
            m[o * inp + tap] += w;
        }
    }
    m
}

/// A [1, g*g, dim] position table (row-major tokens) resized to a `to` x `to` grid as the
/// official SEG loader does (`mmcv_custom/checkpoint.py`): the tokens viewed as a dim-channel
/// g x g image, bicubic (align_corners=False), back to tokens. f64 in and out.
pub fn resize_pos_embed(table: &[f64], dim: usize, from: usize, to: usize) -> Vec<f64> {
    assert_eq!(table.len(), from * from * dim, "position table is not {from}x{from}x{dim}");
    let m = bicubic_matrix(from, to);
    // Rows first: [to, from, dim], then columns: [to, to, dim].
    let mut rows = vec![0.0; to * from * dim];
    for o in 0..to {
        for i in 0..from {
            let w = m[o * from + i];
            if w == 0.0 {
                continue;
            }
            for c in 0..from {
                let (src, dst) = ((i * from + c) * dim, (o * from + c) * dim);
                for d in 0..dim {
                    rows[dst + d] += w * table[src + d];
                }
            }
        }
    }
    let mut out = vec![0.0; to * to * dim];
    for r in 0..to {
        for o in 0..to {
            for c in 0..from {
                let w = m[o * from + c];
                if w == 0.0 {
                    continue;
                }
                let (src, dst) = ((r * from + c) * dim, (r * to + o) * dim);
                for d in 0..dim {
                    out[dst + d] += w * rows[src + d];
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod resize_tests {
    use super::*;

    #[test]
    fn bicubic_keeps_sizes_constants_and_ramps() {
        // Same size: the identity (the taps at offsets -1, 1, 2 weigh 0 at t = 0).
        let id = bicubic_matrix(5, 5);
        for o in 0..5 {
            for i in 0..5 {
                assert!((id[o * 5 + i] - if o == i { 1.0 } else { 0.0 }).abs() < 1e-15);
            }
        }
        // Every row sums to 1, so a constant stays itself.
        let m = bicubic_matrix(14, 32);
        for row in m.chunks(14) {
            assert!((row.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        }
        // Halving puts every source point half-way between samples: torch's A = -0.75 weights
        // there are -0.09375, 0.59375, 0.59375, -0.09375; at the first output the two left taps
        // both read the edge sample.
        let half = bicubic_matrix(8, 4);
        assert_eq!(&half[8..16], &[0.0, -0.09375, 0.59375, 0.59375, -0.09375, 0.0, 0.0, 0.0]);
        assert_eq!(&half[0..8], &[0.5, 0.59375, -0.09375, 0.0, 0.0, 0.0, 0.0, 0.0]);
    }

    /// torch 2.15's `interpolate(size=7, mode='bicubic', align_corners=False)` of each unit
    /// vector of length 5 (a relative position table's 5 offsets of a 3x3 grid to the 7 of a 4x4
    /// one), printed to 12 digits.
    #[test]
    fn bicubic_upsampling_matches_torch() {
        let torch = [
            [1.078717201166, -0.078717201166, 0.0, 0.0, 0.0],
            [0.419825072886, 0.685131195335, -0.104956268222, 0.0, 0.0],
            [-0.109329446064, 0.845481049563, 0.307580174927, -0.043731778426, 0.0],
            [0.0, 0.0, 1.0, 0.0, 0.0],
            [0.0, -0.043731778426, 0.307580174927, 0.845481049563, -0.109329446064],
            [0.0, 0.0, -0.104956268222, 0.685131195335, 0.419825072886],
            [0.0, 0.0, 0.0, -0.078717201166, 1.078717201166],
        ];
        let m = bicubic_matrix(5, 7);
        for (o, row) in torch.iter().enumerate() {
            for (i, &want) in row.iter().enumerate() {
                assert!((m[o * 5 + i] - want).abs() < 1e-12, "[{o}][{i}]: {} vs torch {want}", m[o * 5 + i]);
            }
        }
    }

    #[test]
    fn a_table_resizes_per_channel_and_position() {
        // Against the 2-D sum written out: out[r][c] = sum over (i, j) of m[r][i] m[c][j] in[i][j].
        let (from, to, dim) = (6, 10, 3);
        let table: Vec<f64> = (0..from * from * dim).map(|i| ((i * 7919) % 101) as f64 / 10.0).collect();
        let out = resize_pos_embed(&table, dim, from, to);
        let m = bicubic_matrix(from, to);
        for r in 0..to {
            for c in 0..to {
                for d in 0..dim {
                    let mut want = 0.0;
                    for i in 0..from {
                        for j in 0..from {
                            want += m[r * from + i] * m[c * from + j] * table[(i * from + j) * dim + d];
                        }
                    }
                    assert!((out[(r * to + c) * dim + d] - want).abs() < 1e-12);
                }
            }
        }
        assert_eq!(resize_pos_embed(&table, dim, from, from), table);
    }
}
