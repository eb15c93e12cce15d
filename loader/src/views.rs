//! One sample's views: decode, draw the crop boxes (with the overlap bound), make each view
//! (crop + resize, flip, jitter, grayscale, blur, solarise), and place the reference points. Every draw
//! comes from one ChaCha stream seeded by (seed, epoch, seq), in a fixed order: boxes, then each view's
//! photometric choices, then the points.

use fast_image_resize as fr;

use common::config::ViewsConfig;
use common::geometry::{CropBox, RefPoints, reference_points, sample_boxes};
use common::seed::{Purpose, rng};

use crate::augment::{apply_photometric, crop_resize, draw_photometric, to_planar};
use crate::decode::decode_rgb;
use crate::error::{Error, Result};

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
pub struct Scratch {
    rgb: Vec<u8>,
    view: Vec<u8>,
    blur: Vec<u8>,
    resizer: fr::Resizer,
}

impl Default for Scratch {
    fn default() -> Self {
        Scratch { rgb: vec![], view: vec![], blur: vec![], resizer: fr::Resizer::new() }
    }
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
        crop_resize(&mut s.resizer, &src, b, size, &mut s.view)?;
        // Every photometric operation works on the planar layout of `common::Batch`.
        let mut planar = Vec::new();
        to_planar(&s.view, &mut planar);
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
