//! Evaluation against independent expectations: k-NN against a brute-force classifier written here, mIoU
//! from a hand-made confusion matrix, the probe on oracle and constant features, export then import.

use burn::tensor::Device;
use common::seed::{self, Purpose};
use rand::Rng;
use trainer::eval::knn;
use trainer::eval::seg::{self, ProbeOptions, SegSet};

/// Brute force: every distance, a full sort, votes exp(sim/T) per class over the k nearest.
fn brute_force(
    train: &[Vec<f32>],
    tl: &[i64],
    test: &[Vec<f32>],
    vl: &[i64],
    k: usize,
    t: f64,
) -> (f64, f64) {
    let classes = 1 + *tl.iter().chain(vl).max().unwrap() as usize;
    let (mut top1, mut per) = (0usize, vec![(0usize, 0usize); classes]);
    for (x, &y) in test.iter().zip(vl) {
        let mut sims: Vec<(f64, usize)> = train
            .iter()
            .enumerate()
            .map(|(j, r)| (r.iter().zip(x).map(|(a, b)| (*a as f64) * (*b as f64)).sum(), j))
            .collect();
        sims.sort_by(|a, b| b.0.total_cmp(&a.0));
        let mut votes = vec![0f64; classes];
        for &(s, j) in &sims[..k] {
            votes[tl[j] as usize] += (s / t).exp();
        }
        let best = (0..classes).max_by(|&a, &b| votes[a].total_cmp(&votes[b]).then(b.cmp(&a))).unwrap();
        top1 += (best == y as usize) as usize;
        per[y as usize].1 += 1;
        per[y as usize].0 += (best == y as usize) as usize;
    }
    let seen: Vec<f64> = per.iter().filter(|c| c.1 > 0).map(|c| c.0 as f64 / c.1 as f64).collect();
    (top1 as f64 / vl.len() as f64, seen.iter().sum::<f64>() / seen.len() as f64)
}

fn unit_rows(n: usize, rng: &mut impl Rng, centres: &[Vec<f32>], labels: &mut Vec<i64>) -> Vec<Vec<f32>> {
    (0..n)
        .map(|_| {
            let c = rng.random_range(0..centres.len());
            labels.push(c as i64);
            let mut v: Vec<f32> = centres[c].iter().map(|x| x + rng.random::<f32>() * 1.6 - 0.8).collect();
            let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            v.iter_mut().for_each(|x| *x /= norm);
            v
        })
        .collect()
}

#[test]
fn knn_matches_a_brute_force_classifier() {
    let mut rng = seed::rng(1, Purpose::Synth, &[0]);
    let (d, classes) = (16, 5);
    let centres: Vec<Vec<f32>> =
        (0..classes).map(|_| (0..d).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect()).collect();
    let (mut tl, mut vl) = (Vec::new(), Vec::new());
    let train = unit_rows(300, &mut rng, &centres, &mut tl);
    let test = unit_rows(120, &mut rng, &centres, &mut vl);
    let flat = |rows: &[Vec<f32>]| rows.iter().flatten().copied().collect::<Vec<f32>>();
    let (tf, vf) = (flat(&train), flat(&test));
    let results = knn((&tf, &tl), (&vf, &vl), &[1, 10, 20], 0.07, &Device::flex());
    for r in &results {
        let (top1, mean_class) = brute_force(&train, &tl, &test, &vl, r.k, 0.07);
        assert!((r.top1 - top1).abs() < 1e-12, "k={}: top-1 {} vs brute force {top1}", r.k, r.top1);
        assert!(
            (r.mean_per_class - mean_class).abs() < 1e-12,
            "k={}: per-class {} vs {mean_class}",
            r.k,
            r.mean_per_class
        );
        assert!(r.top5 >= r.top1);
    }
    assert!(results[1].top1 > 0.5, "well-separated clusters are mostly right: {}", results[1].top1);
}

