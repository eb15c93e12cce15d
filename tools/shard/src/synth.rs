//! `shard synth`: a deterministic synthetic image set for the demo run and for tests without real data.
//!
//! Each image is a scene of one to three textured shapes (four classes: circle, square, triangle, ring) on
//! a textured background, with a per-pixel mask (0 = background, 1 + class elsewhere, top-most shape
//! wins) and a class label: the class covering the most pixels. Every image is a pure function of
//! (seed, image number), so any worker count gives the same shards.

use std::path::Path;

use anyhow::Result;
use rand::Rng;
use rayon::prelude::*;

use crate::clean::encode_jpeg;
use crate::index::{Index, PackRecord};
use crate::input::ClassInfo;
use crate::pack::{ShardSet, Summary};
use crate::progress::Progress;

pub const CLASSES: [&str; 4] = ["circle", "square", "triangle", "ring"];

#[derive(Clone, Debug)]
pub struct SynthOptions {
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
    let s = size as f32;
    let color =
        |rng: &mut rand_chacha::ChaCha8Rng| [0; 3].map(|_: u8| rng.random_range(20.0..235.0f32));
    let (bg1, bg2) = (color(&mut rng), color(&mut rng));
    let (fx, fy, phase) = (
        rng.random_range(0.0..0.15f32),
        rng.random_range(0.0..0.15f32),
        rng.random_range(0.0..6.3f32),
    );
    let shapes: Vec<Shape> = (0..rng.random_range(1..=max_shapes.max(1)))
        .map(|_| Shape {
            class: rng.random_range(0..CLASSES.len()),
            cx: rng.random_range(0.2 * s..0.8 * s),
            cy: rng.random_range(0.2 * s..0.8 * s),
            r: rng.random_range(0.12 * s..0.3 * s),
            angle: rng.random_range(0.0..std::f32::consts::TAU),
            color: color(&mut rng),
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
        (0..CLASSES.len())
            .max_by_key(|&c| (area[c], std::cmp::Reverse(c)))
            .unwrap_or(0)
    };
    (rgb, mask, label)
}

fn encode_sample(seed: u64, i: u64, opts: &SynthOptions) -> Result<Vec<(&'static str, Vec<u8>)>> {
    let (rgb, mask, label) = render(seed, i, opts.size, opts.max_shapes);
    let jpeg =
        encode_jpeg(&rgb, opts.size, opts.size, 3, opts.quality).map_err(anyhow::Error::msg)?;
    let mut png = vec![];
    image::GrayImage::from_raw(opts.size, opts.size, mask)
        .ok_or_else(|| anyhow::anyhow!("mask buffer size"))?
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)?;
    let json = serde_json::json!({
        "source": format!("synth:{seed}:{i}"),
        "class": label,
        "class_id": CLASSES[label],
        "width": opts.size,
        "height": opts.size,
        "channels": 3,
        "cleaning": [],
    });
    Ok(vec![
        ("jpg", jpeg),
        ("cls", label.to_string().into_bytes()),
        ("json", serde_json::to_vec(&json)?),
        ("seg.png", png),
    ])
}

pub fn synth(out: &Path, opts: &SynthOptions) -> Result<(Index, Summary)> {
    anyhow::ensure!(
        opts.count > 0 && opts.size >= 16,
        "synth needs --count >= 1 and --size >= 16"
    );
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
        extra: serde_json::json!({ "count": opts.count, "size": opts.size, "max_shapes": opts.max_shapes }),
    };
    let (mut set, start) = ShardSet::open(out, record, opts.count, false, opts.force)?;
    let mut progress = Progress::new("synth", opts.count as u64, opts.quiet);
    let ids: Vec<u64> = (start as u64..opts.count as u64).collect();
    for chunk in ids.chunks(256) {
        let samples: Vec<_> = chunk
            .par_iter()
            .map(|&i| encode_sample(opts.seed, i, opts))
            .collect();
        let mut bytes = 0;
        for (&i, sample) in chunk.iter().zip(samples) {
            let sample = sample?;
            let refs: Vec<(&str, &[u8])> = sample.iter().map(|(e, d)| (*e, d.as_slice())).collect();
            bytes += refs.iter().map(|(_, d)| d.len() as u64).sum::<u64>();
            set.append(i as usize, &format!("synth_{i:07}"), &refs)?;
        }
        progress.inc(chunk.len() as u64, bytes);
    }
    let classes = CLASSES
        .iter()
        .enumerate()
        .map(|(index, id)| ClassInfo {
            index,
            id: id.to_string(),
            name: None,
        })
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
}
