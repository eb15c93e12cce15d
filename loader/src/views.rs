//! One sample's views: decode, draw the crop boxes (with the overlap bound), make each view
//! (crop + resize, flip, jitter, grayscale, blur, solarise), and place the reference points. Every draw
//! comes from one ChaCha stream seeded by (seed, epoch, seq), in a fixed order: boxes, then each view's
//! photometric choices, then the points.

use fast_image_resize as fr;

use common::config::ViewsConfig;
use common::geometry::{CropBox, RefPoints, reference_points, sample_boxes};
use common::seed::{Purpose, rng};

use crate::augment::{apply_photometric, draw_photometric};
use crate::decode::decode_rgb;
use crate::error::{Error, Result};
use crate::resize::{Resampler, crop_resize_planar};

/// A sample ready for collation: planar views `[3, S_v, S_v]` and its reference points.
#[derive(Clone, Debug, PartialEq)]
pub struct SampleViews {
    pub views: Vec<Vec<u8>>,
    pub points: RefPoints,
    pub boxes: Vec<CropBox>,
    pub flips: Vec<bool>,
    /// A view needed the documented fallback of the overlap redraw loop.
    pub overlap_fallback: bool,
}

/// Buffers a worker reuses from sample to sample.
#[derive(Default)]
pub struct Scratch {
    rgb: Vec<u8>,
    blur: crate::augment::BlurScratch,
    resampler: Resampler,
}

pub fn make_views(
    bytes: &[u8],
    cfg: &ViewsConfig,
    seed: u64,
    epoch: u64,
    seq: u64,
    s: &mut Scratch,
) -> Result<SampleViews> {
    let (w, h) = decode_rgb(bytes, &mut s.rgb)?;
    let mut r = rng(seed, Purpose::Views, &[epoch, seq]);
    let (boxes, overlap_fallback) = sample_boxes(&mut r, w, h, cfg);
    let src = fr::images::ImageRef::new(w, h, &s.rgb, fr::PixelType::U8x3)
        .map_err(|e| Error::image(format!("decoded image: {e}")))?;
    let mut views = Vec::with_capacity(boxes.len());
    let mut flips = Vec::with_capacity(boxes.len());
    for (v, b) in boxes.iter().enumerate() {
        let size = cfg.view_size(v);
        // Every photometric operation works on the planar layout of `common::Batch`.
        let mut planar = Vec::new();
        crop_resize_planar(&mut s.resampler, &src, b, size, &mut planar)?;
        let photo = draw_photometric(&mut r, cfg, v.min(2));
        apply_photometric(&mut planar, size, &photo, cfg.solarize_threshold, &mut s.blur);
        flips.push(photo.flip);
        views.push(planar);
    }
    let points = reference_points(&mut r, &boxes, &flips, cfg);
    Ok(SampleViews { views, points, boxes, flips, overlap_fallback })
}

