//! Evaluation of a pretrained backbone (DINO's `eval_knn.py`): features of shard images through the
//! teacher, and DINO's weighted k-NN classifier on them.
//!
//! Preprocessing is DINO's eval transform: resize the shorter side to `resize` (bicubic), centre crop
//! `crop`, normalise. Both steps are one crop box on the original image resized once (the same pixels up to
//! the antialias filter's support), so each image is resized exactly once.

pub mod attention;
pub mod gradients;
pub mod matching;
pub mod seg;

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use burn::tensor::{Device, Tensor, TensorData};
use fast_image_resize as fr;
use indicatif::{ProgressBar, ProgressStyle};

use crate::model::params::{self, host};
use crate::model::vit::{self, Vit, VitConfig};
use crate::recipe::config::TrainConfig;
use crate::run::checkpoint;

/// DINO's eval transform sizes (224 after 256); smaller models scale both.
#[derive(Clone, Copy, Debug)]
pub struct Preprocess {
    pub resize: usize,
    pub crop: usize,
    /// Resize the whole image to `crop`² ignoring its aspect (the segmentation protocol) instead.
    pub squash: bool,
}

impl Preprocess {
    /// `crop` with DINO's 256/224 resize ratio.
    pub fn for_crop(crop: usize) -> Self {
        Self { resize: (crop * 256).div_ceil(224), crop, squash: false }
    }
}

/// Which of a checkpoint's two networks to evaluate. The teacher is DINO's choice (and the default): the
/// EMA is the better network once training is under way; early in a short run the student may be ahead.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Side {
    #[default]
    Teacher,
    Student,
}

/// The `side` backbone of a checkpoint (or, with `None`, a randomly initialised one from `cfg`: the floor),
/// its config and its identity (what the feature cache is keyed by).
pub fn backbone(
    checkpoint: Option<&Path>,
    cfg: Option<&TrainConfig>,
    side: Side,
    device: &Device,
) -> Result<(Vit, TrainConfig, String)> {
    let loaded = checkpoint.map(checkpoint::latest).transpose()?;
    let cfg = match &loaded {
        Some((_, bytes)) => checkpoint::meta(bytes)?.config,
        None => cfg.ok_or_else(|| anyhow!("a random backbone needs a config"))?.clone(),
    };
    let identity = match &loaded {
        Some((_, bytes)) => format!("{}:{side:?}", checkpoint::identity(bytes)),
        None => format!("random:{}", cfg.to_toml()),
    };
    // The teacher never drops paths; a random backbone is the run's own initialisation.
    let model_cfg = VitConfig { drop_path_rate: 0.0, ..cfg.model.clone() };
    let mut rng = common::seed::rng(cfg.run.seed, common::seed::Purpose::Model, &[0]);
    let mut vit = Vit::new(&model_cfg, &mut rng, device);
    if let Some((file, bytes)) = loaded {
        let map = checkpoint::tensors(&bytes)?;
        let get = |name: &str| map.get(name).cloned();
        let prefix = match side {
            Side::Teacher => "teacher.backbone.",
            Side::Student => "student.backbone.",
        };
        params::load(&mut vit, prefix, &get, device, false).with_context(|| file.display().to_string())?;
    }
    Ok((vit, cfg, identity))
}

/// One decoded, preprocessed image: planar `[3, crop, crop]` u8, its label and key.
pub struct Item {
    pub pixels: Vec<u8>,
    pub label: i64,
    pub key: String,
    /// The `{key}.seg.png` mask, when the shard has one (decoded, full resolution).
    pub mask: Option<image::GrayImage>,
}

/// Buffers reused from image to image by [`prepare`].
#[derive(Default)]
pub struct Prep {
    resampler: loader::resize::Resampler,
    rgb: Vec<u8>,
}

/// Decodes an image and applies `pre` (one crop box on the original, resized once): planar
/// `[3, crop, crop]` u8 pixels.
pub fn prepare(bytes: &[u8], pre: Preprocess, s: &mut Prep) -> Result<Vec<u8>> {
    let (w, h) = loader::decode::decode_rgb(bytes, &mut s.rgb)?;
    let src = fr::images::ImageRef::new(w, h, &s.rgb, fr::PixelType::U8x3)?;
    let mut planar = Vec::new();
    loader::resize::crop_resize_planar(
        &mut s.resampler,
        &src,
        &centre_box(w, h, pre),
        pre.crop,
        &mut planar,
    )?;
    Ok(planar)
}

