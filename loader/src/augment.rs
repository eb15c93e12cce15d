//! Pixel operations of the DINO view pipeline (`DataAugmentationDINO` in `main_dino.py`): crop + bicubic
//! resize, flip, ColorJitter (the four operations in random order), grayscale, Gaussian blur, solarise.
//! Each operation rounds back to `u8`, as PIL does between operations.
//!
//! Views are planar (`[3, S, S]`, the layout of `common::Batch`) from the resize on, so every loop runs
//! over contiguous channel planes, which the compiler vectorises, and no conversion is needed at the end.
//!
//! Brightness, contrast and saturation follow PIL's `ImageEnhance` (a blend with a degenerate image,
//! truncated to integers as PIL's `Image.blend` does); luma is PIL's `convert("L")`
//! (L = (19595 R + 38470 G + 7471 B + 2^15) >> 16, i.e. 0.299/0.587/0.114); hue follows torchvision's
//! tensor path (HSV, h ← (h + factor) mod 1), so a full turn is the identity; the blur is PIL's
//! `GaussianBlur` (three extended box passes per axis). `tests/pil_parity.rs` checks brightness,
//! contrast, saturation, grayscale, solarise and blur against Pillow's own output, byte for byte.

use fast_image_resize as fr;
use rand::Rng;
use rand::seq::SliceRandom;

use crate::error::{Error, Result};

/// The three planes of a planar image.
#[inline(always)]
fn planes(px: &mut [u8]) -> (&mut [u8], &mut [u8], &mut [u8]) {
    let n = px.len() / 3;
    let (r, rest) = px.split_at_mut(n);
    let (g, b) = rest.split_at_mut(n);
    (r, g, b)
}

/// ITU-R 601-2 luma as PIL computes it.
#[inline(always)]
pub fn luma(r: u8, g: u8, b: u8) -> u8 {
    ((19595 * r as u32 + 38470 * g as u32 + 7471 * b as u32 + 0x8000) >> 16) as u8
}

// max/min rather than clamp: clamp passes NaN through, and the unchecked cast below needs a number.
#[allow(clippy::manual_clamp)]
#[inline(always)]
fn blend(degenerate: f32, v: u8, factor: f32) -> u8 {
    // PIL's Image.blend: (int)(in1 + alpha·(in2 − in1)), clipped to 0..255.
    // f32::max returns the other operand when one is NaN, so x is a number in 0..=255 whatever the
    // inputs (NaN or infinite factors included).
    let x = (degenerate + factor * (v as f32 - degenerate)).max(0.0).min(255.0);
    // SAFETY: x is in 0..=255 (above), so it is representable as i32. The checked `as` cast carries
    // saturation fix-ups that stop these loops from vectorising.
    unsafe { x.to_int_unchecked::<i32>() as u8 }
}

#[inline(always)]
pub fn brightness(px: &mut [u8], factor: f32) {
    for v in px.iter_mut() {
        *v = blend(0.0, *v, factor);
    }
}

#[inline(always)]
pub fn contrast(px: &mut [u8], factor: f32) {
    let n = (px.len() / 3).max(1) as u64;
    let (r, g, b) = planes(px);
    let sum: u64 = r.iter().zip(g.iter()).zip(b.iter()).map(|((&r, &g), &b)| luma(r, g, b) as u64).sum();
    let mean = (sum as f64 / n as f64 + 0.5).floor() as f32;
    for v in px.iter_mut() {
        *v = blend(mean, *v, factor);
    }
}

#[inline(always)]
pub fn saturation(px: &mut [u8], factor: f32) {
    // PIL blends each channel toward the pixel's luma, in f32, truncated: trunc(L + f·(v − L)).
    // The luma plane first, then one two-stream loop per channel: simple loops vectorise.
    let lumas: Vec<u8> = {
        let (r, g, b) = planes(px);
        r.iter().zip(g.iter()).zip(b.iter()).map(|((&r, &g), &b)| luma(r, g, b)).collect()
    };
    for plane in px.chunks_exact_mut(lumas.len().max(1)) {
        for (v, &l) in plane.iter_mut().zip(&lumas) {
            *v = blend(l as f32, *v, factor);
        }
    }
}