/// Decode only (the benchmark's baseline): same decoder, same buffers.
pub fn decode_only(bytes: &[u8], s: &mut Scratch) -> Result<(u32, u32)> {
    decode_rgb(bytes, &mut s.rgb)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An image (PNG) with structure in every direction (so a flip or a channel mix-up shows).
    fn photo() -> Vec<u8> {
        let img = image::RgbImage::from_fn(120, 90, |x, y| {
            image::Rgb([(x * 2) as u8, (y * 2) as u8, ((x * y) % 251) as u8])
        });
        let mut out = vec![];
        img.write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png).unwrap();
        out
    }

    fn plain(cfg: ViewsConfig) -> ViewsConfig {
        ViewsConfig {
            jitter_p: 0.0,
            grayscale_p: 0.0,
            blur_p: [0.0; 3],
            solarize_p: [0.0; 3],
            flip_p: 0.0,
            ..cfg
        }
    }

    #[test]
    fn a_flipped_view_is_the_mirror_of_the_unflipped_one() {
        let cfg = plain(ViewsConfig { global_size: 32, local_size: 16, ..ViewsConfig::paper_main() });
        let flipped_cfg = ViewsConfig { flip_p: 1.0, ..cfg.clone() };
        let mut s = Scratch::default();
        let a = make_views(&photo(), &cfg, 1, 0, 7, &mut s).unwrap();
        let b = make_views(&photo(), &flipped_cfg, 1, 0, 7, &mut s).unwrap();
        assert_eq!(a.boxes, b.boxes, "the same draws give the same boxes");
        assert!(b.flips.iter().all(|&f| f) && a.flips.iter().all(|&f| !f));
        for (v, (x, y)) in a.views.iter().zip(&b.views).enumerate() {
            let size = cfg.view_size(v);
            for (row_a, row_b) in x.chunks_exact(size).zip(y.chunks_exact(size)) {
                let mirrored: Vec<u8> = row_a.iter().rev().copied().collect();
                assert_eq!(mirrored, row_b, "view {v}");
            }
        }
        // The reference points of a flipped view have x negated, y unchanged.
        for (pa, pb) in a.points.student.iter().zip(&b.points.student) {
            for (p, q) in pa.chunks_exact(2).zip(pb.chunks_exact(2)) {
                assert_eq!((p[0], p[1]), (-q[0], q[1]));
            }
        }
    }

    /// Bilinear sample of plane `c` of a planar `[3, size, size]` view at a normalised point (pixel edges
    /// at ±1, as `grid_sample(align_corners=False)` reads the positional grid).
    fn sample(view: &[u8], size: usize, c: usize, p: &[f32]) -> f64 {
        let at = |v: f32| ((v as f64 + 1.0) * 0.5 * size as f64 - 0.5).clamp(0.0, size as f64 - 1.0);
        let (x, y) = (at(p[0]), at(p[1]));
        let (x0, y0) = (x.floor() as usize, y.floor() as usize);
        let (x1, y1) = ((x0 + 1).min(size - 1), (y0 + 1).min(size - 1));
        let (tx, ty) = (x - x0 as f64, y - y0 as f64);
        let px = |xx: usize, yy: usize| view[c * size * size + yy * size + xx] as f64;
        (px(x0, y0) * (1.0 - tx) + px(x1, y0) * tx) * (1.0 - ty)
            + (px(x0, y1) * (1.0 - tx) + px(x1, y1) * tx) * ty
    }

    #[test]
    fn a_reference_point_shows_the_same_pixel_in_both_views_of_its_pair() {
        // End to end through the pixels, not through the geometry's own inverse: on an image whose red
        // channel is its x and green its y, the colour under a pair's point in the teacher view g and under
        // the same point in view v must agree, whatever the boxes, sizes and flips. A flip applied to the
        // wrong view, a box other than the one cropped, or x and y swapped moves it by tens of levels.
        let (w, h) = (240u32, 180u32);
        let img = image::RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([(x * 255 / (w - 1)) as u8, (y * 255 / (h - 1)) as u8, 128])
        });
        let mut png = vec![];
        img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png).unwrap();
        let cfg = ViewsConfig {
            flip_p: 0.5,
            global_size: 64,
            local_size: 32,
            num_local: 4,
            local_scale: [0.1, 0.5],
            ..plain(ViewsConfig::paper_main())
        };
        let (m, mut worst, mut flipped) = (cfg.num_points, 0f64, 0);
        // The same read with the student's x mirrored (a flip lost or applied to the wrong view): the test
        // must tell the two apart.
        let mut worst_mirrored = 0f64;
        let mut s = Scratch::default();
        for seq in 0..40 {
            let sv = make_views(&png, &cfg, 3, 0, seq, &mut s).unwrap();
            flipped += sv.flips.iter().filter(|&&f| f).count();
            for g in 0..2 {
                for v in 0..sv.views.len() {
                    for j in 0..m {
                        let t = &sv.points.teacher[g][(v * m + j) * 2..][..2];
                        let st = &sv.points.student[v][(g * m + j) * 2..][..2];
                        for c in 0..2 {
                            let a = sample(&sv.views[g], cfg.view_size(g), c, t);
                            let b = sample(&sv.views[v], cfg.view_size(v), c, st);
                            worst = worst.max((a - b).abs());
                            let mirrored = sample(&sv.views[v], cfg.view_size(v), c, &[-st[0], st[1]]);
                            worst_mirrored = worst_mirrored.max((a - mirrored).abs());
                        }
                    }
                }
            }
        }
        assert!(flipped > 20, "both flip states are exercised ({flipped} flipped views)");
        // One level of the gradient is ~1 image pixel; a 32 px view of a 240 px box spans ~4 per pixel,
        // and the bilinear read of a resized (antialiased) view is off by at most about one view pixel.
        assert!(worst < 8.0, "a point's colour differs by {worst} levels between the views of its pair");
        assert!(worst_mirrored > 60.0, "a mirrored point must read another colour ({worst_mirrored} levels)");
    }

    #[test]
    fn views_are_planar_rgb_and_grayscale_makes_three_equal_planes() {
        let cfg = plain(ViewsConfig { global_size: 24, local_size: 24, ..ViewsConfig::paper_main() });
        let mut s = Scratch::default();
        let v = make_views(&photo(), &cfg, 2, 0, 3, &mut s).unwrap();
        // The source's red channel grows with x, green with y: in a planar view, plane 0 rises along
        // each row and plane 1 down each column.
        let view = &v.views[0];
        let n = 24 * 24;
        let (red, green) = (&view[..n], &view[n..2 * n]);
        assert!(red[23] > red[0] && green[23 * 24] > green[0], "planes are R then G");
        let gray = ViewsConfig { grayscale_p: 1.0, ..cfg };
        let g = make_views(&photo(), &gray, 2, 0, 3, &mut s).unwrap();
        for view in &g.views {
            let n = view.len() / 3;
            assert!(view[..n] == view[n..2 * n] && view[n..2 * n] == view[2 * n..]);
        }
    }
}