/// Decodes and preprocesses every sample of a shard set, calling `f` with batches of up to `batch` items.
/// Unreadable images are skipped with a warning naming shard set and key. Returns (used, skipped).
pub fn for_each_batch(
    shards: &Path,
    pre: Preprocess,
    batch: usize,
    want_masks: bool,
    mut f: impl FnMut(&[Item]) -> Result<()>,
) -> Result<(usize, usize)> {
    let (dir, index) = loader::pipeline::open_index(shards)?;
    let bar = std::io::stderr().is_terminal().then(|| {
        let b = ProgressBar::new(index.total_samples);
        b.set_style(
            ProgressStyle::with_template("{bar:30} {pos}/{len} images {elapsed_precise} (eta {eta})")
                .expect("template"),
        );
        b
    });
    let mut prep = Prep::default();
    let mut items = Vec::<Item>::new();
    let (mut used, mut skipped) = (0usize, 0usize);
    let mut failure: Option<anyhow::Error> = None;
    loader::pipeline::for_each_sample(&dir, &index, |s| {
        if let Some(b) = &bar {
            b.inc(1);
        }
        let mut skip = |why: &dyn std::fmt::Display| {
            eprintln!("warning: {}: {}: {why}, skipped", shards.display(), s.key);
            skipped += 1;
            true
        };
        let Some(jpeg) = s.get("jpg") else {
            return skip(&"no image");
        };
        let mask = if want_masks {
            match s.get("seg.png").map(decode_mask) {
                Some(Ok(m)) => Some(m),
                _ => return skip(&"no readable mask"),
            }
        } else {
            None
        };
        let pixels = match prepare(jpeg, pre, &mut prep) {
            Ok(p) => p,
            Err(e) => return skip(&e),
        };
        let label = s
            .get("cls")
            .and_then(|c| std::str::from_utf8(c).ok())
            .and_then(|c| c.trim().parse().ok())
            .unwrap_or(-1);
        items.push(Item { pixels, label, key: s.key.clone(), mask });
        used += 1;
        if items.len() == batch {
            if let Err(e) = f(&items) {
                failure = Some(e);
                return false;
            }
            items.clear();
        }
        true
    })?;
    if let Some(e) = failure {
        return Err(e);
    }
    if !items.is_empty() {
        f(&items)?;
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    Ok((used, skipped))
}

/// A label mask: 8-bit grayscale values or, for palette PNGs (Pascal VOC), the palette indices themselves
/// (the same reader `shard pack --masks` uses).
pub fn decode_mask(bytes: &[u8]) -> Result<image::GrayImage> {
    shard::pack::decode_mask(bytes).map_err(|e| anyhow!("mask {e}"))
}

/// The centre crop of DINO's eval transform as a box on the original image.
pub fn centre_box(w: u32, h: u32, pre: Preprocess) -> loader::CropBox {
    if pre.squash {
        return loader::CropBox { x1: 0, y1: 0, w, h };
    }
    let scale = pre.resize as f64 / w.min(h) as f64;
    let side = ((pre.crop as f64 / scale).round() as u32).clamp(1, w.min(h));
    loader::CropBox { x1: (w - side) / 2, y1: (h - side) / 2, w: side, h: side }
}

/// A batch of items as normalised pixels on the device.
pub fn to_tensor(items: &[Item], size: usize, device: &Device) -> Tensor<4> {
    let data: Vec<u8> = items.iter().flat_map(|i| i.pixels.iter().copied()).collect();
    vit::normalize_pixels(&data, items.len(), size, device)
}

/// Features of a shard set: L2-normalised teacher CLS after the final norm, `[n, D]` row-major, and labels.
pub fn extract_cls(
    vit: &Vit,
    shards: &Path,
    pre: Preprocess,
    batch: usize,
    device: &Device,
) -> Result<(Vec<f32>, Vec<i64>)> {
    let (mut feats, mut labels) = (Vec::new(), Vec::new());
    let (_, skipped) = for_each_batch(shards, pre, batch, false, |items| {
        let out = vit.forward(to_tensor(items, pre.crop, device), None, &[], false);
        let cls = out.cls; // [b, D]
        let norm = cls.clone().square().sum_dim(1).sqrt().clamp_min(1e-12);
        feats.extend(host(cls / norm));
        labels.extend(items.iter().map(|i| i.label));
        Ok(())
    })?;
    if skipped > 0 {
        eprintln!("{}: {skipped} samples skipped", shards.display());
    }
    if labels.is_empty() {
        bail!("{}: no usable images", shards.display());
    }
    if let Some(n) = Some(labels.iter().filter(|&&l| l < 0).count()).filter(|&n| n > 0) {
        bail!("{}: {n} of {} samples have no class label (no .cls member)", shards.display(), labels.len());
    }
    check_labels(shards, &labels)?;
    Ok((feats, labels))
}

/// Refuses labels outside the set's class list: such a label would open a class of its own in the vote
/// (and in the per-class mean); `shard verify` refuses it, so does k-NN (on cached features too).
pub fn check_labels(shards: &Path, labels: &[i64]) -> Result<()> {
    let classes = shard::Index::load(shards)?.classes.len() as i64;
    if let Some(bad) = labels.iter().find(|&&l| l >= classes) {
        let n = labels.iter().filter(|&&l| l >= classes).count();
        bail!(
            "{}: {n} samples have a class label (e.g. {bad}) outside the {classes} classes its index lists \
             (shard verify names them)",
            shards.display()
        );
    }
    Ok(())
}

/// Refuses a k-NN whose labels cannot be compared: a train set without class labels, or a train and a
/// val set whose class lists differ (a label would mean one class in one set and another in the other).
pub fn check_knn_sets(train: &Path, val: &Path) -> Result<()> {
    let (train_index, val_index) = (shard::Index::load(train)?, shard::Index::load(val)?);
    if train_index.classes.is_empty() {
        bail!(
            "{}: the set has no class labels (its index lists no classes): k-NN needs a labelled train set",
            train.display()
        );
    }
    let ids = |i: &shard::Index| i.classes.iter().map(|c| (c.index, c.id.clone())).collect::<Vec<_>>();
    let (a, b) = (ids(&train_index), ids(&val_index));
    if a != b {
        let first = a.iter().zip(&b).find(|(x, y)| x != y);
        bail!(
            "{} ({} classes) and {} ({} classes) have different class lists{}: their labels cannot be compared. \
             Pack the val set with `shard pack --classes-from {}`",
            train.display(),
            a.len(),
            val.display(),
            b.len(),
            first.map_or(String::new(), |(x, y)| format!(" (class {}: {:?} against {:?})", x.0, x.1, y.1)),
            train.join(shard::index::INDEX_FILE).display()
        );
    }
    Ok(())
}

/// The cache key of a set's features: the set's folder name, then a hash of what decides the features:
/// the backbone (`model`: a checkpoint's digest, or a random initialisation's config), the preprocessing,
/// and the set itself (its index, which holds every shard's SHA-256).
pub fn feature_key(model: &str, pre: Preprocess, set: &Path) -> Result<String> {
    use sha2::{Digest, Sha256};
    let index = match shard::remote::remote_url(set) {
        Some(url) => shard::remote::RemoteSet::shared(url)?
            .read_small(shard::index::INDEX_FILE, common::files::MAX_TEXT_BYTES)?,
        None => {
            let index_file =
                if set.is_dir() { set.join(shard::index::INDEX_FILE) } else { set.to_path_buf() };
            common::files::read_regular(&index_file, common::files::MAX_TEXT_BYTES)
                .with_context(|| format!("reading {}", index_file.display()))?
        }
    };
    let mut h = Sha256::new();
    h.update(model.as_bytes());
    h.update(format!("{}/{}/{}", pre.resize, pre.crop, pre.squash).as_bytes());
    h.update(&index);
    let name = set.file_name().map_or("set".into(), |n| n.to_string_lossy().replace(['/', '.'], "_"));
    Ok(format!("{name}-{}", &hex::encode(h.finalize())[..16]))
}

/// Features cached as safetensors (`features` [n, D], `labels` [n] as f32) in `cache`, keyed by `key`.
pub fn cached(
    cache: Option<&Path>,
    key: &str,
    compute: impl FnOnce() -> Result<(Vec<f32>, Vec<i64>)>,
) -> Result<(Vec<f32>, Vec<i64>)> {
    let Some(dir) = cache else { return compute() };
    let path: PathBuf = dir.join(format!("{key}.safetensors"));
    if let Ok(bytes) = std::fs::read(&path)
        && let Ok(map) = checkpoint::tensors(&bytes)
        && let (Some(f), Some(l)) = (map.get("features"), map.get("labels"))
    {
        eprintln!("features from the cache {}", path.display());
        return Ok((f.1.clone(), l.1.iter().map(|&x| x as i64).collect()));
    }
    let (feats, labels) = compute()?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let d = feats.len() / labels.len();
    let tensors = [
        ("features".to_string(), vec![labels.len(), d], feats.clone()),
        ("labels".to_string(), vec![labels.len()], labels.iter().map(|&x| x as f32).collect()),
    ];
    let tmp = path.with_extension("safetensors.partial");
    std::fs::write(&tmp, checkpoint::serialize(&tensors, Default::default())?)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &path)?;
    Ok((feats, labels))
}

