//! Box geometry of Mask R-CNN as detectron2 0.6 computes it (the official `DET/` code runs on
//! it): IoU, the box <-> delta transform, NMS, the IoU matcher, balanced sampling, anchors, the
//! FPN level of a region and pasting a predicted mask into the image.
//!
//! Boxes are `[x1, y1, x2, y2]` in input-image pixels (continuous coordinates, width = x2 - x1,
//! no "+1"), in f32 as detectron2 keeps them. None of this is differentiated: the model's
//! gradients flow through the predicted deltas, against targets computed here.

use crate::rng::Rng;

pub type BoxXyxy = [f32; 4];

pub fn box_area(b: &BoxXyxy) -> f32 {
    (b[2] - b[0]) * (b[3] - b[1])
}

/// IoU of every pair, `[a.len() * b.len()]` row-major (detectron2 `pairwise_iou`: intersection
/// over union where the intersection is positive, else 0).
pub fn iou_matrix(a: &[BoxXyxy], b: &[BoxXyxy]) -> Vec<f32> {
    let mut out = Vec::with_capacity(a.len() * b.len());
    for p in a {
        let area_p = box_area(p);
        for q in b {
            let w = (p[2].min(q[2]) - p[0].max(q[0])).max(0.0);
            let h = (p[3].min(q[3]) - p[1].max(q[1])).max(0.0);
            let inter = w * h;
            out.push(if inter > 0.0 { inter / (area_p + box_area(q) - inter) } else { 0.0 });
        }
    }
    out
}

/// detectron2's `Box2BoxTransform`: deltas (dx, dy, dw, dh) of a target box relative to a
/// source box, scaled by `weights` ((1, 1, 1, 1) in the RPN, (10, 10, 5, 5) in the box head);
/// decoded dw and dh are clamped at log(1000 / 16) so exp cannot overflow.
#[derive(Clone, Copy, Debug)]
pub struct BoxTransform {
    pub weights: [f32; 4],
}

/// `math.log(1000.0 / 16)`, detectron2's `_DEFAULT_SCALE_CLAMP`.
pub const SCALE_CLAMP: f32 = 4.135_166_6;

pub const RPN_TRANSFORM: BoxTransform = BoxTransform { weights: [1.0, 1.0, 1.0, 1.0] };
pub const ROI_TRANSFORM: BoxTransform = BoxTransform { weights: [10.0, 10.0, 5.0, 5.0] };

fn centre_size(b: &BoxXyxy) -> [f32; 4] {
    let (w, h) = (b[2] - b[0], b[3] - b[1]);
    [b[0] + 0.5 * w, b[1] + 0.5 * h, w, h]
}

impl BoxTransform {
    /// The deltas that take `source` to `target`.
    pub fn encode(&self, source: &BoxXyxy, target: &BoxXyxy) -> [f32; 4] {
        let [sx, sy, sw, sh] = centre_size(source);
        let [tx, ty, tw, th] = centre_size(target);
        let [wx, wy, ww, wh] = self.weights;
        [wx * (tx - sx) / sw, wy * (ty - sy) / sh, ww * (tw / sw).ln(), wh * (th / sh).ln()]
    }

    /// `source` moved by `deltas`.
    pub fn decode(&self, source: &BoxXyxy, deltas: &[f32; 4]) -> BoxXyxy {
        let [sx, sy, sw, sh] = centre_size(source);
        let [wx, wy, ww, wh] = self.weights;
        let (dx, dy) = (deltas[0] / wx, deltas[1] / wy);
        let dw = (deltas[2] / ww).min(SCALE_CLAMP);
        let dh = (deltas[3] / wh).min(SCALE_CLAMP);
        let (cx, cy) = (dx * sw + sx, dy * sh + sy);
        let (w, h) = (dw.exp() * sw, dh.exp() * sh);
        [cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h]
    }
}

/// The box clipped to an image of `height` x `width` (detectron2 `Boxes.clip`).
pub fn clip_box(b: &BoxXyxy, height: usize, width: usize) -> BoxXyxy {
    let (h, w) = (height as f32, width as f32);
    [b[0].clamp(0.0, w), b[1].clamp(0.0, h), b[2].clamp(0.0, w), b[3].clamp(0.0, h)]
}