/// Shifts hue by `factor` turns (torchvision: factor in [−0.5, 0.5]), in HSV as torchvision's tensor
/// path does, but in integers. With max, min and chroma c = max − min of a pixel, its hue scaled by c
/// is hp ∈ [0, 6c) (sector·c + offset), the shift adds round(6·factor·c), and HSV → RGB is the closed
/// form channel = max − clamp(min(k, 4c − k), 0, c) with k = (n·c + hp) mod 6c, n = 5, 3, 1 for R, G,
/// B. This is the float formula scaled by c, exact but for the rounding of the shift (at most one
/// level), and a full turn is exactly the identity.
#[inline(always)]
pub fn hue(px: &mut [u8], factor: f32) {
    // The shift in sixths of a turn, in 16.16 fixed point (at most 6·2^16, so shift·c fits in i32).
    let shift = (factor.rem_euclid(1.0) as f64 * 6.0 * 65536.0).round() as i32;
    let (r, g, b) = planes(px);
    // Branch-free (selects only), so the loop vectorises; a gray pixel (c = 0) comes out unchanged.
    for ((pr, pg), pb) in r.iter_mut().zip(g.iter_mut()).zip(b.iter_mut()) {
        let (r, g, b) = (*pr as i32, *pg as i32, *pb as i32);
        let maxc = r.max(g).max(b);
        let minc = r.min(g).min(b);
        let c = maxc - minc;
        let hp = if maxc == r {
            g - b
        } else if maxc == g {
            2 * c + b - r
        } else {
            4 * c + r - g
        };
        let hp = hp + ((shift * c + 0x8000) >> 16);
        let six = 6 * c;
        // n·c + hp lies in [0, 17c): at most two wraps.
        let channel = |n: i32| {
            let k = n * c + hp;
            let k = if k >= six { k - six } else { k };
            let k = if k >= six { k - six } else { k };
            // max(0).min(c), not clamp(0, c): clamp asserts its bounds, and that branch stops vectorisation.
            (maxc - k.min(4 * c - k).max(0).min(c)) as u8
        };
        (*pr, *pg, *pb) = (channel(5), channel(3), channel(1));
    }
}

#[inline(always)]
pub fn grayscale(px: &mut [u8]) {
    let (r, g, b) = planes(px);
    for ((r, g), b) in r.iter_mut().zip(g.iter_mut()).zip(b.iter_mut()) {
        let l = luma(*r, *g, *b);
        (*r, *g, *b) = (l, l, l);
    }
}

#[inline(always)]
pub fn solarize(px: &mut [u8], threshold: u8) {
    for v in px.iter_mut() {
        *v = if *v >= threshold { 255 - *v } else { *v };
    }
}

/// Mirrors every row of every plane (`size` pixels per row).
#[inline(always)]
pub fn flip_horizontal(px: &mut [u8], size: usize) {
    for row in px.chunks_exact_mut(size) {
        row.reverse();
    }
}

/// The extended-box radius whose `passes`-fold repetition has the variance of a Gaussian of standard
/// deviation `sigma` (Gwosdek et al., "Theoretical foundations of Gaussian convolution by extended box
/// filtering", 2011: box length, its integer part, and the fractional part that matches the variance).
/// Computed in the precisions PIL uses, so the radius, and hence the result, matches PIL's.
pub fn box_radius(sigma: f32, passes: u32) -> f32 {
    let sigma2 = sigma * sigma / passes as f32;
    let length = (12.0 * sigma2 as f64 + 1.0).sqrt() as f32;
    let l = ((length as f64 - 1.0) / 2.0).floor() as f32;
    let a = (2.0 * l + 1.0) * (l * (l + 1.0) - 3.0 * sigma2) / (6.0 * (sigma2 - (l + 1.0) * (l + 1.0)));
    l + a
}

