//! Pictures of what a backbone learned (DINO's `visualize_attention.py`, the paper's Figure 6): the last
//! block's CLS attention over the patches per head, optionally thresholded to keep 60% of the attention
//! mass, and the first three principal components of the patch features as RGB.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use burn::tensor::Device;
use image::{Rgb, RgbImage};

use crate::eval;
use crate::model::params::host;
use crate::model::vit::Vit;

/// A perceptual colour map (viridis, five anchors interpolated) for a value in [0, 1].
fn viridis(t: f32) -> Rgb<u8> {
    const A: [[f32; 3]; 5] =
        [[68., 1., 84.], [59., 82., 139.], [33., 145., 140.], [94., 201., 98.], [253., 231., 37.]];
    let t = t.clamp(0.0, 1.0) * 4.0;
    let i = (t.floor() as usize).min(3);
    let f = t - i as f32;
    Rgb(std::array::from_fn(|c| (A[i][c] + (A[i + 1][c] - A[i][c]) * f) as u8))
}

/// A `g x g` map scaled to [0, 1] and drawn `cell` pixels per patch (nearest, as DINO upsamples).
fn heat(map: &[f32], g: usize, cell: usize) -> RgbImage {
    let (lo, hi) = map.iter().fold((f32::MAX, f32::MIN), |(a, b), &v| (a.min(v), b.max(v)));
    RgbImage::from_fn((g * cell) as u32, (g * cell) as u32, |x, y| {
        let v = map[(y as usize / cell) * g + x as usize / cell];
        viridis(if hi > lo { (v - lo) / (hi - lo) } else { 0.0 })
    })
}

/// Keeps the highest-attention patches that together hold `mass` of the total (DINO's `--threshold`).
pub fn threshold_mask(attn: &[f32], mass: f32) -> Vec<bool> {
    let total: f32 = attn.iter().sum();
    let mut idx: Vec<usize> = (0..attn.len()).collect();
    idx.sort_by(|&a, &b| attn[b].total_cmp(&attn[a]));
    let mut keep = vec![false; attn.len()];
    let mut acc = 0.0;
    for i in idx {
        if acc >= mass * total {
            break;
        }
        keep[i] = true;
        acc += attn[i];
    }
    keep
}

/// The top `k` principal directions of the rows of `x` ([n, d]) by power iteration with deflation on
/// the covariance; returns the projections `[n, k]`.
pub fn pca_project(x: &[f32], n: usize, d: usize, k: usize) -> Vec<f32> {
    let mean: Vec<f64> =
        (0..d).map(|j| (0..n).map(|i| x[i * d + j] as f64).sum::<f64>() / n as f64).collect();
    let xc: Vec<f64> = (0..n * d).map(|i| x[i] as f64 - mean[i % d]).collect();
    let mut cov = vec![0f64; d * d];
    for i in 0..n {
        let row = &xc[i * d..(i + 1) * d];
        for a in 0..d {
            for b in 0..d {
                cov[a * d + b] += row[a] * row[b];
            }
        }
    }
    let mut out = vec![0f32; n * k];
    for c in 0..k {
        let mut v: Vec<f64> = (0..d).map(|j| 1.0 + (j as f64 * 0.37).sin()).collect();
        for _ in 0..200 {
            let w: Vec<f64> = (0..d).map(|a| (0..d).map(|b| cov[a * d + b] * v[b]).sum()).collect();
            let norm = w.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-30);
            v = w.into_iter().map(|x| x / norm).collect();
        }
        let lambda: f64 = (0..d).map(|a| v[a] * (0..d).map(|b| cov[a * d + b] * v[b]).sum::<f64>()).sum();
        for a in 0..d {
            for b in 0..d {
                cov[a * d + b] -= lambda * v[a] * v[b];
            }
        }
        for i in 0..n {
            out[i * k + c] = (0..d).map(|j| xc[i * d + j] * v[j]).sum::<f64>() as f32;
        }
    }
    out
}

