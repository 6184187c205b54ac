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
