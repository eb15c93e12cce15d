//! Where one core's time goes per view stage (for the benchmark notes).
use std::time::Instant;

use fast_image_resize as fr;
use loader::augment::*;
use loader::decode::decode_rgb;

fn main() {
    let dir = std::env::args().nth(1).expect("shard dir");
    let (dir, index) = loader::pipeline::open_index(std::path::Path::new(&dir)).unwrap();
    let mut imgs = vec![];
    loader::pipeline::for_each_sample(&dir, &index, |_, s| {
        imgs.push(s.get("jpg").unwrap().to_vec());
        imgs.len() < 100
    })
    .unwrap();
    let cfg = common::config::ViewsConfig::paper_main();
    let mut rgb = vec![];
    let mut view = vec![];
    let mut scratch = vec![];
    let mut resizer = fr::Resizer::new();
    let mut t = [0f64; 8];
    let mut r = common::seed::rng(0, common::seed::Purpose::Views, &[]);
    for img in &imgs {
        let t0 = Instant::now();
        let (w, h) = decode_rgb(img, &mut rgb).unwrap();
        t[0] += t0.elapsed().as_secs_f64();
        let src = fr::images::ImageRef::new(w, h, &rgb, fr::PixelType::U8x3).unwrap();
        for v in 0..4 {
            let b =
                common::geometry::random_resized_crop(&mut r, w, h, cfg.global_scale, cfg.ratio);
            let t0 = Instant::now();
            crop_resize(&mut resizer, &src, &b, 224, &mut view).unwrap();
            t[1] += t0.elapsed().as_secs_f64();
            let t0 = Instant::now();
            brightness(&mut view, 1.2);
            t[2] += t0.elapsed().as_secs_f64();
            let t0 = Instant::now();
            contrast(&mut view, 1.2);
            t[3] += t0.elapsed().as_secs_f64();
            let t0 = Instant::now();
            saturation(&mut view, 1.2);
            t[4] += t0.elapsed().as_secs_f64();
            let t0 = Instant::now();
            hue(&mut view, 0.05);
            t[5] += t0.elapsed().as_secs_f64();
            let t0 = Instant::now();
            gaussian_blur(&mut view, 224, 1.0 + v as f32 * 0.3, &mut scratch);
            t[6] += t0.elapsed().as_secs_f64();
        }
    }
    let n = imgs.len() as f64;
    for (name, x) in [
        "decode",
        "crop+resize x4",
        "brightness x4",
        "contrast x4",
        "saturation x4",
        "hue x4",
        "blur x4",
    ]
    .iter()
    .zip(t)
    {
        println!("{name:16} {:.3} ms/image", x / n * 1e3);
    }
}
