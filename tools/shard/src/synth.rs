//! `shard synth`: deterministic synthetic image sets for the demo run and for tests without real data.
//!
//! Two kinds, both four classes with per-pixel masks (0 = background, 1 + class elsewhere). Every image is
//! a pure function of (seed, image number), so any worker count gives the same shards.
//!
//! - `shapes`: a scene of one to three textured shapes (circle, square, triangle, ring) on a textured
//!   background; the label is the class covering the most pixels (top-most shape wins). Good for masks and
//!   pictures, but a class lives in a part of the image that a random crop may miss.
//! - `palettes`: the class is a colour palette (two complementary hues, or three hues a third of a turn
//!   apart: every class averages to about gray), painted over a random shapes scene, and every image gets
//!   its own brightness, contrast and saturation within the loader's jitter ranges. A randomly initialised
//!   ViT's features mostly carry an image's mean colour and brightness, which say little here (k-NN about
//!   59% at 64 px, chance 25%); what every view of an image shares is which hues it holds, the signal
//!   DINO's objective rewards. `configs/palettes-cpu.toml` trains on it to about 82% in 2000 CPU steps,
//!   the check that pretraining learns something a random network does not have.

use std::path::Path;

use rand::Rng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use crate::clean::encode_jpeg;
use crate::error::{Error, Result};
use crate::index::{Index, PackRecord};
use crate::input::ClassInfo;
use crate::pack::{ShardSet, Summary, at_least, check_prefix, in_range};
use crate::progress::Progress;

pub const CLASSES: [&str; 4] = ["circle", "square", "triangle", "ring"];
pub const PALETTE_CLASSES: [&str; 4] = ["red-cyan", "green-violet", "red-green-blue", "yellow-cyan-magenta"];

/// Which synthetic set to make (see the module docs).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum SynthKind {
    #[default]
    Shapes,
    Palettes,
}

/// The hues (degrees) of each `palettes` class: two complementary pairs and two triads, so that every
/// class averages to about gray, and no two classes are within the loader's hue jitter (±36°).
const PALETTES: [&[f32]; 4] = [&[0.0, 180.0], &[90.0, 270.0], &[0.0, 120.0, 240.0], &[60.0, 180.0, 300.0]];

impl SynthKind {
    pub fn name(self) -> &'static str {
        match self {
            SynthKind::Shapes => "shapes",
            SynthKind::Palettes => "palettes",
        }
    }

    pub fn classes(self) -> [&'static str; 4] {
        match self {
            SynthKind::Shapes => CLASSES,
            SynthKind::Palettes => PALETTE_CLASSES,
        }
    }
}

/// The generator's settings. `Default` is `shard synth`'s command-line defaults.
#[derive(Clone, Debug)]
pub struct SynthOptions {
    pub kind: SynthKind,
    pub count: usize,
    pub size: u32,
    /// Shapes per scene are drawn from 1..=max_shapes (3 by default; 1 gives one object per image).
    pub max_shapes: usize,
    pub seed: u64,
    pub prefix: String,
    pub per_shard: u64,
    pub zstd_level: Option<i32>,
    pub quality: u8,
    pub force: bool,
    pub quiet: bool,
}

impl Default for SynthOptions {
    fn default() -> Self {
        Self {
            kind: SynthKind::Shapes,
            count: 512,
            size: 128,
            max_shapes: 3,
            seed: 0,
            prefix: "train".into(),
            per_shard: 256,
            zstd_level: None,
            quality: 95,
            force: false,
            quiet: false,
        }
    }
}

/// What a synthetic set records about its generator in its index (`options.extra`): the settings that
/// decide its images' content besides the seed. The index records the rest of [`SynthOptions`] that
/// shapes the set's bytes (prefix, samples per shard, JPEG quality, zstd level) in its common fields.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SynthRecord {
    /// Sets from before the option were shapes.
    #[serde(default)]
    pub kind: SynthKind,
    pub count: usize,
    pub size: u32,
    /// Sets from before the option had up to three shapes.
    #[serde(default = "three")]
    pub max_shapes: usize,
}

fn three() -> usize {
    3
}

impl SynthRecord {
    pub fn of(opts: &SynthOptions) -> Self {
        Self { kind: opts.kind, count: opts.count, size: opts.size, max_shapes: opts.max_shapes }
    }