/// Indices of `scores` by decreasing score; equal scores keep their order.
pub fn order_by_score(scores: &[f32]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    order
}

/// Greedy non-maximum suppression (torchvision `nms`): boxes by decreasing score, each dropping
/// the later ones whose IoU with it exceeds `threshold`. Returns the kept indices, best first.
pub fn nms(boxes: &[BoxXyxy], scores: &[f32], threshold: f32) -> Vec<usize> {
    let order = order_by_score(scores);
    let mut suppressed = vec![false; boxes.len()];
    let mut keep = Vec::new();
    for (rank, &i) in order.iter().enumerate() {
        if suppressed[i] {
            continue;
        }
        keep.push(i);
        let area_i = box_area(&boxes[i]);
        for &j in &order[rank + 1..] {
            if suppressed[j] {
                continue;
            }
            let b = &boxes[j];
            let w = (boxes[i][2].min(b[2]) - boxes[i][0].max(b[0])).max(0.0);
            let h = (boxes[i][3].min(b[3]) - boxes[i][1].max(b[1])).max(0.0);
            let inter = w * h;
            // A NaN IoU (two empty boxes) suppresses nothing, as in torchvision.
            if inter / (area_i + box_area(b) - inter) > threshold {
                suppressed[j] = true;
            }
        }
    }
    keep
}

/// NMS within each group (class or FPN level) separately (torchvision `batched_nms`); the kept
/// indices of all groups, by decreasing score.
pub fn batched_nms(boxes: &[BoxXyxy], scores: &[f32], groups: &[usize], threshold: f32) -> Vec<usize> {
    let mut by_group: std::collections::BTreeMap<usize, Vec<usize>> = std::collections::BTreeMap::new();
    for (i, &g) in groups.iter().enumerate() {
        by_group.entry(g).or_default().push(i);
    }
    let mut keep = Vec::new();
    for members in by_group.values() {
        let b: Vec<BoxXyxy> = members.iter().map(|&i| boxes[i]).collect();
        let s: Vec<f32> = members.iter().map(|&i| scores[i]).collect();
        keep.extend(nms(&b, &s, threshold).into_iter().map(|k| members[k]));
    }
    keep.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    keep
}

/// Match label of a prediction: ignored (-1), background / negative (0), foreground (1).
pub type MatchLabel = i8;

/// detectron2's `Matcher`: each prediction takes the ground truth of highest IoU and a label by
/// the interval of that IoU (`thresholds` ascending, `labels` one more than thresholds).
#[derive(Clone, Debug)]
pub struct Matcher {
    pub thresholds: Vec<f32>,
    pub labels: Vec<MatchLabel>,
    /// Also mark foreground every prediction whose IoU with some ground truth equals that
    /// ground truth's best (ties included, and even when that best is 0, as detectron2 does).
    pub allow_low_quality_matches: bool,
}

impl Matcher {
    /// The RPN's: below 0.3 negative, from 0.7 positive, between ignored; low-quality matches on.
    pub fn rpn() -> Self {
        Self { thresholds: vec![0.3, 0.7], labels: vec![0, -1, 1], allow_low_quality_matches: true }
    }

    /// The ROI heads': foreground from IoU 0.5.
    pub fn roi() -> Self {
        Self { thresholds: vec![0.5], labels: vec![0, 1], allow_low_quality_matches: false }
    }

    /// For IoUs `[gts * predictions]`: each prediction's matched ground truth and label. With no
    /// ground truth every prediction matches index 0 with the lowest interval's label.
    pub fn assign(&self, iou: &[f32], gts: usize, predictions: usize) -> (Vec<usize>, Vec<MatchLabel>) {
        if gts == 0 {
            return (vec![0; predictions], vec![self.labels[0]; predictions]);
        }
        let mut matches = vec![0usize; predictions];
        let mut labels = vec![0 as MatchLabel; predictions];
        for p in 0..predictions {
            let (mut best, mut best_g) = (iou[p], 0);
            for g in 1..gts {
                if iou[g * predictions + p] > best {
                    best = iou[g * predictions + p];
                    best_g = g;
                }
            }
            matches[p] = best_g;
            let interval = self.thresholds.iter().take_while(|&&t| best >= t).count();
            labels[p] = self.labels[interval];
        }
        if self.allow_low_quality_matches {
            for g in 0..gts {
                let row = &iou[g * predictions..(g + 1) * predictions];
                let highest = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                for (p, &v) in row.iter().enumerate() {
                    if v == highest {
                        labels[p] = 1;
                    }
                }
            }
        }
        (matches, labels)
    }
}