#[test]
fn miou_from_a_hand_made_confusion_matrix() {
    // Rows: truth, columns: prediction. Class 0: tp 8, row 10, col 9 → 8/(10+9-8) = 8/11. Class 1: tp 5,
    // row 6, col 7 → 5/8. Class 2: never present, never predicted → 0 (it still counts in the mean).
    let conf = [8, 2, 0, 1, 5, 0, 0, 0, 0];
    let (m, per) = seg::miou(&conf, 3);
    assert!(
        (per[0] - 8.0 / 11.0).abs() < 1e-6 && (per[1] - 5.0 / 8.0).abs() < 1e-6 && per[2] == 0.0,
        "{per:?}"
    );
    assert!((m - (8.0 / 11.0 + 5.0 / 8.0) / 3.0).abs() < 1e-6);
}

#[test]
fn bootstrap_interval_is_a_point_for_identical_images_and_spans_unequal_ones() {
    // Every image has the same confusion matrix: every resample has the mIoU of one image.
    let one = vec![8u64, 2, 0, 1, 5, 0, 0, 0, 0];
    let same = vec![one.clone(); 20];
    let (lo, hi) = seg::bootstrap_interval(&same, 3, 200, 0);
    let m = seg::miou(&one, 3).0;
    // (IoU's 1e-6 guard in the denominator weighs less on the summed counts: equal within it.)
    assert!(lo == hi && (lo - m).abs() < 1e-6, "{lo} {hi} vs {m}");
    // Half the images perfect on classes 0 and 1 (IoU 2/3 over three classes), half wrong on every
    // pixel (0): the whole set's mIoU lies strictly inside an interval that stays within [0, 2/3].
    let good = vec![10u64, 0, 0, 0, 10, 0, 0, 0, 0];
    let bad = vec![0u64, 10, 0, 10, 0, 0, 0, 0, 0];
    let mixed: Vec<Vec<u64>> = (0..40).map(|i| if i % 2 == 0 { good.clone() } else { bad.clone() }).collect();
    let total: Vec<u64> = (0..9).map(|k| mixed.iter().map(|c| c[k]).sum()).collect();
    let whole = seg::miou(&total, 3).0;
    let (lo, hi) = seg::bootstrap_interval(&mixed, 3, 500, 1);
    assert!(lo < whole && whole < hi && lo >= 0.0 && hi <= 2.0 / 3.0 + 1e-9, "{lo} < {whole} < {hi}");
}

#[test]
fn the_probe_reads_the_grid_each_cpu_config_learned_unless_told_otherwise() {
    // The Caltech configs learn an 8x8 grid at 64 px views: by default the probe runs 64 px images, so a
    // backbone of each gives exactly img_size/patch patches a side (no interpolated positional grid).
    let dev = Device::flex();
    for name in ["caltech101-cpu", "caltech101-2views", "caltech101-4views"] {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../configs/{name}.toml"));
        let cfg = trainer::recipe::config::TrainConfig::load(Some(&path), &[]).unwrap();
        let size = seg::probe_size(&cfg, None).unwrap();
        let (vit, ..) =
            trainer::eval::backbone(None, Some(&cfg), trainer::eval::Side::Teacher, &dev).unwrap();
        let x = burn::tensor::Tensor::<4>::zeros([1, 3, size, size], &dev);
        let [_, n, _] = vit.forward(x, None, &[], false).patches.dims();
        let learned = cfg.model.img_size / cfg.model.patch_size;
        assert_eq!((size, n), (64, learned * learned), "{name}");
        // The paper's protocol size is still there, and a side off the patch grid is refused by name.
        assert_eq!(seg::probe_size(&cfg, Some(448)).unwrap(), 448);
        let err = seg::probe_size(&cfg, Some(60)).unwrap_err().to_string();
        assert!(err.contains("--size 60") && err.contains("patch size 8"), "{err}");
    }
}

