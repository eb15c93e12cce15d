//! Where one core's time goes per view stage, through the same dispatch the loader uses (for the
//! benchmark notes): `cargo run --release -p loader --example stage_times -- SHARD_DIR`.
use std::time::Instant;

use fast_image_resize as fr;
use loader::augment::*;
use loader::decode::decode_rgb;

fn main() {
    let dir = std::env::args().nth(1).expect("usage: stage_times SHARD_DIR");
    let (dir, index) = loader::pipeline::open_index(std::path::Path::new(&dir)).expect("shards");
    let mut imgs = vec![];
    loader::pipeline::for_each_sample(&dir, &index, |s| {
        imgs.extend(s.get("jpg").map(<[u8]>::to_vec));
        imgs.len() < 100
    })
    .expect("read");
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
    let (mut rgb, mut inter, mut view, mut scratch) = (vec![], vec![], vec![], vec![]);
    let mut resizer = fr::Resizer::new();
    let mut r = common::seed::rng(0, common::seed::Purpose::Views, &[]);
    let (mut t_dec, mut t_resize, mut t_planar) = (0f64, 0f64, 0f64);
    let mut t = vec![0f64; stages.len()];
    for img in &imgs {
        let t0 = Instant::now();
        let (w, h) = decode_rgb(img, &mut rgb).expect("decode");
        t_dec += t0.elapsed().as_secs_f64();
        let src = fr::images::ImageRef::new(w, h, &rgb, fr::PixelType::U8x3).expect("image");
        let b = common::geometry::random_resized_crop(&mut r, w, h, cfg.global_scale, cfg.ratio);
        let t0 = Instant::now();
        crop_resize(&mut resizer, &src, &b, 224, &mut inter).expect("resize");
        t_resize += t0.elapsed().as_secs_f64();
        let t0 = Instant::now();
        to_planar(&inter, &mut view);
        t_planar += t0.elapsed().as_secs_f64();
        for (i, (_, p)) in stages.iter().enumerate() {
            let t0 = Instant::now();
            apply_photometric(&mut view, 224, p, 128, &mut scratch);
            t[i] += t0.elapsed().as_secs_f64();
        }
    }
    let n = imgs.len() as f64;
    println!(
        "per image: decode {:.3} ms; per 224 view: crop+resize {:.3} ms, to planar {:.3} ms",
        t_dec / n * 1e3,
        t_resize / n * 1e3,
        t_planar / n * 1e3
    );
    for ((name, _), x) in stages.iter().zip(t) {
        println!("  {name:14} {:.3} ms per view", x / n * 1e3);
    }
}
