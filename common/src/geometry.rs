//! View geometry: RandomResizedCrop boxes with the DenseDINO overlap bound, and the reference points of
//! each ordered view pair in both views' frames (DenseDINO's `DataAugmentationDINO.__call__`,
//! `calculate_bboxes` and `sampling_reference_point` in its `main_dino.py`; the paper's §3.2).
//!
//! Boxes are in original-image pixels (integers, as torchvision draws them). Points are in grid_sample
//! convention: x_n = 2·(X − x1)/w − 1 for a box (x1, w), so −1 and +1 are the crop's outer edges
//! (align_corners = false), with x negated when the view is flipped. The output size cancels out, so a
//! 96-px and a 224-px view of the same box give the same coordinates.

use rand::Rng;

use crate::config::{SamplingMode, ViewsConfig};

/// A crop in original-image pixels: columns x1..x1+w, rows y1..y1+h.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CropBox {
    pub x1: u32,
    pub y1: u32,
    pub w: u32,
    pub h: u32,
}

impl CropBox {
    pub fn area(&self) -> u64 {
        self.w as u64 * self.h as u64
    }

    /// Pixel area shared with `o`.
    pub fn overlap(&self, o: &CropBox) -> u64 {
        let w = (self.x1 + self.w).min(o.x1 + o.w).saturating_sub(self.x1.max(o.x1));
        let h = (self.y1 + self.h).min(o.y1 + o.h).saturating_sub(self.y1.max(o.y1));
        w as u64 * h as u64
    }
}

/// torchvision's `RandomResizedCrop.get_params`: 10 tries of (area fraction ~ U(scale), log-ratio ~
/// U(log ratio)), then the centre crop clamped to the ratio range.
pub fn random_resized_crop(
    rng: &mut impl Rng,
    width: u32,
    height: u32,
    scale: [f64; 2],
    ratio: [f64; 2],
) -> CropBox {
    let area = width as f64 * height as f64;
    let (log_lo, log_hi) = (ratio[0].ln(), ratio[1].ln());
    for _ in 0..10 {
        let target = area * rng.random_range(scale[0]..=scale[1]);
        let aspect = rng.random_range(log_lo..=log_hi).exp();
        let w = (target * aspect).sqrt().round() as u32;
        let h = (target / aspect).sqrt().round() as u32;
        if 0 < w && w <= width && 0 < h && h <= height {
            let y1 = rng.random_range(0..=height - h);
            let x1 = rng.random_range(0..=width - w);
            return CropBox { x1, y1, w, h };
        }
    }
    let in_ratio = width as f64 / height as f64;
    let (w, h) = if in_ratio < ratio[0] {
        (width, ((width as f64 / ratio[0]).round() as u32).clamp(1, height))
    } else if in_ratio > ratio[1] {
        (((height as f64 * ratio[1]).round() as u32).clamp(1, width), height)
    } else {
        (width, height)
    };
    CropBox { x1: (width - w) / 2, y1: (height - h) / 2, w, h }
}

/// The crop boxes of all views of one image, drawn in order [global 0, global 1, others…]. A view
/// after the first is redrawn until it overlaps every earlier global view by more than the bound
/// (floor(min_overlap·W·H), times `global_overlap_factor` for global view 1). After `max_redraws`
/// redraws the candidate with the largest smallest-overlap is kept; if even that one misses a global
/// view entirely, the view takes global view 0's box, so every pair still has a positive overlap.
/// Returns the boxes and whether any view needed that fallback.
pub fn sample_boxes(rng: &mut impl Rng, width: u32, height: u32, cfg: &ViewsConfig) -> (Vec<CropBox>, bool) {
    let bound = (cfg.min_overlap * width as f64 * height as f64).floor();
    let mut boxes: Vec<CropBox> = Vec::with_capacity(cfg.num_views());
    let mut fell_back = false;
    for v in 0..cfg.num_views() {
        let (scale, need) = if v < cfg.num_global {
            (cfg.global_scale, bound * cfg.global_overlap_factor)
        } else {
            (cfg.local_scale, bound)
        };
        let globals = v.min(cfg.num_global);
        let min_overlap =
            |b: &CropBox| boxes[..globals].iter().map(|g| b.overlap(g)).min().unwrap_or(u64::MAX);
        let mut best = random_resized_crop(rng, width, height, scale, cfg.ratio);
        let mut best_overlap = min_overlap(&best);
        let mut tries = 0;
        while globals > 0 && best_overlap as f64 <= need {
            if tries == cfg.max_redraws {
                fell_back = true;
                if best_overlap == 0 {
                    best = boxes[0];
                }
                break;
            }
            let cand = random_resized_crop(rng, width, height, scale, cfg.ratio);
            let o = min_overlap(&cand);
            if o > best_overlap || o as f64 > need {
                best = cand;
                best_overlap = o;
            }
            tries += 1;
        }
        boxes.push(best);
    }
    (boxes, fell_back)
}