    /// Whether `dir` holds exactly the set `opts` makes, byte for byte (same generator settings, seed,
    /// prefix, samples per shard, quality and compression), so that it can be reused as it is.
    pub fn is_current(dir: &Path, opts: &SynthOptions) -> bool {
        let Ok(index) = Index::load(&dir.join(crate::index::INDEX_FILE)) else {
            return false;
        };
        let o = &index.options;
        o.layout == "synth"
            && serde_json::from_value::<SynthRecord>(o.extra.clone()).ok() == Some(Self::of(opts))
            && o.seed == opts.seed
            && o.prefix == opts.prefix
            && o.per_shard == Some(opts.per_shard)
            && o.quality == opts.quality
            && o.zstd_level == opts.zstd_level
    }
}

struct Shape {
    class: usize,
    cx: f32,
    cy: f32,
    r: f32,
    angle: f32,
    color: [f32; 3],
    freq: f32,
}

impl Shape {
    /// Whether pixel centre (x, y) lies inside the shape.
    fn contains(&self, x: f32, y: f32) -> bool {
        let (dx, dy) = (x - self.cx, y - self.cy);
        let (c, s) = (self.angle.cos(), self.angle.sin());
        let (u, v) = (c * dx + s * dy, -s * dx + c * dy);
        match self.class {
            0 => dx * dx + dy * dy <= self.r * self.r,
            1 => u.abs() <= self.r * 0.85 && v.abs() <= self.r * 0.85,
            2 => {
                // Equilateral triangle with circumradius r, pointing up in its own frame.
                let h = self.r * 0.5;
                v <= h && v >= -self.r + 3f32.sqrt() * u.abs() && v >= -self.r
            }
            _ => {
                let d2 = dx * dx + dy * dy;
                d2 <= self.r * self.r && d2 >= (0.55 * self.r).powi(2)
            }
        }
    }

    /// Class-specific texture: shading (circle), stripes (square), checks (triangle), flat (ring).
    fn shade(&self, x: f32, y: f32) -> f32 {
        match self.class {
            0 => 1.0 - 0.5 * (((x - self.cx).powi(2) + (y - self.cy).powi(2)).sqrt() / self.r),
            1 => 0.65 + 0.35 * (self.freq * y).sin().signum(),
            2 => 0.65 + 0.35 * ((self.freq * x).sin() * (self.freq * y).sin()).signum(),
            _ => 1.0,
        }
    }
}

/// Renders image `i`: (RGB pixels, mask, label).
pub fn render(seed: u64, i: u64, size: u32, max_shapes: usize) -> (Vec<u8>, Vec<u8>, usize) {
    let mut rng = common::seed::rng(seed, common::seed::Purpose::Synth, &[i]);
    let mut color = |rng: &mut ChaCha8Rng| [0; 3].map(|_: u8| rng.random_range(20.0..235.0f32));
    scene(&mut rng, size, max_shapes, &mut color)
}

/// A scene of shapes on a two-colour background, its colours drawn by `color`: (RGB, mask, label).
fn scene(
    rng: &mut ChaCha8Rng,
    size: u32,
    max_shapes: usize,
    color: &mut dyn FnMut(&mut ChaCha8Rng) -> [f32; 3],
) -> (Vec<u8>, Vec<u8>, usize) {
    let s = size as f32;
    let (bg1, bg2) = (color(rng), color(rng));
    let (fx, fy, phase) =
        (rng.random_range(0.0..0.15f32), rng.random_range(0.0..0.15f32), rng.random_range(0.0..6.3f32));
    let shapes: Vec<Shape> = (0..rng.random_range(1..=max_shapes.max(1)))
        .map(|_| Shape {
            class: rng.random_range(0..CLASSES.len()),
            cx: rng.random_range(0.2 * s..0.8 * s),
            cy: rng.random_range(0.2 * s..0.8 * s),
            r: rng.random_range(0.12 * s..0.3 * s),
            angle: rng.random_range(0.0..std::f32::consts::TAU),
            color: color(rng),
            freq: rng.random_range(0.4..1.2f32),
        })
        .collect();
    let n = (size * size) as usize;
    let (mut rgb, mut mask) = (Vec::with_capacity(n * 3), Vec::with_capacity(n));
    let mut area = [0usize; CLASSES.len()];
    for y in 0..size {
        for x in 0..size {
            let (px, py) = (x as f32 + 0.5, y as f32 + 0.5);
            let t = 0.5 + 0.5 * (fx * px + fy * py + phase).sin();
            let noise = rng.random_range(-12.0..12.0f32);
            let mut pixel = [0, 1, 2].map(|c| bg1[c] * t + bg2[c] * (1.0 - t) + noise);
            let mut label = 0u8;
            for shape in shapes.iter().filter(|sh| sh.contains(px, py)) {
                let k = shape.shade(px, py);
                pixel = [0, 1, 2].map(|c| shape.color[c] * k + noise);
                label = shape.class as u8 + 1;
            }
            if label > 0 {
                area[label as usize - 1] += 1;
            }
            rgb.extend(pixel.map(|v| v.clamp(0.0, 255.0) as u8));
            mask.push(label);
        }
    }
    // Ties go to the lower class index; a scene always has at least one visible shape pixel in practice,
    // and an empty one is labelled by its first shape.
    let label = if area.iter().all(|&a| a == 0) {
        shapes[0].class
    } else {
        (0..CLASSES.len()).max_by_key(|&c| (area[c], std::cmp::Reverse(c))).unwrap_or(0)
    };
    (rgb, mask, label)
}

