//! Pixel operations of the DINO view pipeline on interleaved RGB `u8` views (`method-spec.md` §2.2):
//! crop + bicubic resize, flip, ColorJitter (the four operations in random order), grayscale, Gaussian
//! blur, solarise. Each operation rounds back to `u8`, as PIL does between operations.
//!
//! Brightness, contrast and saturation follow PIL's `ImageEnhance` (a blend with a degenerate image,
//! truncated to integers as PIL's `Image.blend` does); luma is PIL's `convert("L")`
//! (L = (19595 R + 38470 G + 7471 B + 2^15) >> 16, i.e. 0.299/0.587/0.114); hue follows torchvision's
//! tensor path (HSV in floats, h ← (h + factor) mod 1), so a full turn is the identity.
//! Float-to-byte conversions round half up, as torchvision's tensor path does before `to_pil_image`.

use fast_image_resize as fr;
use rand::Rng;
use rand::seq::SliceRandom;

/// ITU-R 601-2 luma as PIL computes it.
#[inline]
pub fn luma(r: u8, g: u8, b: u8) -> u8 {
    ((19595 * r as u32 + 38470 * g as u32 + 7471 * b as u32 + 0x8000) >> 16) as u8
}

#[inline]
fn blend(degenerate: f32, v: u8, factor: f32) -> u8 {
    // PIL's Image.blend: (int)(in1 + alpha·(in2 − in1)), clipped to 0..255.
    (degenerate + factor * (v as f32 - degenerate)).clamp(0.0, 255.0) as i32 as u8
}

/// A per-value table of `blend(degenerate, v, factor)`: brightness and contrast map each channel value
/// independently, so 256 entries replace a float multiply per byte.
fn blend_lut(degenerate: f32, factor: f32) -> [u8; 256] {
    std::array::from_fn(|v| blend(degenerate, v as u8, factor))
}

pub fn brightness(px: &mut [u8], factor: f32) {
    let lut = blend_lut(0.0, factor);
    px.iter_mut().for_each(|v| *v = lut[*v as usize]);
}

pub fn contrast(px: &mut [u8], factor: f32) {
    let n = (px.len() / 3).max(1) as u64;
    let sum: u64 = px
        .chunks_exact(3)
        .map(|p| luma(p[0], p[1], p[2]) as u64)
        .sum();
    let mean = (sum as f64 / n as f64 + 0.5).floor() as f32;
    let lut = blend_lut(mean, factor);
    px.iter_mut().for_each(|v| *v = lut[*v as usize]);
}

pub fn saturation(px: &mut [u8], factor: f32) {
    for p in px.chunks_exact_mut(3) {
        let l = luma(p[0], p[1], p[2]) as f32;
        for v in p.iter_mut() {
            *v = blend(l, *v, factor);
        }
    }
}

/// Shifts hue by `factor` turns (torchvision: factor in [−0.5, 0.5]). The HSV round trip is written in
/// terms of max, min and chroma of the pixel: with s = chroma/max, torchvision's p = v(1 − s) is min,
/// q = max − chroma·f and t = min + chroma·f, which saves the divisions and the modulo.
pub fn hue(px: &mut [u8], factor: f32) {
    let shift = factor.rem_euclid(1.0) * 6.0;
    for p in px.chunks_exact_mut(3) {
        let (r, g, b) = (p[0] as f32, p[1] as f32, p[2] as f32);
        let maxc = r.max(g).max(b);
        let minc = r.min(g).min(b);
        let cr = maxc - minc;
        if cr == 0.0 {
            continue; // gray: hue is undefined and unchanged
        }
        // Hue in sixths of a turn, [0, 6).
        let mut h = if maxc == r {
            (g - b) / cr
        } else if maxc == g {
            2.0 + (b - r) / cr
        } else {
            4.0 + (r - g) / cr
        };
        if h < 0.0 {
            h += 6.0;
        }
        h += shift;
        if h >= 6.0 {
            h -= 6.0;
        }
        let i = h.floor();
        let f = h - i;
        let (q, t) = (maxc - cr * f, minc + cr * f);
        let (r2, g2, b2) = match i as i32 {
            0 => (maxc, t, minc),
            1 => (q, maxc, minc),
            2 => (minc, maxc, t),
            3 => (minc, q, maxc),
            4 => (t, minc, maxc),
            _ => (maxc, minc, q),
        };
        p[0] = (r2 + 0.5) as u8;
        p[1] = (g2 + 0.5) as u8;
        p[2] = (b2 + 0.5) as u8;
    }
}