/// Draws the pictures of `image` into `out_dir`; `size` is the input side (a multiple of the patch).
pub fn draw(
    vit: &Vit,
    image: &Path,
    out_dir: &Path,
    size: usize,
    threshold: Option<f32>,
    device: &Device,
) -> Result<Vec<PathBuf>> {
    let p = vit.cfg.patch_size;
    if size == 0 || !size.is_multiple_of(p) || size > common::config::MAX_VIEW_SIZE {
        bail!(
            "image size {size} (--size) must be a positive multiple of the model's patch size {p} up to {}, \
             e.g. {}",
            common::config::MAX_VIEW_SIZE,
            (size.div_ceil(p)).clamp(1, common::config::MAX_VIEW_SIZE / p) * p
        );
    }
    let bytes = common::files::read_regular(image, common::files::MAX_IMAGE_BYTES)
        .with_context(|| format!("reading {}", image.display()))?;
    // The largest centred square, resized to `size`.
    let pre = eval::Preprocess { resize: size, crop: size, squash: false };
    let mut prep = eval::Prep::default();
    let pixels = eval::prepare(&bytes, pre, &mut prep).map_err(|e| anyhow!("{}: {e}", image.display()))?;
    let crop = loader::augment::to_interleaved(&pixels);
    let item = eval::Item { pixels, label: -1, key: String::new(), mask: None };
    let out = vit.forward(eval::to_tensor(&[item], size, device), None, &[], true);
    let attn = host(out.attn.ok_or_else(|| anyhow!("no attention returned"))?); // [H * N]
    let patches = host(out.patches); // [N * D]
    let heads = vit.cfg.num_heads;
    let n = attn.len() / heads;
    let g = (n as f64).sqrt() as usize;
    let cell = vit.cfg.patch_size;
    std::fs::create_dir_all(out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let mut written = Vec::new();
    let picture =
        RgbImage::from_raw(size as u32, size as u32, crop).ok_or_else(|| anyhow!("image buffer"))?;
    let p = out_dir.join("image.png");
    picture.save(&p)?;
    written.push(p);
    let mut row = RgbImage::new(((heads + 1) * size) as u32, size as u32);
    image::imageops::replace(&mut row, &picture, 0, 0);
    for hd in 0..heads {
        let map = &attn[hd * n..(hd + 1) * n];
        let img = heat(map, g, cell);
        let p = out_dir.join(format!("attn-head{hd}.png"));
        img.save(&p)?;
        written.push(p);
        image::imageops::replace(&mut row, &img, ((hd + 1) * size) as i64, 0);
        if let Some(mass) = threshold {
            let keep = threshold_mask(map, mass);
            let masked = RgbImage::from_fn(size as u32, size as u32, |x, y| {
                let k = keep[(y as usize / cell) * g + x as usize / cell];
                let px = picture.get_pixel(x, y).0;
                if k { Rgb(px) } else { Rgb(px.map(|v| v / 4)) }
            });
            let p = out_dir.join(format!("attn-head{hd}-mass{:.0}.png", mass * 100.0));
            masked.save(&p)?;
            written.push(p);
        }
    }
    let p = out_dir.join("attn-heads.png");
    row.save(&p)?;
    written.push(p);
    let d = patches.len() / n;
    let proj = pca_project(&patches, n, d, 3);
    let ranges: Vec<(f32, f32)> = (0..3)
        .map(|c| {
            (0..n).fold((f32::MAX, f32::MIN), |(a, b), i| (a.min(proj[i * 3 + c]), b.max(proj[i * 3 + c])))
        })
        .collect();
    let pca = RgbImage::from_fn(size as u32, size as u32, |x, y| {
        let i = (y as usize / cell) * g + x as usize / cell;
        Rgb(std::array::from_fn(|c| {
            let (lo, hi) = ranges[c];
            (255.0 * if hi > lo { (proj[i * 3 + c] - lo) / (hi - lo) } else { 0.5 }) as u8
        }))
    });
    let p = out_dir.join("pca.png");
    pca.save(&p)?;
    written.push(p);
    Ok(written)
}