/// `n` distinct indices drawn uniformly from 0..len (a partial Fisher-Yates shuffle).
fn draw_distinct(len: usize, n: usize, rng: &mut Rng) -> Vec<usize> {
    let mut pool: Vec<usize> = (0..len).collect();
    for i in 0..n.min(len) {
        let j = i + (rng.next_u64() % (len - i) as u64) as usize;
        pool.swap(i, j);
    }
    pool.truncate(n.min(len));
    pool
}

/// detectron2's `subsample_labels`: up to `num_samples * positive_fraction` foreground
/// (class not `ignore` and not `background`), the rest of `num_samples` background, each drawn
/// at random. Returns (foreground, background) indices.
pub fn subsample_labels(classes: &[i64], num_samples: usize, positive_fraction: f64, background: i64, rng: &mut Rng) -> (Vec<usize>, Vec<usize>) {
    let positive: Vec<usize> = (0..classes.len()).filter(|&i| classes[i] != -1 && classes[i] != background).collect();
    let negative: Vec<usize> = (0..classes.len()).filter(|&i| classes[i] == background).collect();
    let num_pos = ((num_samples as f64 * positive_fraction) as usize).min(positive.len());
    let num_neg = (num_samples - num_pos).min(negative.len());
    let pos = draw_distinct(positive.len(), num_pos, rng).into_iter().map(|i| positive[i]).collect();
    let neg = draw_distinct(negative.len(), num_neg, rng).into_iter().map(|i| negative[i]).collect();
    (pos, neg)
}

/// detectron2's `DefaultAnchorGenerator` cell anchors of one level: for each size, for each
/// aspect ratio (h / w), a box of area size^2 centred on 0.
pub fn cell_anchors(sizes: &[f32], aspect_ratios: &[f32]) -> Vec<BoxXyxy> {
    let mut out = Vec::with_capacity(sizes.len() * aspect_ratios.len());
    for &size in sizes {
        let area = size * size;
        for &ratio in aspect_ratios {
            let w = (area / ratio).sqrt();
            let h = ratio * w;
            out.push([-w / 2.0, -h / 2.0, w / 2.0, h / 2.0]);
        }
    }
    out
}

/// The anchors of a `height` x `width` feature map of `stride` (offset 0): the cell anchors
/// moved to (x * stride, y * stride), position-major (row, column, then cell anchor), the
/// order of the RPN's predictions.
pub fn grid_anchors(cell: &[BoxXyxy], stride: usize, height: usize, width: usize) -> Vec<BoxXyxy> {
    let mut out = Vec::with_capacity(height * width * cell.len());
    for y in 0..height {
        for x in 0..width {
            let (sx, sy) = ((x * stride) as f32, (y * stride) as f32);
            out.extend(cell.iter().map(|a| [a[0] + sx, a[1] + sy, a[2] + sx, a[3] + sy]));
        }
    }
    out
}

/// detectron2's `assign_boxes_to_levels` for the ROI pooler: level floor(4 + log2(sqrt(area) /
/// 224)) clamped to [min_level, max_level], returned relative to min_level.
pub fn roi_level(b: &BoxXyxy, min_level: usize, max_level: usize) -> usize {
    const CANONICAL_SIZE: f32 = 224.0;
    const CANONICAL_LEVEL: f32 = 4.0;
    let size = box_area(b).sqrt();
    let level = (CANONICAL_LEVEL + (size / CANONICAL_SIZE + 1e-8).log2()).floor();
    (level.clamp(min_level as f32, max_level as f32) as usize) - min_level
}

