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

/// A sample ready for collation: planar views `[3, S_v, S_v]` and its reference points.
#[derive(Clone, Debug, PartialEq)]
pub struct SampleViews {
    pub views: Vec<Vec<u8>>,
    pub points: RefPoints,
    pub boxes: Vec<CropBox>,
    pub flips: Vec<bool>,
    pub image_size: (u32, u32),
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
        Scratch {
            rgb: vec![],
            view: vec![],
            blur: vec![],
            resizer: fr::Resizer::new(),
        }
    }
}

pub fn make_views(
    bytes: &[u8],
    cfg: &ViewsConfig,
    seed: u64,
    epoch: u64,
    seq: u64,
    s: &mut Scratch,
) -> Result<SampleViews, String> {
    let (w, h) = decode_rgb(bytes, &mut s.rgb)?;
    make_views_rgb(w, h, cfg, seed, epoch, seq, s)
}

/// [`make_views`] on the image already decoded into the scratch buffer.
fn make_views_rgb(
    w: u32,
    h: u32,
    cfg: &ViewsConfig,
    seed: u64,
    epoch: u64,
    seq: u64,
    s: &mut Scratch,
) -> Result<SampleViews, String> {
    let mut r = rng(seed, Purpose::Views, &[epoch, seq]);
    let (boxes, overlap_fallback) = sample_boxes(&mut r, w, h, cfg);
    let src =
        fr::images::ImageRef::new(w, h, &s.rgb, fr::PixelType::U8x3).map_err(|e| e.to_string())?;
    let mut views = Vec::with_capacity(boxes.len());
    let mut flips = Vec::with_capacity(boxes.len());
    for (v, b) in boxes.iter().enumerate() {
        let size = cfg.view_size(v);
        crop_resize(&mut s.resizer, &src, b, size, &mut s.view)?;
        let photo = draw_photometric(&mut r, cfg, v.min(2));
        apply_photometric(
            &mut s.view,
            size,
            &photo,
            cfg.solarize_threshold,
            &mut s.blur,
        );
        flips.push(photo.flip);
        let mut planar = Vec::new();
        to_planar(&s.view, 3, &mut planar);
        views.push(planar);
    }
    let points = reference_points(&mut r, &boxes, &flips, cfg);
    Ok(SampleViews {
        views,
        points,
        boxes,
        flips,
        image_size: (w, h),
        overlap_fallback,
    })
}

/// Decode only (the benchmark's baseline): same decoder, same buffers.
pub fn decode_only(bytes: &[u8], s: &mut Scratch) -> Result<(u32, u32), String> {
    decode_rgb(bytes, &mut s.rgb)
}