/// Masks of quadrant blocks aligned to a 4x4 patch grid of 64 px images, and features that either encode
/// the block's class (oracle) or are constant.
fn blocks(n: usize, oracle: bool) -> SegSet {
    let (g, d, c) = (4, 6, 3);
    let mut rng = seed::rng(2, Purpose::Synth, &[n as u64]);
    let (mut feats, mut masks) = (Vec::new(), Vec::new());
    for _ in 0..n {
        let cls: Vec<u8> = (0..g * g)
            .map(|_| if rng.random::<f32>() < 0.6 { 0 } else { rng.random_range(1..c as u8) })
            .collect();
        masks.push(image::GrayImage::from_fn(64, 64, |x, y| {
            image::Luma([cls[(y as usize / 16) * g + x as usize / 16]])
        }));
        for &k in &cls {
            feats.extend((0..d).map(|j| if oracle { (j == k as usize) as u8 as f32 * 4.0 } else { 1.0 }));
        }
    }
    SegSet { feats, grid: g, dim: d, masks }
}

#[test]
fn probe_reaches_near_one_on_oracle_features_and_the_majority_on_constant_ones() {
    let dev = Device::flex();
    let mut opts = ProbeOptions::new(3, 255);
    opts.epochs = 30;
    opts.lr = 0.5;
    opts.train_res = 64;
    let r = seg::probe(&blocks(24, true), &blocks(8, true), &opts, 64, &dev, true).unwrap();
    let (m, per, acc) = (r.miou, r.per_class, r.pixel_accuracy);
    // Bilinear upsampling blurs the block borders by a few pixels; everything else is right.
    assert!(m > 0.85 && acc > 0.93, "oracle features: mIoU {m}, accuracy {acc}, per class {per:?}");
    let r = seg::probe(&blocks(24, false), &blocks(8, false), &opts, 64, &dev, true).unwrap();
    let (m, per, acc) = (r.miou, r.per_class, r.pixel_accuracy);
    // Constant features can only predict one class: the majority (class 0, about 60% of pixels).
    assert!(per[1] == 0.0 && per[2] == 0.0, "{per:?}");
    assert!(
        (acc - per[0]).abs() < 1e-9 && (0.45..0.75).contains(&acc),
        "majority level: accuracy {acc}, mIoU {m}"
    );
}

#[test]
fn export_then_import_is_the_identity() {
    use trainer::model::params::{self, Params};
    let dev = Device::flex();
    let cfg = trainer::model::vit::VitConfig {
        embed_dim: 32,
        depth: 2,
        num_heads: 2,
        patch_size: 8,
        img_size: 32,
        ..trainer::model::vit::VitConfig::vit_tiny()
    };
    let mut a = trainer::model::vit::Vit::new(&cfg, &mut seed::rng(4, Purpose::Model, &[0]), &dev);
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("model.safetensors");
    trainer::export::write_official(&mut [("", &mut a as &mut dyn Params)], &path, Default::default())
        .unwrap();
    let named = trainer::export::import(&path).unwrap();
    assert_eq!(named["pos_embed"].0, vec![1, 17, 32], "pos_embed keeps the official [1, 1+N, D]");
    assert_eq!(named["blocks.0.attn.qkv.weight"].0, vec![96, 32], "Linear weights are [out, in]");
    let mut b = trainer::model::vit::Vit::new(&cfg, &mut seed::rng(5, Purpose::Model, &[0]), &dev);
    params::load_official(&mut b, "", &|n| named.get(n).cloned(), &dev).unwrap();
    assert_eq!(params::to_host(&mut a), params::to_host(&mut b));
}

#[test]
fn attention_threshold_keeps_the_requested_mass() {
    let attn = [0.5f32, 0.05, 0.2, 0.15, 0.1];
    // Sorted: 0.5, 0.2 (0.7 ≥ 0.6): two patches hold 60% of the mass.
    assert_eq!(trainer::eval::attention::threshold_mask(&attn, 0.6), vec![true, false, true, false, false]);
}