/// Renders palettes image `i`: (RGB pixels, mask, label). A scene of the shapes generator (shapes,
/// shading and stripes on a background blended from two colours) whose colours are all drawn from the
/// class's palette (its hues ±10°, saturation 0.5 to 0.8, value 0.6 to 0.9; the blend also shows hues
/// between two of them), then one colour change for the whole image: brightness, contrast and
/// saturation, each by a factor in 0.6 to 1.4 (the loader's jitter ranges). The mask is the label
/// everywhere.
pub fn render_palette(seed: u64, i: u64, size: u32, max_shapes: usize) -> (Vec<u8>, Vec<u8>, usize) {
    let mut rng = common::seed::rng(seed, common::seed::Purpose::Synth, &[i]);
    let label = rng.random_range(0..PALETTES.len());
    let hues = PALETTES[label];
    let mut color = |rng: &mut ChaCha8Rng| {
        let h = hues[rng.random_range(0..hues.len())] + rng.random_range(-10.0..10.0f32);
        let (sat, val) = (rng.random_range(0.5..0.8f32), rng.random_range(0.6..0.9f32));
        hsv(h, sat, val)
    };
    let (mut rgb, _, _) = scene(&mut rng, size, max_shapes, &mut color);
    let brightness = rng.random_range(0.6..1.4f32);
    let contrast = rng.random_range(0.6..1.4f32);
    let saturation = rng.random_range(0.6..1.4f32);
    for px in rgb.chunks_exact_mut(3) {
        // Brightness and contrast (about mid-gray) change every channel alike and saturation scales the
        // distance from the luma, so each keeps a pixel's hue: the palette survives, the brightness differs.
        let mut v = [0, 1, 2].map(|c| (px[c] as f32 * brightness - 128.0) * contrast + 128.0);
        let luma = 0.299 * v[0] + 0.587 * v[1] + 0.114 * v[2];
        v = v.map(|x| luma + (x - luma) * saturation);
        for (out, x) in px.iter_mut().zip(v) {
            *out = x.clamp(0.0, 255.0) as u8;
        }
    }
    let n = (size * size) as usize;
    (rgb, vec![label as u8 + 1; n], label)
}

/// HSV (hue in degrees) to RGB in 0..255.
fn hsv(h: f32, s: f32, v: f32) -> [f32; 3] {
    let h = h.rem_euclid(360.0) / 60.0;
    let c = v * s;
    let x = c * (1.0 - (h % 2.0 - 1.0).abs());
    let (r, g, b) = match h as u32 {
        0 => (c, x, 0.0),
        1 => (x, c, 0.0),
        2 => (0.0, c, x),
        3 => (0.0, x, c),
        4 => (x, 0.0, c),
        _ => (c, 0.0, x),
    };
    let m = v - c;
    [r, g, b].map(|u| (u + m) * 255.0)
}

fn encode_sample(seed: u64, i: u64, opts: &SynthOptions) -> Result<Vec<(&'static str, Vec<u8>)>> {
    let (rgb, mask, label) = match opts.kind {
        SynthKind::Shapes => render(seed, i, opts.size, opts.max_shapes),
        SynthKind::Palettes => render_palette(seed, i, opts.size, opts.max_shapes),
    };
    // A generated sample has no file: its errors name it by the source its JSON records.
    let source = format!("synth:{seed}:{i}");
    let failed = |e: Error| e.in_file(Path::new(&source));
    let jpeg = encode_jpeg(&rgb, opts.size, opts.size, 3, opts.quality).map_err(failed)?;
    let mut png = vec![];
    image::GrayImage::from_raw(opts.size, opts.size, mask)
        .ok_or_else(|| failed(Error::image("mask buffer of the wrong size")))?
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .map_err(|e| failed(Error::image(format!("cannot encode the mask: {e}"))))?;
    let json = serde_json::json!({
        "source": source,
        "class": label,
        "class_id": opts.kind.classes()[label],
        "width": opts.size,
        "height": opts.size,
        "channels": 3,
        "cleaning": [],
    });
    Ok(vec![
        ("jpg", jpeg),
        ("cls", label.to_string().into_bytes()),
        (
            "json",
            serde_json::to_vec(&json).map_err(|e| failed(Error::image(format!("cannot describe: {e}"))))?,
        ),
        ("seg.png", png),
    ])
}