/// One pass of PIL's extended box filter (its `ImagingLineBoxBlur`): each output is the sum of the
/// 2r+1 pixels around it times `whole` plus the two next ones times `far`, in 8.24 fixed point with
/// rounding. `tap(k)` is the input line aligned with the output for offset k − r − 1 (a shifted view of
/// a padded row for the horizontal pass, a neighbouring row for the vertical one), so every loop is
/// elementwise over a line and vectorises. The sums are exact integers, so this equals PIL's
/// running-sum form. The radii of DINO's blur range (σ ≤ 2 gives r ≤ 1) get fused single loops.
#[inline(always)]
fn box_taps<'a>(
    tap: impl Fn(usize) -> &'a [u8],
    r: usize,
    out: &mut [u8],
    whole: u32,
    far: u32,
    acc: &mut [u32],
) {
    let finish = |inner: u32, lo: u8, hi: u8| {
        let bulk = inner.wrapping_mul(whole).wrapping_add((lo as u32 + hi as u32).wrapping_mul(far));
        (bulk.wrapping_add(1 << 23) >> 24) as u8
    };
    match r {
        0 => {
            let (t0, t1, t2) = (tap(0), tap(1), tap(2));
            for (((o, &a), &b), &c) in out.iter_mut().zip(t0).zip(t1).zip(t2) {
                *o = finish(b as u32, a, c);
            }
        }
        1 => {
            let (t0, t1, t2, t3, t4) = (tap(0), tap(1), tap(2), tap(3), tap(4));
            for (((((o, &a), &b), &c), &d), &e) in out.iter_mut().zip(t0).zip(t1).zip(t2).zip(t3).zip(t4) {
                *o = finish(b as u32 + c as u32 + d as u32, a, e);
            }
        }
        _ => {
            acc.fill(0);
            for k in 1..2 * r + 2 {
                for (a, &v) in acc.iter_mut().zip(tap(k)) {
                    *a += v as u32;
                }
            }
            for (((o, &a), &lo), &hi) in out.iter_mut().zip(acc.iter()).zip(tap(0)).zip(tap(2 * r + 2)) {
                *o = finish(a, lo, hi);
            }
        }
    }
}

/// Gaussian blur of each `size`² plane as PIL's `ImageFilter.GaussianBlur(sigma)` computes it (DINO's
/// blur): three passes of an extended box filter along the rows, then three along the columns, edge
/// pixels repeated outwards, 8-bit rounding after each pass. `scratch` is reused between calls.
#[inline(always)]
pub fn gaussian_blur(px: &mut [u8], size: usize, sigma: f32, scratch: &mut Vec<u8>) {
    const PASSES: u32 = 3;
    let radius = box_radius(sigma, PASSES);
    if radius == 0.0 || size == 0 {
        return;
    }
    let r = radius as usize;
    // PIL's weights: the float division truncated, the remainder split between the two outer pixels.
    let whole = (16_777_216f32 / (radius * 2.0 + 1.0)) as u32;
    let far = ((1u32 << 24) - (r as u32 * 2 + 1) * whole) / 2;
    let plane = size * size;
    let pad = r + 1;
    scratch.resize(plane + 2 * size + 2 * pad, 0);
    let (tmp, rest) = scratch.split_at_mut(plane);
    let (padded, line) = rest.split_at_mut(size + 2 * pad);
    let mut acc = vec![0u32; size];
    let last = size - 1;
    for channel in px.chunks_exact_mut(plane) {
        for row in channel.chunks_exact_mut(size) {
            for _ in 0..PASSES {
                padded[..pad].fill(row[0]);
                padded[pad..pad + size].copy_from_slice(row);
                padded[pad + size..].fill(row[last]);
                let pr: &[u8] = padded;
                box_taps(|k| &pr[k..k + size], r, row, whole, far, &mut acc);
            }
        }
        // Columns: ping-pong between the channel and tmp, a whole row of outputs at a time.
        for pass in 0..PASSES {
            let (src, dst): (&[u8], &mut [u8]) =
                if pass % 2 == 0 { (&*channel, &mut *tmp) } else { (&*tmp, &mut *channel) };
            for (y, out) in dst.chunks_exact_mut(size).enumerate() {
                let rows = |k: usize| {
                    let sy = (y + k).saturating_sub(pad).min(last);
                    &src[sy * size..(sy + 1) * size]
                };
                box_taps(rows, r, line, whole, far, &mut acc);
                out.copy_from_slice(line);
            }
        }
        if PASSES % 2 == 1 {
            channel.copy_from_slice(tmp);
        }
    }
}

