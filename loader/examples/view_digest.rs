//! One digest of the views and points of the first 500 samples under each preset (seed 0, epoch 0):
//! compares two builds of the loader byte for byte. `view_digest SHARD_DIR`.
use sha2::{Digest, Sha256};

fn main() {
    let dir = std::env::args().nth(1).expect("usage: view_digest SHARD_DIR");
    let imgs = loader::pipeline::first_images(std::path::Path::new(&dir), 500).expect("shards");
    for (name, cfg) in [
        ("paper-main", common::config::ViewsConfig::paper_main()),
        ("readme-ablation", common::config::ViewsConfig::readme_ablation()),
        ("dino", common::config::ViewsConfig::dino()),
    ] {
        let mut h = Sha256::new();
        let mut s = loader::views::Scratch::default();
        for (seq, img) in imgs.iter().enumerate() {
            let v = loader::views::make_views(img, &cfg, 0, 0, seq as u64, &mut s).expect("views");
            for view in &v.views {
                h.update(view);
            }
            for p in v.points.teacher.iter().chain(&v.points.student).flatten() {
                h.update(p.to_le_bytes());
            }
        }
        println!("{name}: {} images, views and points sha256 {}", imgs.len(), hex::encode(h.finalize()));
    }
}