pub fn grayscale(px: &mut [u8]) {
    for p in px.chunks_exact_mut(3) {
        let l = luma(p[0], p[1], p[2]);
        p.fill(l);
    }
}

pub fn solarize(px: &mut [u8], threshold: u8) {
    for v in px.iter_mut() {
        if *v >= threshold {
            *v = 255 - *v;
        }
    }
}

pub fn flip_horizontal(px: &mut [u8], size: usize) {
    for row in px.chunks_exact_mut(size * 3) {
        let (mut a, mut b) = (0, size - 1);
        while a < b {
            for c in 0..3 {
                row.swap(a * 3 + c, b * 3 + c);
            }
            a += 1;
            b -= 1;
        }
    }
}

/// Separable Gaussian blur with standard deviation `sigma` (PIL's GaussianBlur radius), taps out to
/// 3σ, borders extended. `scratch` is reused between calls. Both passes run along rows of contiguous
/// memory (the vertical pass accumulates whole weighted rows) so the compiler vectorises them.
pub fn gaussian_blur(px: &mut [u8], size: usize, sigma: f32, scratch: &mut Vec<f32>) {
    let radius = ((3.0 * sigma).ceil().max(1.0) as usize)
        .min(size.saturating_sub(1))
        .max(1);
    let kernel: Vec<f32> = (0..=2 * radius)
        .map(|i| {
            let d = i as f32 - radius as f32;
            (-(d * d) / (2.0 * sigma * sigma)).exp()
        })
        .collect();
    let norm: f32 = kernel.iter().sum();
    let kernel: Vec<f32> = kernel.iter().map(|k| k / norm).collect();
    let stride = size * 3;
    scratch.clear();
    scratch.resize(px.len() + stride, 0.0);
    let (tmp, acc) = scratch.split_at_mut(px.len());
    // Horizontal pass into tmp: a padded row (borders extended) convolved tap by tap.
    let mut padded = vec![0f32; (size + 2 * radius) * 3];
    for y in 0..size {
        let row = &px[y * stride..(y + 1) * stride];
        for (x, p) in padded.chunks_exact_mut(3).enumerate() {
            let sx = x.saturating_sub(radius).min(size - 1) * 3;
            p.copy_from_slice(&[row[sx] as f32, row[sx + 1] as f32, row[sx + 2] as f32]);
        }
        let out = &mut tmp[y * stride..(y + 1) * stride];
        out.fill(0.0);
        for (k, &w) in kernel.iter().enumerate() {
            for (o, &p) in out.iter_mut().zip(&padded[k * 3..k * 3 + stride]) {
                *o += w * p;
            }
        }
    }
    // Vertical pass: each output row is a weighted sum of whole input rows.
    for y in 0..size {
        acc.fill(0.0);
        for (k, &w) in kernel.iter().enumerate() {
            let sy = (y + k).saturating_sub(radius).min(size - 1);
            for (a, &t) in acc.iter_mut().zip(&tmp[sy * stride..(sy + 1) * stride]) {
                *a += w * t;
            }
        }
        for (o, &a) in px[y * stride..(y + 1) * stride].iter_mut().zip(acc.iter()) {
            *o = (a + 0.5).clamp(0.0, 255.0) as u8;
        }
    }
}