/// One k's result.
#[derive(Clone, Debug, PartialEq)]
pub struct KnnResult {
    pub k: usize,
    pub top1: f64,
    pub top5: f64,
    /// The mean over classes of each class's top-1 accuracy.
    pub mean_per_class: f64,
}

/// DINO's weighted k-NN (`eval_knn.knn_classifier`): cosine similarity to every training feature (both
/// L2-normalised), the k nearest vote for their class with weight `exp(sim / T)`, top-1 is the heaviest
/// class and top-5 the five heaviest. Similarities are computed on `device` in chunks of test rows.
pub fn knn(
    train: (&[f32], &[i64]),
    test: (&[f32], &[i64]),
    ks: &[usize],
    temperature: f64,
    device: &Device,
) -> Vec<KnnResult> {
    let (train_f, train_l) = train;
    let (test_f, test_l) = test;
    let n_train = train_l.len();
    let d = train_f.len() / n_train;
    let classes = train_l.iter().chain(test_l).copied().max().unwrap_or(0).max(0) as usize + 1;
    let kmax = ks.iter().copied().max().unwrap_or(1).min(n_train);
    let bank = Tensor::<2>::from_data(TensorData::new(train_f.to_vec(), [n_train, d]), device).transpose(); // [D, n]
    let mut hits = vec![(0usize, 0usize); ks.len()]; // (top1, top5)
    let mut per_class = vec![vec![(0usize, 0usize); classes]; ks.len()]; // (correct, total)
    let chunk = 256;
    let mut idx: Vec<usize> = Vec::with_capacity(n_train);
    for (ci, rows) in test_f.chunks(chunk * d).enumerate() {
        let n = rows.len() / d;
        let sims =
            host(Tensor::<2>::from_data(TensorData::new(rows.to_vec(), [n, d]), device).matmul(bank.clone())); // [n, n_train]
        for r in 0..n {
            let label = test_l[ci * chunk + r];
            let row = &sims[r * n_train..(r + 1) * n_train];
            idx.clear();
            idx.extend(0..n_train);
            idx.select_nth_unstable_by(kmax - 1, |&a, &b| row[b].total_cmp(&row[a]));
            let mut top: Vec<usize> = idx[..kmax].to_vec();
            top.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
            for (ki, &k) in ks.iter().enumerate() {
                let mut votes = vec![0f64; classes];
                for &j in &top[..k.min(kmax)] {
                    if train_l[j] >= 0 {
                        votes[train_l[j] as usize] += (row[j] as f64 / temperature).exp();
                    }
                }
                let mut order: Vec<usize> = (0..classes).collect();
                order.sort_by(|&a, &b| votes[b].total_cmp(&votes[a]));
                let correct1 = label >= 0 && order[0] == label as usize;
                let correct5 = label >= 0 && order.iter().take(5).any(|&c| c == label as usize);
                hits[ki].0 += correct1 as usize;
                hits[ki].1 += correct5 as usize;
                if label >= 0 {
                    let pc = &mut per_class[ki][label as usize];
                    pc.0 += correct1 as usize;
                    pc.1 += 1;
                }
            }
        }
    }
    let n_test = test_l.len() as f64;
    ks.iter()
        .enumerate()
        .map(|(ki, &k)| {
            let seen: Vec<f64> =
                per_class[ki].iter().filter(|c| c.1 > 0).map(|c| c.0 as f64 / c.1 as f64).collect();
            KnnResult {
                k,
                top1: hits[ki].0 as f64 / n_test,
                top5: hits[ki].1 as f64 / n_test,
                mean_per_class: seen.iter().sum::<f64>() / seen.len().max(1) as f64,
            }
        })
        .collect()
}

/// The demo's evaluation: weighted k-NN (k = 20) of the trained teacher and of a randomly initialised
/// backbone on the config's held-out synthetic set (made on first use with another seed). Returns
/// (trained, random).
pub fn synthetic_knn(cfg: &TrainConfig, checkpoint: &Path) -> Result<(KnnResult, KnnResult)> {
    let train = crate::run::data::shards(cfg, true)?;
    let val = crate::run::data::synthetic_val(cfg)?;
    let device = Device::flex();
    let pre = Preprocess::for_crop(cfg.views.global_size);
    let mut out = Vec::new();
    for ckpt in [Some(checkpoint), None] {
        let (vit, ..) = backbone(ckpt, Some(cfg), Side::Teacher, &device)?;
        let tr = extract_cls(&vit, &train, pre, 64, &device)?;
        let va = extract_cls(&vit, &val, pre, 64, &device)?;
        out.push(knn((&tr.0, &tr.1), (&va.0, &va.1), &[20], 0.07, &device).remove(0));
    }
    let random = out.pop().expect("two results");
    Ok((out.pop().expect("two results"), random))
}