/// A palette PNG as Pascal VOC stores its masks: the pixel values are palette indices (0 background,
/// 1..20 classes, 255 the void border), with colours that a generic decoder would expand to RGB.
fn voc_mask(w: u32, h: u32, f: impl Fn(u32, u32) -> u8) -> Vec<u8> {
    let mut out = Vec::new();
    let mut enc = png::Encoder::new(&mut out, w, h);
    enc.set_color(png::ColorType::Indexed);
    enc.set_depth(png::BitDepth::Eight);
    let palette: Vec<u8> = (0..=255u8).flat_map(|i| [i, 255 - i, i / 2]).collect();
    enc.set_palette(palette);
    let mut writer = enc.write_header().unwrap();
    let data: Vec<u8> = (0..h).flat_map(|y| (0..w).map(move |x| (x, y))).map(|(x, y)| f(x, y)).collect();
    writer.write_image_data(&data).unwrap();
    writer.finish().unwrap();
    out
}

#[test]
fn voc_reader_packs_the_listed_split_with_palette_indices() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("VOC2012");
    for d in ["JPEGImages", "SegmentationClass", "ImageSets/Segmentation"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    // Five images; only four have masks (as in VOC, where most JPEGImages are detection-only), three in
    // train and one in val.
    let stems = ["2007_000032", "2007_000039", "2008_000123", "2011_003276", "2012_000001"];
    for (i, stem) in stems.iter().enumerate() {
        let img = image::RgbImage::from_fn(40 + 4 * i as u32, 30, |x, y| {
            image::Rgb([(x * 5) as u8, (y * 7) as u8, (i * 40) as u8])
        });
        img.save(root.join(format!("JPEGImages/{stem}.jpg"))).unwrap();
        if i < 4 {
            let class = 1 + 5 * i as u8; // 1, 6, 11, 16
            let mask = voc_mask(40 + 4 * i as u32, 30, |x, _| match x {
                0..10 => 0,
                10..12 => 255,
                _ => class,
            });
            std::fs::write(root.join(format!("SegmentationClass/{stem}.png")), mask).unwrap();
        }
    }
    std::fs::write(root.join("ImageSets/Segmentation/train.txt"), "2007_000032\n2008_000123\n2011_003276\n")
        .unwrap();
    std::fs::write(root.join("ImageSets/Segmentation/val.txt"), "2007_000039\n").unwrap();

    let cache = tmp.path().join("cache");
    let mut seen = Vec::new();
    for split in ["train", "val"] {
        let dir = seg::packed_split(&root, seg::SegDataset::Voc, split, &cache).unwrap();
        let pre = trainer::eval::Preprocess { resize: 32, crop: 32, squash: true };
        trainer::eval::for_each_batch(&dir, pre, 8, true, |items| {
            for it in items {
                let mask = it.mask.as_ref().expect("packed with its mask");
                let mut values: Vec<u8> = mask.pixels().map(|p| p.0[0]).collect();
                values.sort();
                values.dedup();
                seen.push((split, it.key.clone(), mask.width(), values));
            }
            Ok(())
        })
        .unwrap();
    }
    seen.sort();
    let expect = |split, stem: &str, w, class| (split, stem.to_string(), w, vec![0, class, 255]);
    assert_eq!(
        seen,
        vec![
            expect("train", "2007_000032", 40, 1),
            expect("train", "2008_000123", 48, 11),
            expect("train", "2011_003276", 52, 16),
            expect("val", "2007_000039", 44, 6),
        ],
        "the listed images only, masks as palette indices at full resolution"
    );

    // A listed stem without an image is one clear error naming the list and the line.
    std::fs::write(root.join("ImageSets/Segmentation/val.txt"), "2007_000039\n2009_999999\n").unwrap();
    let err = seg::packed_split(&root, seg::SegDataset::Voc, "val", &tmp.path().join("cache2")).unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("val.txt: line 2") && msg.contains("2009_999999"), "{msg}");

    // New masks under the same cache are packed again, not read stale: the cache was keyed by the data
    // set's name alone (a probe then scored new features against old masks).
    std::fs::write(root.join("ImageSets/Segmentation/val.txt"), "2007_000039\n").unwrap();
    std::fs::write(root.join("SegmentationClass/2007_000039.png"), voc_mask(44, 30, |_, _| 9)).unwrap();
    let mask_values = |dir: &std::path::Path| {
        let mut values = vec![];
        let pre = trainer::eval::Preprocess { resize: 32, crop: 32, squash: true };
        trainer::eval::for_each_batch(dir, pre, 8, true, |items| {
            for it in items {
                values.extend(it.mask.as_ref().unwrap().pixels().map(|p| p.0[0]));
            }
            Ok(())
        })
        .unwrap();
        values.sort();
        values.dedup();
        values
    };
    let dir = seg::packed_split(&root, seg::SegDataset::Voc, "val", &cache).unwrap();
    assert_eq!(mask_values(&dir), vec![9], "the new mask, not the cached one");
    // Unchanged, it is reused as it is (the same shard bytes, not packed again).
    let index = std::fs::read(dir.join("index.json")).unwrap();
    let stamp = std::fs::metadata(dir.join("index.json")).unwrap().modified().unwrap();
    seg::packed_split(&root, seg::SegDataset::Voc, "val", &cache).unwrap();
    assert_eq!(std::fs::read(dir.join("index.json")).unwrap(), index);
    assert_eq!(std::fs::metadata(dir.join("index.json")).unwrap().modified().unwrap(), stamp);
}