/// Crops `(x1, y1, w, h)` of an interleaved RGB image and resizes it to `size`² with bicubic
/// (Catmull-Rom, PIL's a = −0.5) convolution, antialiased when shrinking as PIL is.
pub fn crop_resize(
    resizer: &mut fr::Resizer,
    src: &fr::images::ImageRef<'_>,
    b: &crate::CropBox,
    size: usize,
    out: &mut Vec<u8>,
) -> Result<(), String> {
    out.clear();
    out.resize(size * size * 3, 0);
    let mut dst = fr::images::Image::from_slice_u8(
        size as u32,
        size as u32,
        out.as_mut_slice(),
        fr::PixelType::U8x3,
    )
    .map_err(|e| e.to_string())?;
    let opts = fr::ResizeOptions::new()
        .resize_alg(fr::ResizeAlg::Convolution(fr::FilterType::CatmullRom))
        .crop(b.x1 as f64, b.y1 as f64, b.w as f64, b.h as f64);
    resizer
        .resize(src, &mut dst, &opts)
        .map_err(|e| e.to_string())
}

/// The random photometric choices of one view, drawn in a fixed order so a seed fixes them all.
#[derive(Clone, Debug, PartialEq)]
pub struct Photometric {
    pub flip: bool,
    /// (operation order: 0 brightness, 1 contrast, 2 saturation, 3 hue; factors) when jitter applies.
    pub jitter: Option<([usize; 4], [f32; 4])>,
    pub grayscale: bool,
    pub blur_sigma: Option<f32>,
    pub solarize: bool,
}

/// Draws the photometric choices of view `v` (`kind` 0/1 for the global views, 2 for the others).
pub fn draw_photometric(
    rng: &mut impl Rng,
    cfg: &common::config::ViewsConfig,
    kind: usize,
) -> Photometric {
    let flip = rng.random::<f64>() < cfg.flip_p;
    let jitter = (rng.random::<f64>() < cfg.jitter_p).then(|| {
        let mut order = [0, 1, 2, 3];
        order.shuffle(rng);
        let mut f = |s: f64| {
            if s > 0.0 {
                rng.random_range(1.0 - s..=1.0 + s) as f32
            } else {
                1.0
            }
        };
        let (b, c, s) = (f(cfg.brightness), f(cfg.contrast), f(cfg.saturation));
        let h = if cfg.hue > 0.0 {
            rng.random_range(-cfg.hue..=cfg.hue) as f32
        } else {
            0.0
        };
        (order, [b, c, s, h])
    });
    let grayscale = rng.random::<f64>() < cfg.grayscale_p;
    // DINO's GaussianBlur applies when rand <= p.
    let blur_sigma = (rng.random::<f64>() <= cfg.blur_p[kind] && cfg.blur_p[kind] > 0.0)
        .then(|| rng.random_range(cfg.blur_sigma[0]..=cfg.blur_sigma[1]) as f32);
    let solarize = rng.random::<f64>() < cfg.solarize_p[kind];
    Photometric {
        flip,
        jitter,
        grayscale,
        blur_sigma,
        solarize,
    }
}