/// Relative positions (r_x, r_y) in [0, 1)² of the M points of one pair.
pub fn point_fractions(rng: &mut impl Rng, cfg: &ViewsConfig) -> Vec<(f64, f64)> {
    match cfg.sampling_mode {
        SamplingMode::Random => {
            (0..cfg.num_points).map(|_| (rng.random::<f64>(), rng.random::<f64>())).collect()
        }
        SamplingMode::Grid => {
            let k = (cfg.num_points as f64).sqrt().round() as usize;
            let c = |i: usize| (2 * i + 1) as f64 / (2 * k) as f64;
            (0..k).flat_map(|y| (0..k).map(move |x| (c(x), c(y)))).collect()
        }
    }
}

/// A point of the original image (pixels, continuous) in a view's grid_sample frame.
pub fn to_view(b: &CropBox, flipped: bool, x: f64, y: f64) -> [f32; 2] {
    let xn = 2.0 * (x - b.x1 as f64) / b.w as f64 - 1.0;
    let yn = 2.0 * (y - b.y1 as f64) / b.h as f64 - 1.0;
    [if flipped { -xn } else { xn } as f32, yn as f32]
}

/// The inverse of [`to_view`]: a view-frame point back in original-image pixels.
pub fn to_image(b: &CropBox, flipped: bool, p: [f32; 2]) -> (f64, f64) {
    let xn = if flipped { -p[0] } else { p[0] } as f64;
    (b.x1 as f64 + (xn + 1.0) * 0.5 * b.w as f64, b.y1 as f64 + (p[1] as f64 + 1.0) * 0.5 * b.h as f64)
}

/// Reference points of one image: `teacher[g]` is `[V, M, 2]` (pair (g, v) in g's frame) and
/// `student[v]` is `[G, M, 2]` (pair (g, v) in v's frame), flattened.
#[derive(Clone, Debug, PartialEq)]
pub struct RefPoints {
    pub teacher: Vec<Vec<f32>>,
    pub student: Vec<Vec<f32>>,
}