/// `.pth` files as the official code writes them (made by `fixtures/make_pth.py` with PyTorch 2.9.0):
/// a training checkpoint gives its teacher, bit for bit, whatever else it pickles (optimizer state, an
/// argparse.Namespace, an int); a half-precision release file gives its values widened to f32.
#[test]
fn pth_import_reads_the_official_checkpoints() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pth");
    let expected =
        trainer::run::checkpoint::tensors(&std::fs::read(dir.join("expected.safetensors")).unwrap()).unwrap();
    let ckpt = trainer::export::import(&dir.join("checkpoint.pth")).unwrap();
    let mut want: Vec<(String, &trainer::model::params::HostTensor)> = expected
        .iter()
        .filter(|(k, _)| !k.starts_with("fp16."))
        .map(|(k, v)| (k.strip_prefix("backbone.").unwrap_or(k).to_string(), v))
        .collect();
    want.sort_by(|a, b| a.0.cmp(&b.0));
    let mut got: Vec<(String, &trainer::model::params::HostTensor)> =
        ckpt.iter().map(|(k, v)| (k.clone(), v)).collect();
    got.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(got, want, "the teacher's tensors, backbone prefix stripped");
    assert!(ckpt.contains_key("blocks.0.attn.qkv.weight") && ckpt.contains_key("head.last_layer.weight_v"));

    let released = trainer::export::import(&dir.join("pretrain_fp16.pth")).unwrap();
    assert_eq!(released.len(), 18);
    for (k, v) in &released {
        assert_eq!(v, &expected[&format!("fp16.{k}")], "{k}");
    }

    // Not a pickle: one error naming the file.
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("broken.pth");
    std::fs::write(&bad, b"not a checkpoint").unwrap();
    let err = format!("{:#}", trainer::export::import(&bad).unwrap_err());
    assert!(err.contains("broken.pth"), "{err}");
}

/// A label past the set's class list (a `.cls` of 7 in a 4-class set, which `shard verify` refuses) is
/// refused by k-NN too, on fresh or cached features: before, it opened an eighth class in the vote.
#[test]
fn knn_refuses_labels_outside_the_class_list() {
    let tmp = tempfile::tempdir().unwrap();
    let opts = shard::synth::SynthOptions { count: 8, size: 32, quiet: true, ..Default::default() };
    shard::synth::synth(tmp.path(), &opts).unwrap();
    trainer::eval::check_labels(tmp.path(), &[0, 1, 2, 3]).unwrap();
    let err = format!("{:#}", trainer::eval::check_labels(tmp.path(), &[0, 3, 7, 7]).unwrap_err());
    assert!(err.contains("2 samples have a class label (e.g. 7) outside the 4 classes"), "{err}");
}
