//! Where one core's time goes per view stage, through the same dispatch the loader uses (for the
//! benchmark notes): `cargo run --release -p loader --example stage_times -- SHARD_DIR`.
use std::time::Instant;

use fast_image_resize as fr;
use loader::augment::*;
use loader::decode::decode_rgb;
use loader::resize::{Resampler, crop_resize_fir, crop_resize_planar};

fn main() {
    let dir = std::env::args().nth(1).expect("usage: stage_times SHARD_DIR");
    let imgs = loader::pipeline::first_images(std::path::Path::new(&dir), 500).expect("shards");
    let cfg = common::config::ViewsConfig::paper_main();
    let none = Photometric::IDENTITY;
    let jitter =
        |op: usize, f: f32| Photometric { jitter: Some(([op, 4, 4, 4], [f, f, f, f - 1.0])), ..none.clone() };
    let stages: Vec<(&str, Photometric)> = vec![
        ("flip", Photometric { flip: true, ..none.clone() }),
        ("brightness", jitter(0, 1.2)),
        ("contrast", jitter(1, 1.2)),
        ("saturation", jitter(2, 1.2)),
        ("hue", jitter(3, 1.05)),
        ("grayscale", Photometric { grayscale: true, ..none.clone() }),
        ("blur sigma 1", Photometric { blur_sigma: Some(1.0), ..none.clone() }),
        ("blur sigma 2", Photometric { blur_sigma: Some(2.0), ..none.clone() }),
        ("solarize", Photometric { solarize: true, ..none.clone() }),
    ];
    let (mut rgb, mut view, mut scratch) = (vec![], vec![], BlurScratch::default());
    let (mut fast, mut fir) = (Resampler::default(), Resampler::default());
    let mut r = common::seed::rng(0, common::seed::Purpose::Views, &[]);
    let (mut t_dec, mut t_fir, mut t_resize) = (0f64, 0f64, 0f64);
    let mut t = vec![0f64; stages.len()];
    // Two views per image, so each image's decode is weighed against two of each stage.
    for img in imgs.iter().chain(&imgs) {
        let t0 = Instant::now();
        let (w, h) = decode_rgb(img, &mut rgb).expect("decode");
        t_dec += t0.elapsed().as_secs_f64() / 2.0;
        let src = fr::images::ImageRef::new(w, h, &rgb, fr::PixelType::U8x3).expect("image");
        let b = common::geometry::random_resized_crop(&mut r, w, h, cfg.global_scale, cfg.ratio);
        let t0 = Instant::now();
        crop_resize_fir(&mut fir, &src, &b, 224, &mut view).expect("resize");
        t_fir += t0.elapsed().as_secs_f64();
        let t0 = Instant::now();
        crop_resize_planar(&mut fast, &src, &b, 224, &mut view).expect("resize");
        t_resize += t0.elapsed().as_secs_f64();
        for (i, (_, p)) in stages.iter().enumerate() {
            let t0 = Instant::now();
            apply_photometric(&mut view, 224, p, 128, &mut scratch);
            t[i] += t0.elapsed().as_secs_f64();
        }
    }
    let n = 2.0 * imgs.len() as f64;
    println!(
        "{} images: per image decode {:.3} ms; per 224 view: crop+resize into planes {:.3} ms (fir's u8x3 \
         path and the planar split: {:.3} ms)",
        imgs.len(),
        2.0 * t_dec / n * 1e3,
        t_resize / n * 1e3,
        t_fir / n * 1e3
    );
    for ((name, _), x) in stages.iter().zip(t) {
        println!("  {name:14} {:.3} ms per view", x / n * 1e3);
    }
}