/// A `side` x `side` mask probability map predicted for `b`, pasted into a `height` x `width`
/// image and thresholded (detectron2 `paste_masks_in_image`, threshold 0.5): each pixel centre
/// is mapped into the box's mask grid and sampled bilinearly (grid_sample, align_corners=False,
/// zeros outside). Pixels outside the box are 0.
pub fn paste_mask(probs: &[f32], side: usize, b: &BoxXyxy, height: usize, width: usize, threshold: f32) -> Vec<u8> {
    let mut out = vec![0u8; height * width];
    let (bw, bh) = (b[2] - b[0], b[3] - b[1]);
    if bw <= 0.0 || bh <= 0.0 {
        return out;
    }
    let sample = |y: f32, x: f32| -> f32 {
        let (y0, x0) = (y.floor(), x.floor());
        let (ly, lx) = (y - y0, x - x0);
        let mut v = 0.0;
        for (dy, wy) in [(0.0, 1.0 - ly), (1.0, ly)] {
            for (dx, wx) in [(0.0, 1.0 - lx), (1.0, lx)] {
                let (yy, xx) = (y0 + dy, x0 + dx);
                if yy >= 0.0 && xx >= 0.0 && (yy as usize) < side && (xx as usize) < side {
                    v += wy * wx * probs[yy as usize * side + xx as usize];
                }
            }
        }
        v
    };
    // Only pixels whose centre can reach the box's grid (within one mask cell) can be nonzero.
    let y_from = ((b[1] - 1.0).floor().max(0.0) as usize).min(height);
    let y_to = ((b[3] + 1.0).ceil().max(0.0) as usize).min(height);
    let x_from = ((b[0] - 1.0).floor().max(0.0) as usize).min(width);
    let x_to = ((b[2] + 1.0).ceil().max(0.0) as usize).min(width);
    for y in y_from..y_to {
        let gy = (y as f32 + 0.5 - b[1]) / bh * side as f32 - 0.5;
        for x in x_from..x_to {
            let gx = (x as f32 + 0.5 - b[0]) / bw * side as f32 - 0.5;
            if sample(gy, gx) >= threshold {
                out[y * width + x] = 1;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iou_and_transform_round_trip() {
        let a = [[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 15.0, 15.0]];
        let b = [[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0], [0.0, 0.0, 5.0, 10.0]];
        let iou = iou_matrix(&a, &b);
        assert_eq!(iou[0], 1.0);
        assert_eq!(iou[1], 0.0);
        assert_eq!(iou[2], 0.5);
        assert!((iou[3] - 25.0 / 175.0).abs() < 1e-7);
        for t in [RPN_TRANSFORM, ROI_TRANSFORM] {
            let d = t.encode(&a[0], &a[1]);
            let back = t.decode(&a[0], &d);
            for k in 0..4 {
                assert!((back[k] - a[1][k]).abs() < 1e-4, "{back:?}");
            }
        }
        // Weights scale the deltas: a shift of half a width is dx = 0.5 * wx.
        assert_eq!(ROI_TRANSFORM.encode(&[0.0, 0.0, 10.0, 10.0], &[5.0, 0.0, 15.0, 10.0]), [5.0, 0.0, 0.0, 0.0]);
        // Huge dw is clamped: the box grows at most 1000/16 times.
        let wide = RPN_TRANSFORM.decode(&[0.0, 0.0, 2.0, 2.0], &[0.0, 0.0, 100.0, 0.0]);
        assert!((wide[2] - wide[0] - 2.0 * 62.5).abs() < 1e-3);
    }

    #[test]
    fn nms_keeps_the_best_of_each_cluster_and_groups_apart() {
        let boxes = [[0.0, 0.0, 10.0, 10.0], [1.0, 0.0, 11.0, 10.0], [20.0, 0.0, 30.0, 10.0], [0.0, 0.0, 10.0, 9.0]];
        let scores = [0.5, 0.9, 0.7, 0.6];
        assert_eq!(nms(&boxes, &scores, 0.5), vec![1, 2]);
        // In separate groups nothing suppresses across.
        assert_eq!(batched_nms(&boxes, &scores, &[0, 1, 0, 0], 0.5), vec![1, 2, 3]);
        // A threshold above every IoU keeps all, by score.
        assert_eq!(nms(&boxes, &scores, 0.95), vec![1, 2, 3, 0]);
    }

    #[test]
    fn matcher_intervals_and_low_quality_matches() {
        // Two gts, four predictions.
        let iou = [0.8, 0.5, 0.1, 0.0, 0.2, 0.6, 0.25, 0.4];
        let (m, l) = Matcher::rpn().assign(&iou, 2, 4);
        assert_eq!(m, vec![0, 1, 1, 1]);
        // 0.8 fg; 0.6 ignored but gt 1's best -> fg (low quality); 0.25 bg; 0.4 ignored.
        assert_eq!(l, vec![1, 1, 0, -1]);
        let (_, l) = Matcher::roi().assign(&iou, 2, 4);
        assert_eq!(l, vec![1, 1, 0, 0]);
        let (m, l) = Matcher::roi().assign(&[], 0, 3);
        assert_eq!((m, l), (vec![0; 3], vec![0; 3]));
    }

    #[test]
    fn sampling_caps_foreground_and_fills_with_background() {
        let classes: Vec<i64> = (0..100).map(|i| if i < 10 { 3 } else if i < 15 { -1 } else { 5 }).collect();
        let mut rng = Rng::new(1);
        let (pos, neg) = subsample_labels(&classes, 16, 0.25, 5, &mut rng);
        assert_eq!(pos.len(), 4);
        assert_eq!(neg.len(), 12);
        assert!(pos.iter().all(|&i| classes[i] == 3));
        assert!(neg.iter().all(|&i| classes[i] == 5));
        let mut distinct = neg.clone();
        distinct.sort();
        distinct.dedup();
        assert_eq!(distinct.len(), 12);
        // Too few foreground: all of it, the rest background.
        let (pos, neg) = subsample_labels(&classes, 64, 0.5, 5, &mut rng);
        assert_eq!((pos.len(), neg.len()), (10, 54));
    }

    #[test]
    fn anchors_are_centred_on_the_grid_in_prediction_order() {
        let cell = cell_anchors(&[32.0], &[0.5, 1.0, 2.0]);
        assert_eq!(cell[1], [-16.0, -16.0, 16.0, 16.0]);
        let tall = cell[2];
        assert!(((tall[3] - tall[1]) / (tall[2] - tall[0]) - 2.0).abs() < 1e-5);
        assert!((box_area(&tall) - 1024.0).abs() < 1e-2);
        let grid = grid_anchors(&cell, 4, 2, 3);
        assert_eq!(grid.len(), 18);
        // Position (row 1, column 2) is the sixth; its square anchor is centred on (8, 4).
        assert_eq!(grid[5 * 3 + 1], [-8.0, -12.0, 24.0, 20.0]);
    }

    #[test]
    fn roi_levels_follow_box_size() {
        assert_eq!(roi_level(&[0.0, 0.0, 224.0, 224.0], 2, 5), 2);
        assert_eq!(roi_level(&[0.0, 0.0, 112.0, 112.0], 2, 5), 1);
        assert_eq!(roi_level(&[0.0, 0.0, 10.0, 10.0], 2, 5), 0);
        assert_eq!(roi_level(&[0.0, 0.0, 1000.0, 1000.0], 2, 5), 3);
    }

    #[test]
    fn pasting_a_full_mask_fills_its_box() {
        let probs = vec![1.0; 28 * 28];
        let m = paste_mask(&probs, 28, &[2.0, 3.0, 8.0, 7.0], 10, 12, 0.5);
        for y in 0..10 {
            for x in 0..12 {
                let inside = (2..8).contains(&x) && (3..7).contains(&y);
                assert_eq!(m[y * 12 + x] == 1, inside, "pixel ({x}, {y})");
            }
        }
        // A left-half mask covers the box's left half.
        let half: Vec<f32> = (0..28 * 28).map(|i| if i % 28 < 14 { 1.0 } else { 0.0 }).collect();
        let m = paste_mask(&half, 28, &[0.0, 0.0, 8.0, 4.0], 4, 8, 0.5);
        assert_eq!(&m[..8], &[1, 1, 1, 1, 0, 0, 0, 0]);
    }
}