pub fn synth(out: &Path, opts: &SynthOptions) -> Result<(Index, Summary)> {
    if opts.count == 0 {
        return Err(Error::InvalidOption {
            option: "--count",
            problem: "synth needs at least 1 image".into(),
        });
    }
    if !(16..=65_535).contains(&opts.size) {
        return Err(Error::InvalidOption {
            option: "--size",
            problem: format!("{} px: synth needs 16 to 65535 (the JPEG limit)", opts.size),
        });
    }
    check_prefix(&opts.prefix)?;
    at_least("--per-shard", opts.per_shard, 1, "")?;
    at_least("--max-shapes", opts.max_shapes as u64, 1, "")?;
    in_range("--quality", opts.quality as i64, 1, 100)?;
    if let Some(level) = opts.zstd_level {
        in_range("--zstd", level as i64, 1, 22)?;
    }
    let record = PackRecord {
        tool: format!("shard {}", env!("CARGO_PKG_VERSION")),
        layout: "synth".into(),
        input: "synth".into(),
        list: None,
        masks: None,
        class_names: None,
        seed: opts.seed,
        prefix: opts.prefix.clone(),
        shard_bytes: u64::MAX,
        per_shard: Some(opts.per_shard),
        quality: opts.quality,
        max_side: None,
        zstd_level: opts.zstd_level,
        follow_links_out: false,
        extra: serde_json::to_value(SynthRecord::of(opts))
            .map_err(|e| Error::output(out, format!("cannot record the generator settings: {e}")))?,
    };
    let (mut set, start) = ShardSet::open(out, record, opts.count, String::new(), false, opts.force)?;
    let mut progress = Progress::new("synth", opts.count as u64, opts.quiet);
    let ids: Vec<u64> = (start as u64..opts.count as u64).collect();
    for chunk in ids.chunks(256) {
        let samples: Vec<_> = chunk.par_iter().map(|&i| encode_sample(opts.seed, i, opts)).collect();
        let mut bytes = 0;
        for (&i, sample) in chunk.iter().zip(samples) {
            let sample = sample?;
            let refs: Vec<(&str, &[u8])> = sample.iter().map(|(e, d)| (*e, d.as_slice())).collect();
            bytes += refs.iter().map(|(_, d)| d.len() as u64).sum::<u64>();
            set.append(i as usize, &format!("synth_{i:07}"), &refs)?;
        }
        progress.inc(chunk.len() as u64, bytes);
    }
    let classes = opts
        .kind
        .classes()
        .iter()
        .enumerate()
        .map(|(index, id)| ClassInfo { index, id: id.to_string(), name: None })
        .collect();
    let members = ["jpg", "cls", "json", "seg.png"].map(String::from).to_vec();
    let index = set.finish(classes, members)?;
    let elapsed = progress.finish();
    let summary = Summary {
        samples: index.total_samples,
        skipped: 0,
        shards: index.shards.len(),
        bytes: index.total_bytes,
        elapsed,
    };
    Ok((index, summary))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_is_deterministic_and_labels_the_largest_class() {
        let (a, mask, label) = render(3, 17, 64, 3);
        let (b, mask_b, label_b) = render(3, 17, 64, 3);
        assert_eq!((&a, &mask, label), (&b, &mask_b, label_b));
        assert_ne!(render(3, 18, 64, 3).0, a);
        let mut area = [0usize; 4];
        for &m in &mask {
            if m > 0 {
                area[m as usize - 1] += 1;
            }
        }
        assert_eq!(area[label], *area.iter().max().unwrap());
        assert!(area[label] > 0, "a scene shows at least one shape");
    }

    #[test]
    fn palette_images_are_deterministic_labelled_everywhere_and_cover_the_classes() {
        let (a, mask, label) = render_palette(3, 17, 48, 3);
        assert_eq!(render_palette(3, 17, 48, 3), (a.clone(), mask.clone(), label));
        assert_ne!(render_palette(3, 18, 48, 3).0, a);
        assert!(mask.iter().all(|&m| m as usize == label + 1));
        let mut seen = [0usize; 4];
        for i in 0..64 {
            seen[render_palette(9, i, 32, 3).2] += 1;
        }
        assert!(seen.iter().all(|&n| n >= 8), "64 images spread over the classes: {seen:?}");
    }
}