/// Interleaved RGB `[S, S, 3]` to planar `[3, S, S]`. Dispatched to an AVX2 build where available
/// (the strided loads become shuffles there).
pub fn to_planar(src: &[u8], dst: &mut Vec<u8>) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2, checked just above.
        unsafe { to_planar_avx2(src, dst) };
        return;
    }
    to_planar_body(src, dst);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn to_planar_avx2(src: &[u8], dst: &mut Vec<u8>) {
    to_planar_body(src, dst);
}

#[inline(always)]
fn to_planar_body(src: &[u8], dst: &mut Vec<u8>) {
    // Extending from exact-size iterators writes each byte once (no zero-fill first).
    dst.clear();
    dst.reserve(src.len());
    for c in 0..3 {
        dst.extend(src.chunks_exact(3).map(|p| p[c]));
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
) -> Result<()> {
    // Reused between views: resizing a buffer of the right length writes nothing.
    out.resize(size * size * 3, 0);
    let mut dst =
        fr::images::Image::from_slice_u8(size as u32, size as u32, out.as_mut_slice(), fr::PixelType::U8x3)
            .map_err(|e| Error::image(format!("resize: {e}")))?;
    let opts = fr::ResizeOptions::new()
        .resize_alg(fr::ResizeAlg::Convolution(fr::FilterType::CatmullRom))
        .crop(b.x1 as f64, b.y1 as f64, b.w as f64, b.h as f64);
    resizer.resize(src, &mut dst, &opts).map_err(|e| Error::image(format!("resize: {e}")))
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

impl Photometric {
    /// No operation at all: the starting point for choosing single operations (tests, timings).
    pub const IDENTITY: Photometric =
        Photometric { flip: false, jitter: None, grayscale: false, blur_sigma: None, solarize: false };
}

/// Draws the photometric choices of view `v` (`kind` 0/1 for the global views, 2 for the others).
pub fn draw_photometric(rng: &mut impl Rng, cfg: &common::config::ViewsConfig, kind: usize) -> Photometric {
    let flip = rng.random::<f64>() < cfg.flip_p;
    let jitter = (rng.random::<f64>() < cfg.jitter_p).then(|| {
        let mut order = [0, 1, 2, 3];
        order.shuffle(rng);
        let mut f = |s: f64| {
            if s > 0.0 { rng.random_range(1.0 - s..=1.0 + s) as f32 } else { 1.0 }
        };
        let (b, c, s) = (f(cfg.brightness), f(cfg.contrast), f(cfg.saturation));
        let h = if cfg.hue > 0.0 { rng.random_range(-cfg.hue..=cfg.hue) as f32 } else { 0.0 };
        (order, [b, c, s, h])
    });
    let grayscale = rng.random::<f64>() < cfg.grayscale_p;
    // DINO's GaussianBlur applies when rand <= p.
    let blur_sigma = (rng.random::<f64>() <= cfg.blur_p[kind] && cfg.blur_p[kind] > 0.0)
        .then(|| rng.random_range(cfg.blur_sigma[0]..=cfg.blur_sigma[1]) as f32);
    let solarize = rng.random::<f64>() < cfg.solarize_p[kind];
    Photometric { flip, jitter, grayscale, blur_sigma, solarize }
}

/// Applies the photometric choices to a planar `[3, size, size]` view, in torchvision's order.
///
/// On x86-64 CPUs with AVX2 the same code is compiled a second time with AVX2 enabled and chosen at
/// run time: the loops are integer or plain float arithmetic without fused multiply-add, so both
/// versions give identical bytes.
pub fn apply_photometric(px: &mut [u8], size: usize, p: &Photometric, threshold: u8, scratch: &mut Vec<u8>) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2, checked just above.
        unsafe { apply_photometric_avx2(px, size, p, threshold, scratch) };
        return;
    }
    apply_photometric_body(px, size, p, threshold, scratch);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn apply_photometric_avx2(px: &mut [u8], size: usize, p: &Photometric, threshold: u8, scratch: &mut Vec<u8>) {
    apply_photometric_body(px, size, p, threshold, scratch);
}

#[inline(always)]
fn apply_photometric_body(px: &mut [u8], size: usize, p: &Photometric, threshold: u8, scratch: &mut Vec<u8>) {
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
        for (rgb, want) in
            [([255, 0, 0], 0.299), ([0, 255, 0], 0.587), ([0, 0, 255], 0.114), ([100, 150, 200], 0.0)]
        {
            let mut px = rgb.to_vec();
            grayscale(&mut px);
            let expect =
                if want > 0.0 { want * 255.0 } else { 0.299 * 100.0 + 0.587 * 150.0 + 0.114 * 200.0 };
            assert!((px[0] as f64 - expect).abs() <= 0.5, "{rgb:?}: {} vs {expect}", px[0]);
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
        // Planar: pixel 0 red, pixel 1 blue; a third of a turn makes them green and red.
        let mut px = vec![255, 0, 0, 0, 0, 255];
        hue(&mut px, 1.0 / 3.0);
        assert_eq!(px, [0, 255, 255, 0, 0, 0]);
        // A half turn maps a colour to its complement's hue at the same max and min.
        let mut px = vec![200, 50, 100];
        hue(&mut px, 0.5);
        assert_eq!(px, [50, 200, 150]);
    }

    #[test]
    fn brightness_and_contrast_follow_their_closed_forms() {
        let mut px = vec![100, 200, 50];
        brightness(&mut px, 1.5);
        assert_eq!(px, [150, 255, 75]);
        // A two-pixel planar image, black and white: mean luma 127.5 → 128; contrast 0.5 pulls halfway.
        let mut px = vec![0, 255, 0, 255, 0, 255];
        contrast(&mut px, 0.5);
        assert_eq!(px, [64, 191, 64, 191, 64, 191]);
        // Saturation 0 is the luma image; 2 doubles the distance from it (clipped).
        let mut px = vec![200, 100, 50];
        saturation(&mut px, 0.0);
        assert_eq!(px, [luma(200, 100, 50); 3]);
        let mut px = [200u8, 100, 50];
        let l = luma(200, 100, 50) as i32;
        saturation(&mut px, 2.0);
        assert_eq!(px.map(|v| v as i32), [200, 100, 50].map(|v: i32| (l + 2 * (v - l)).clamp(0, 255)));
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
    fn flip_reverses_columns_of_every_plane() {
        let mut px: Vec<u8> = (0..3 * 2 * 2).map(|i| i as u8).collect(); // 3 planes of 2x2
        flip_horizontal(&mut px, 2);
        assert_eq!(px, [1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10]);
    }

    #[test]
    fn planar_conversion_splits_channels() {
        let mut out = vec![];
        to_planar(&[1, 2, 3, 4, 5, 6], &mut out);
        assert_eq!(out, [1, 4, 2, 5, 3, 6]);
    }
}