/// Applies the photometric choices to a `size`² interleaved view, in torchvision's order.
pub fn apply_photometric(
    px: &mut [u8],
    size: usize,
    p: &Photometric,
    threshold: u8,
    scratch: &mut Vec<f32>,
) {
    if p.flip {
        flip_horizontal(px, size);
    }
    if let Some((order, f)) = &p.jitter {
        for &op in order {
            match op {
                0 if f[0] != 1.0 => brightness(px, f[0]),
                1 if f[1] != 1.0 => contrast(px, f[1]),
                2 if f[2] != 1.0 => saturation(px, f[2]),
                3 if f[3] != 0.0 => hue(px, f[3]),
                _ => {}
            }
        }
    }
    if p.grayscale {
        grayscale(px);
    }
    if let Some(sigma) = p.blur_sigma {
        gaussian_blur(px, size, sigma, scratch);
    }
    if p.solarize {
        solarize(px, threshold);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn noise(n: usize) -> Vec<u8> {
        (0..n * 3).map(|i| ((i * 7919 + 13) % 256) as u8).collect()
    }

    #[test]
    fn solarize_inverts_from_the_threshold_up() {
        let mut px = vec![0, 127, 128, 200, 255, 1];
        solarize(&mut px, 128);
        assert_eq!(px, [0, 127, 127, 55, 0, 1]);
    }

    #[test]
    fn grayscale_uses_601_weights() {
        for (rgb, want) in [
            ([255, 0, 0], 0.299),
            ([0, 255, 0], 0.587),
            ([0, 0, 255], 0.114),
            ([100, 150, 200], 0.0),
        ] {
            let mut px = rgb.to_vec();
            grayscale(&mut px);
            let expect = if want > 0.0 {
                want * 255.0
            } else {
                0.299 * 100.0 + 0.587 * 150.0 + 0.114 * 200.0
            };
            assert!(
                (px[0] as f64 - expect).abs() <= 0.5,
                "{rgb:?}: {} vs {expect}",
                px[0]
            );
            assert!(px[0] == px[1] && px[1] == px[2]);
        }
    }

    #[test]
    fn zero_jitter_is_the_identity() {
        let orig = noise(64);
        let mut px = orig.clone();
        brightness(&mut px, 1.0);
        contrast(&mut px, 1.0);
        saturation(&mut px, 1.0);
        hue(&mut px, 0.0);
        assert_eq!(px, orig);
    }

    #[test]
    fn hue_full_turn_is_the_identity_and_a_third_turn_maps_red_to_green() {
        let orig = noise(256);
        let mut px = orig.clone();
        hue(&mut px, 1.0);
        assert_eq!(px, orig);
        let mut red = vec![255, 0, 0, 0, 0, 255];
        hue(&mut red, 1.0 / 3.0);
        assert_eq!(red, [0, 255, 0, 255, 0, 0]);
    }

    #[test]
    fn brightness_and_contrast_follow_their_closed_forms() {
        let mut px = vec![100, 200, 50];
        brightness(&mut px, 1.5);
        assert_eq!(px, [150, 255, 75]);
        // A two-pixel image, black and white: mean luma 127.5 → 128; contrast 0.5 pulls halfway to it.
        let mut px = vec![0, 0, 0, 255, 255, 255];
        contrast(&mut px, 0.5);
        assert_eq!(px, [64, 64, 64, 191, 191, 191]);
    }

    #[test]
    fn blur_keeps_a_constant_image_and_its_mean() {
        let mut scratch = vec![];
        let mut px = vec![77u8; 32 * 32 * 3];
        gaussian_blur(&mut px, 32, 1.7, &mut scratch);
        assert!(px.iter().all(|&v| v == 77));
        let orig = noise(32 * 32);
        let mut px = orig.clone();
        gaussian_blur(&mut px, 32, 2.0, &mut scratch);
        let mean = |p: &[u8]| p.iter().map(|&v| v as f64).sum::<f64>() / p.len() as f64;
        assert!((mean(&px) - mean(&orig)).abs() < 2.0);
        let var = |p: &[u8]| {
            let m = mean(p);
            p.iter().map(|&v| (v as f64 - m).powi(2)).sum::<f64>()
        };
        assert!(var(&px) < var(&orig) / 4.0, "blur must smooth noise");
    }

    #[test]
    fn flip_reverses_columns() {
        let mut px: Vec<u8> = (0..2 * 3 * 3).map(|i| i as u8).collect(); // 3 wide, 2 rows
        flip_horizontal(&mut px, 3);
        assert_eq!(&px[..9], &[6, 7, 8, 3, 4, 5, 0, 1, 2]);
    }
}
