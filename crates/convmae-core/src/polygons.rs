//! COCO polygons as masks, rasterized the way pycocotools does it (`frPyObjects`, `merge`,
//! `decode`): COCO's evaluation reads ground-truth masks so, and detectron2 builds its mask
//! targets so from PolygonMasks (the official DET configs' mask format), inside each region at
//! 28 x 28. The TypeScript `rasterizePolygons` calls `rasterize`; test/oracles.test.ts checks it
//! against pycocotools itself.
//!
//! The method: the vertices are rounded onto a grid 5x finer than the pixels, the closed
//! boundary is walked there one fine step at a time along each edge's longer axis, and wherever
//! the walk crosses the fine column boundary through pixel column x's centre, the row of the
//! crossing (its upper fine row mapped back to pixels, clamped to [0, height], rounded up)
//! toggles column x from that row down. Each column is filled between pairs of its sorted
//! toggles; polygons are OR-ed together. C's truncating casts and its order of floating-point
//! operations are kept, since they decide which pixel a boundary falls in.

use crate::boxes::BoxXyxy;

/// pycocotools walks a polygon's boundary on a grid this many times finer than the pixels.
const UPSAMPLING: f64 = 5.0;

/// Polygons ([x1, y1, x2, y2, ...] in pixels) as a row-major [height, width] mask (1 = inside):
/// the union over the polygons, within one polygon the even-odd rule.
pub fn rasterize(polygons: &[Vec<f64>], height: usize, width: usize) -> Vec<u8> {
    let mut mask = vec![0u8; height * width];
    for polygon in polygons {
        for (x, rows) in column_toggles(polygon, height, width).iter_mut().enumerate() {
            rows.sort_unstable();
            for pair in rows.chunks_exact(2) {
                for y in pair[0]..pair[1] {
                    mask[y * width + x] = 1;
                }
            }
        }
    }
    mask
}

/// For each pixel column, the rows at which the polygon's boundary toggles it (an even number
/// per column, since the boundary is closed).
fn column_toggles(polygon: &[f64], height: usize, width: usize) -> Vec<Vec<usize>> {
    let mut toggles = vec![Vec::new(); width];
    let n = polygon.len() / 2;
    // C's (int)(v + .5): truncation toward zero.
    let fine: Vec<(i64, i64)> = (0..n).map(|i| ((UPSAMPLING * polygon[2 * i] + 0.5) as i64, (UPSAMPLING * polygon[2 * i + 1] + 0.5) as i64)).collect();
    let mut last: Option<(i64, i64)> = None;
    // One fine point of the walk: a change of column (by one) crossed the line between the two
    // columns, which runs through a pixel centre every 5 columns.
    let mut visit = |x: i64, y: i64| {
        if let Some((lx, ly)) = last {
            if x != lx {
                let column = (x.min(lx) as f64 + 0.5) / UPSAMPLING - 0.5;
                if column.floor() == column && column >= 0.0 && column <= width as f64 - 1.0 {
                    let row = ((y.min(ly) as f64 + 0.5) / UPSAMPLING - 0.5).clamp(0.0, height as f64).ceil();
                    toggles[column as usize].push(row as usize);
                }
            }
        }
        last = Some((x, y));
    };
    for j in 0..n {
        let (mut xs, mut ys) = fine[j];
        let (mut xe, mut ye) = fine[(j + 1) % n];
        let (dx, dy) = ((xe - xs).abs(), (ye - ys).abs());
        let along_x = dx >= dy;
        // Interpolate from the end with the smaller coordinate on the long axis (the rounding
        // depends on which end), but visit the points in the edge's own direction.
        let reversed = if along_x { xs > xe } else { ys > ye };
        if reversed {
            (xs, ys, xe, ye) = (xe, ye, xs, ys);
        }
        if along_x {
            // A zero-length edge (a repeated vertex) gives 0 / 0; its one point lies in the
            // column of its neighbours, so its row is never read.
            let slope = (ye - ys) as f64 / dx as f64;
            for d in 0..=dx {
                let t = if reversed { dx - d } else { d };
                visit(xs + t, (ys as f64 + slope * t as f64 + 0.5) as i64);
            }
        } else {
            let slope = (xe - xs) as f64 / dy as f64;
            for d in 0..=dy {
                let t = if reversed { dy - d } else { d };
                visit((xs as f64 + slope * t as f64 + 0.5) as i64, ys + t);
            }
        }
    }
    toggles
}