/// Draws M points for every ordered pair (g, v), g global, v any view (g itself included), uniformly in
/// the pair's overlap box, the same fractions placed in both frames (`sampling_reference_point`).
pub fn reference_points(
    rng: &mut impl Rng,
    boxes: &[CropBox],
    flips: &[bool],
    cfg: &ViewsConfig,
) -> RefPoints {
    let (g_n, v_n, m) = (cfg.num_global, boxes.len(), cfg.num_points);
    let mut teacher = vec![vec![0f32; v_n * m * 2]; g_n];
    let mut student = vec![vec![0f32; g_n * m * 2]; v_n];
    for g in 0..g_n {
        for v in 0..v_n {
            let (a, b) = (&boxes[g], &boxes[v]);
            let ix1 = a.x1.max(b.x1) as f64;
            let iy1 = a.y1.max(b.y1) as f64;
            let ix2 = (a.x1 + a.w).min(b.x1 + b.w) as f64;
            let iy2 = (a.y1 + a.h).min(b.y1 + b.h) as f64;
            for (j, (rx, ry)) in point_fractions(rng, cfg).into_iter().enumerate() {
                let (x, y) = (ix1 + rx * (ix2 - ix1), iy1 + ry * (iy2 - iy1));
                let t = (v * m + j) * 2;
                teacher[g][t..t + 2].copy_from_slice(&to_view(a, flips[g], x, y));
                let s = (g * m + j) * 2;
                student[v][s..s + 2].copy_from_slice(&to_view(b, flips[v], x, y));
            }
        }
    }
    RefPoints { teacher, student }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::seed::{Purpose, rng};

    #[test]
    fn fallback_centre_crop_matches_torchvision() {
        // Scale range too large for any try to fit: torchvision falls back to the centre crop clamped to
        // the ratio range. A 500x33 image (ratio 15.2 > 4/3) gives h = 33, w = round(33·4/3) = 44.
        let mut r = rng(0, Purpose::Views, &[]);
        let b = random_resized_crop(&mut r, 500, 33, [5.0, 5.0], [0.75, 4.0 / 3.0]);
        assert_eq!(b, CropBox { x1: (500 - 44) / 2, y1: 0, w: 44, h: 33 });
        let b = random_resized_crop(&mut r, 30, 300, [5.0, 5.0], [0.75, 4.0 / 3.0]);
        assert_eq!(b, CropBox { x1: 0, y1: (300 - 40) / 2, w: 30, h: 40 });
        let b = random_resized_crop(&mut r, 40, 40, [5.0, 5.0], [0.75, 4.0 / 3.0]);
        assert_eq!(b, CropBox { x1: 0, y1: 0, w: 40, h: 40 });
    }

    #[test]
    fn points_of_a_pair_map_back_to_one_image_point_and_bounds_hold() {
        let cfg = ViewsConfig::readme_ablation();
        for (i, (w, h)) in [(500u32, 375u32), (500, 33), (20, 20), (33, 500), (4000, 3000)]
            .into_iter()
            .cycle()
            .take(2000)
            .enumerate()
        {
            let mut r = rng(9, Purpose::Views, &[0, i as u64]);
            let (boxes, fell_back) = sample_boxes(&mut r, w, h, &cfg);
            let bound = (cfg.min_overlap * w as f64 * h as f64).floor();
            for (v, b) in boxes.iter().enumerate() {
                assert!(b.x1 + b.w <= w && b.y1 + b.h <= h && b.w > 0 && b.h > 0);
                if !fell_back && v >= 1 {
                    let need = if v == 1 { 2.0 * bound } else { bound };
                    for (g, global) in boxes.iter().enumerate().take(v.min(2)) {
                        assert!(b.overlap(global) as f64 > need, "{w}x{h} view {v} vs {g}");
                    }
                }
                assert!(b.overlap(&boxes[0]) > 0);
            }
            let flips: Vec<bool> = (0..boxes.len()).map(|v| (i + v) % 2 == 0).collect();
            let pts = reference_points(&mut r, &boxes, &flips, &cfg);
            let m = cfg.num_points;
            for g in 0..2 {
                for v in 0..boxes.len() {
                    for j in 0..m {
                        let t = &pts.teacher[g][(v * m + j) * 2..][..2];
                        let s = &pts.student[v][(g * m + j) * 2..][..2];
                        let a = to_image(&boxes[g], flips[g], [t[0], t[1]]);
                        let b = to_image(&boxes[v], flips[v], [s[0], s[1]]);
                        assert!((a.0 - b.0).abs() < 0.5 && (a.1 - b.1).abs() < 0.5, "{a:?} vs {b:?}");
                        assert!(t.iter().chain(s).all(|c| (-1.0..=1.0).contains(c)));
                    }
                }
            }
        }
    }

    #[test]
    fn crop_scale_and_ratio_stay_in_range() {
        let mut r = rng(1, Purpose::Views, &[]);
        let (w, h) = (640u32, 480u32);
        for _ in 0..5000 {
            let b = random_resized_crop(&mut r, w, h, [0.25, 1.0], [0.75, 4.0 / 3.0]);
            let frac = b.area() as f64 / (w * h) as f64;
            let ratio = b.w as f64 / b.h as f64;
            // Rounding w and h to integers moves area and ratio by at most a pixel's worth.
            assert!((0.245..=1.0).contains(&frac), "{frac}");
            assert!((0.74..=1.35).contains(&ratio), "{ratio}");
        }
    }

    #[test]
    fn flipped_x_is_negated_and_edges_are_plus_minus_one() {
        let b = CropBox { x1: 10, y1: 20, w: 100, h: 50 };
        assert_eq!(to_view(&b, false, 10.0, 20.0), [-1.0, -1.0]);
        assert_eq!(to_view(&b, false, 110.0, 70.0), [1.0, 1.0]);
        assert_eq!(to_view(&b, true, 35.0, 45.0), [0.5, 0.0]);
    }

    #[test]
    fn overlap_of_boxes() {
        let a = CropBox { x1: 0, y1: 0, w: 10, h: 10 };
        assert_eq!(a.overlap(&CropBox { x1: 5, y1: 8, w: 10, h: 10 }), 5 * 2);
        assert_eq!(a.overlap(&CropBox { x1: 10, y1: 0, w: 3, h: 3 }), 0);
    }
}