/// detectron2's `rasterize_polygons_within_box` (PolygonMasks.crop_and_resize, a region's mask
/// target): the polygons moved to the box's origin, scaled by side / max(box side, 0.1) per
/// axis, rasterized at side x side. The box's sides are taken in f32, as detectron2's float32
/// boxes give them; the rest in f64.
pub fn rasterize_within_box(polygons: &[Vec<f64>], b: &BoxXyxy, side: usize) -> Vec<u8> {
    let (w, h) = ((b[2] - b[0]) as f64, (b[3] - b[1]) as f64);
    let ratio_w = side as f64 / w.max(0.1);
    let ratio_h = side as f64 / h.max(0.1);
    let moved: Vec<Vec<f64>> = polygons
        .iter()
        .map(|p| p.chunks_exact(2).flat_map(|v| [(v[0] - b[0] as f64) * ratio_w, (v[1] - b[1] as f64) * ratio_h]).collect())
        .collect();
    rasterize(&moved, side, side)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mask_of(rows: &[&str]) -> Vec<u8> {
        rows.iter().flat_map(|r| r.bytes().map(|c| u8::from(c == b'#'))).collect()
    }

    #[test]
    fn hand_cases_as_pycocotools_gives_them() {
        // pycocotools 2.0.11's masks for these (test/detection-data.test.ts has the same cases).
        assert_eq!(rasterize(&[vec![1., 1., 4., 1., 4., 4., 1., 4.]], 6, 6), mask_of(&["......", ".###..", ".###..", ".###..", "......", "......"]));
        assert_eq!(rasterize(&[vec![-3., -3., 2., -3., 2., 2., -3., 2.]], 3, 3), mask_of(&["##.", "##.", "..."]));
        assert_eq!(rasterize(&[vec![0., 0., 6., 0., 0., 3.]], 4, 6), mask_of(&["#####.", "###...", "#.....", "......"]));
        // Even-odd within a polygon, union across polygons.
        assert_eq!(rasterize(&[vec![1., 1., 4., 1., 4., 4., 1., 4., 1., 1., 4., 1., 4., 4., 1., 4.]], 6, 6), vec![0; 36]);
        assert_eq!(rasterize(&[vec![0., 0., 3., 0., 3., 2., 0., 2.], vec![2., 1., 5., 1., 5., 3., 2., 3.]], 4, 5), mask_of(&["###..", "#####", "..###", "....."]));
        // The 5x grid decides: x 1.5 rounds to fine 8, so column 1 (fine 7 | 8) is never crossed.
        assert_eq!(rasterize(&[vec![1.5, 2., 3., 2., 3., 3.1, 1.5, 3.1]], 4, 4), mask_of(&["....", "....", "..#.", "...."]));
        // A repeated vertex and fewer than 3 points.
        assert_eq!(rasterize(&[vec![1., 1., 1., 1., 4., 1., 4., 4., 1., 4.]], 6, 6), rasterize(&[vec![1., 1., 4., 1., 4., 4., 1., 4.]], 6, 6));
        assert_eq!(rasterize(&[vec![0., 0., 3., 3.]], 4, 4), vec![0; 16]);
    }

    #[test]
    fn within_a_box_the_polygon_is_moved_and_scaled_to_the_side() {
        // The square 1..4 inside the box (1, 1, 4, 4) fills a 6 x 6 target; inside the box
        // (1, 1, 7, 4) it fills the left half, scaled by 6/6 across and 6/3 down.
        let square = vec![vec![1., 1., 4., 1., 4., 4., 1., 4.]];
        assert_eq!(rasterize_within_box(&square, &[1., 1., 4., 4.], 6), vec![1; 36]);
        let half = rasterize_within_box(&square, &[1., 1., 7., 4.], 6);
        assert_eq!(half, mask_of(&["###...", "###...", "###...", "###...", "###...", "###..."]));
        // The same as rasterizing the moved and scaled vertices at the side.
        let tri = vec![vec![2.5, 1.25, 9.0, 3.0, 3.0, 7.75]];
        let b: BoxXyxy = [2.0, 1.0, 9.5, 8.0];
        let moved = vec![tri[0].chunks(2).flat_map(|v| [(v[0] - 2.0) * (28.0 / 7.5), (v[1] - 1.0) * (28.0 / 7.0)]).collect::<Vec<f64>>()];
        assert_eq!(rasterize_within_box(&tri, &b, 28), rasterize(&moved, 28, 28));
        // A box thinner than 0.1 is scaled as if 0.1 wide.
        assert_eq!(rasterize_within_box(&square, &[1., 1., 1.05, 4.], 6), rasterize_within_box(&square, &[1., 1., 1.1, 4.], 6));
    }
}
