//! The linear segmentation probe (DenseDINO's VOC protocol, the paper's §4.1): frozen final-norm patch
//! tokens, a 1x1 convolution trained with SGD on features bilinearly upsampled to 100x100 against the mask
//! nearest-resized to 100x100 (void ignored), evaluated by upsampling to the input size and arg-maxing
//! against the nearest-resized ground truth; mIoU over all classes from one confusion matrix, reported for
//! the last epoch.
//!
//! A 1x1 convolution commutes with bilinear upsampling (the weights of each output pixel sum to 1), so the
//! classifier runs on the patch grid and its logits are upsampled: the same numbers, a fraction of the work.
//! Upsampling is a pair of separable weight matrices (align_corners false), built on the host.
//!
//! Deviation: features are computed once from the deterministic resize (no RandomResizedCrop and flip on
//! the training images), so the frozen backbone runs once per image instead of once per epoch.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use burn::tensor::activation::log_softmax;
use burn::tensor::{Device, Tensor, TensorData};
use rand::seq::SliceRandom;

use crate::eval::{self, Item};
use crate::model::params::host;
use crate::model::vit::Vit;
use crate::recipe::config::TrainConfig;

/// The probe's recipe; defaults are DenseDINO's `eval_segment.py` at batch 8.
#[derive(Clone, Debug)]
pub struct ProbeOptions {
    pub num_classes: usize,
    /// Label value ignored in the loss and the confusion matrix (CamVid 11, VOC 255).
    pub ignore: u8,
    /// Training resolution of features and masks (100).
    pub train_res: usize,
    pub epochs: usize,
    pub batch: usize,
    /// 0.01 * total_batch / 60.
    pub lr: f64,
    pub momentum: f64,
    pub weight_decay: f64,
    /// StepLR: lr × gamma every `step` epochs.
    pub step: usize,
    pub gamma: f64,
    pub seed: u64,
}

impl ProbeOptions {
    pub fn new(num_classes: usize, ignore: u8) -> Self {
        let batch = 8;
        Self {
            num_classes,
            ignore,
            train_res: 100,
            epochs: 25,
            batch,
            lr: 0.01 * batch as f64 / 60.0,
            momentum: 0.9,
            weight_decay: 1e-4,
            step: 20,
            gamma: 0.1,
            seed: 0,
        }
    }
}

/// Features of a set: `[n, g*g, D]` patch tokens and masks at full resolution.
pub struct SegSet {
    pub feats: Vec<f32>,
    pub grid: usize,
    pub dim: usize,
    pub masks: Vec<image::GrayImage>,
}

/// The probe's input side: `size` when given, else the model's training view size
/// (`views.global_size`), so the probe reads the patch grid the model learned rather than an
/// interpolation of it. Refuses a side that is not a positive multiple of the patch size.
pub fn probe_size(cfg: &TrainConfig, size: Option<usize>) -> Result<usize> {
    let size = size.unwrap_or(cfg.views.global_size);
    let patch = cfg.model.patch_size;
    if size == 0 || !size.is_multiple_of(patch) || size > common::config::MAX_VIEW_SIZE {
        bail!(
            "--size {size}: must be a positive multiple of the patch size {patch}, at most {}",
            common::config::MAX_VIEW_SIZE
        );
    }
    Ok(size)
}

/// 1-D bilinear weights `[out, in]`, align_corners false (PyTorch's `interpolate(mode="bilinear")`).
pub fn bilinear_1d(input: usize, output: usize) -> Vec<f32> {
    let mut w = vec![0f32; output * input];
    let scale = input as f64 / output as f64;
    for o in 0..output {
        let src = ((o as f64 + 0.5) * scale - 0.5).max(0.0);
        let i0 = (src.floor() as usize).min(input - 1);
        let i1 = (i0 + 1).min(input - 1);
        let t = src - i0 as f64;
        w[o * input + i0] += (1.0 - t) as f32;
        w[o * input + i1] += t as f32;
    }
    w
}

/// Nearest-neighbour resize of a label mask to `size`² (PyTorch's `nearest`: source index floor(o·in/out)).
pub fn resize_nearest(mask: &image::GrayImage, size: usize) -> Vec<u8> {
    let (w, h) = (mask.width() as usize, mask.height() as usize);
    let mut out = vec![0u8; size * size];
    for y in 0..size {
        let sy = ((y * h) / size).min(h - 1);
        for x in 0..size {
            let sx = ((x * w) / size).min(w - 1);
            out[y * size + x] = mask.get_pixel(sx as u32, sy as u32).0[0];
        }
    }
    out
}

/// mIoU over all classes and per-class IoU from a `[C, C]` confusion matrix (rows: truth, columns:
/// prediction): `IoU_c = tp / (row + col − tp + 1e-6)`; a class that never occurs and is never predicted
/// scores 0, as in DenseDINO's `segment_utils`.
pub fn miou(conf: &[u64], classes: usize) -> (f64, Vec<f64>) {
    let iou: Vec<f64> = (0..classes)
        .map(|c| {
            let tp = conf[c * classes + c] as f64;
            let row: f64 = (0..classes).map(|j| conf[c * classes + j] as f64).sum();
            let col: f64 = (0..classes).map(|i| conf[i * classes + c] as f64).sum();
            tp / (row + col - tp + 1e-6)
        })
        .collect();
    (iou.iter().sum::<f64>() / classes as f64, iou)
}

/// Bilinear upsampling of `[n, g, g]` maps to `[n, s, s]`: `Wy · L · Wyᵀ`, with `wy` the matrix of
/// [`bilinear_1d`]`(g, s)`.
fn upsample(wy: &Tensor<2>, maps: Tensor<3>) -> Tensor<3> {
    wy.clone().unsqueeze::<3>().matmul(maps).matmul(wy.clone().transpose().unsqueeze::<3>())
}

/// Patch features of every image (frozen backbone, the whole image resized to `size`² as the protocol does,
/// DINO normalisation) with its mask.
pub fn features(vit: &Vit, shards: &Path, size: usize, device: &Device) -> Result<SegSet> {
    let pre = eval::Preprocess { resize: size, crop: size, squash: true };
    let (mut feats, mut masks) = (Vec::new(), Vec::new());
    let (mut grid, mut dim) = (0, 0);
    eval::for_each_batch(shards, pre, 8, true, |items: &[Item]| {
        let out = vit.forward(eval::to_tensor(items, size, device), None, &[], false);
        let [_, n, d] = out.patches.dims();
        (grid, dim) = ((n as f64).sqrt() as usize, d);
        feats.extend(host(out.patches));
        masks.extend(items.iter().map(|i| i.mask.clone().expect("masks requested")));
        Ok(())
    })?;
    if masks.is_empty() {
        bail!("{}: no images with masks", shards.display());
    }
    Ok(SegSet { feats, grid, dim, masks })
}

/// The probe's result on the val set at the last epoch.
#[derive(Clone, Debug)]
pub struct ProbeResult {
    pub miou: f64,
    pub per_class: Vec<f64>,
    pub pixel_accuracy: f64,
    /// Each val image's `[C, C]` confusion matrix (rows: truth), for resampling the set.
    pub per_image: Vec<Vec<u64>>,
}

/// Trains the 1x1 convolution on `train` and scores it on `val` at the last epoch.
pub fn probe(
    train: &SegSet,
    val: &SegSet,
    opts: &ProbeOptions,
    eval_size: usize,
    device: &Device,
    quiet: bool,
) -> Result<ProbeResult> {
    let (g, d, c) = (train.grid, train.dim, opts.num_classes);
    let ad = device.clone().autodiff();
    let r = opts.train_res;
    // Bilinear upsampling of [.., g, g] logits to r x r: out = Wy · L · Wxᵀ.
    let wy = Tensor::<2>::from_data(TensorData::new(bilinear_1d(g, r), [r, g]), &ad);
    let mut rng = common::seed::rng(opts.seed, common::seed::Purpose::Model, &[77]);
    // PyTorch's Conv2d default init would do; DenseDINO initialises N(0, 0.01), bias 0.
    let mut w = Tensor::<2>::from_data(
        TensorData::new(crate::model::params::trunc_normal(d * c, 0.01, &mut rng), [d, c]),
        device,
    );
    let mut b = Tensor::<1>::zeros([c], device);
    let (mut mw, mut mb) = (w.zeros_like(), b.zeros_like());
    let targets: Vec<Vec<u8>> = train.masks.iter().map(|m| resize_nearest(m, r)).collect();
    let n = train.masks.len();
    let mut order: Vec<usize> = (0..n).collect();
    for epoch in 0..opts.epochs {
        let lr = opts.lr * opts.gamma.powi((epoch / opts.step.max(1)) as i32);
        order.shuffle(&mut rng);
        let mut epoch_loss = 0.0;
        for idx in order.chunks(opts.batch) {
            let bsz = idx.len();
            let x: Vec<f32> = idx
                .iter()
                .flat_map(|&i| train.feats[i * g * g * d..(i + 1) * g * g * d].iter().copied())
                .collect();
            let x = Tensor::<3>::from_data(TensorData::new(x, [bsz, g * g, d]), &ad);
            let wl = Tensor::from_inner(w.clone()).require_grad();
            let bl = Tensor::from_inner(b.clone()).require_grad();
            let logits = x.matmul(wl.clone().unsqueeze::<3>()) + bl.clone().unsqueeze::<3>(); // [B, g*g, C]
            let logits = logits.swap_dims(1, 2).reshape([bsz * c, g, g]); // [B*C, g, g]
            let up = upsample(&wy, logits); // [B*C, r, r]
            let logp = log_softmax(up.reshape([bsz, c, r * r]), 1);
            let mut onehot = vec![0f32; bsz * c * r * r];
            let mut valid = 0usize;
            for (bi, &i) in idx.iter().enumerate() {
                for (p, &t) in targets[i].iter().enumerate() {
                    if t != opts.ignore && (t as usize) < c {
                        onehot[(bi * c + t as usize) * r * r + p] = 1.0;
                        valid += 1;
                    }
                }
            }
            if valid == 0 {
                continue;
            }
            let onehot = Tensor::<3>::from_data(TensorData::new(onehot, [bsz, c, r * r]), &ad);
            let loss = (logp * onehot).sum().neg().div_scalar(valid as f64);
            epoch_loss += host(crate::recipe::optim::plain(loss.clone()))[0] as f64;
            let grads = loss.backward();
            let gw = wl.grad(&grads).ok_or_else(|| anyhow!("no gradient for the probe weight"))?;
            let gb = bl.grad(&grads).ok_or_else(|| anyhow!("no gradient for the probe bias"))?;
            // PyTorch SGD: g += wd·w; buf = m·buf + g; w -= lr·buf.
            let gw = gw + w.clone().mul_scalar(opts.weight_decay);
            let gb = gb + b.clone().mul_scalar(opts.weight_decay);
            mw = mw.mul_scalar(opts.momentum) + gw;
            mb = mb.mul_scalar(opts.momentum) + gb;
            w = w - mw.clone().mul_scalar(lr);
            b = b - mb.clone().mul_scalar(lr);
        }
        if !quiet {
            eprintln!(
                "probe epoch {epoch}: lr {lr:.2e}, loss {:.4}",
                epoch_loss / n.div_ceil(opts.batch) as f64
            );
        }
    }
    evaluate(val, &w, &b, opts, eval_size, device)
}

/// Upsamples the probe's logits to `size`² and compares with the nearest-resized truth.
fn evaluate(
    val: &SegSet,
    w: &Tensor<2>,
    b: &Tensor<1>,
    opts: &ProbeOptions,
    size: usize,
    device: &Device,
) -> Result<ProbeResult> {
    let (g, d, c) = (val.grid, val.dim, opts.num_classes);
    let wy = Tensor::<2>::from_data(TensorData::new(bilinear_1d(g, size), [size, g]), device);
    let mut per_image = Vec::with_capacity(val.masks.len());
    for (i, mask) in val.masks.iter().enumerate() {
        let x = Tensor::<2>::from_data(
            TensorData::new(val.feats[i * g * g * d..(i + 1) * g * g * d].to_vec(), [g * g, d]),
            device,
        );
        let logits = (x.matmul(w.clone()) + b.clone().unsqueeze::<2>()).transpose().reshape([c, g, g]); // [C, g, g]
        let up = upsample(&wy, logits); // [C, S, S]
        let pred = host(up.argmax(0).float()); // [S*S]
        let truth = resize_nearest(mask, size);
        let mut conf = vec![0u64; c * c];
        for (p, &t) in pred.iter().zip(&truth) {
            if t == opts.ignore || t as usize >= c {
                continue;
            }
            conf[t as usize * c + *p as usize] += 1;
        }
        per_image.push(conf);
    }
    let conf = sum_confusions(&per_image, 0..per_image.len(), c);
    let (miou, per_class) = miou(&conf, c);
    let right: u64 = (0..c).map(|k| conf[k * c + k]).sum();
    let total: u64 = conf.iter().sum();
    Ok(ProbeResult { miou, per_class, pixel_accuracy: right as f64 / total.max(1) as f64, per_image })
}

/// The confusion matrix of the images `which` (repeats count again).
fn sum_confusions(per_image: &[Vec<u64>], which: impl IntoIterator<Item = usize>, c: usize) -> Vec<u64> {
    let mut conf = vec![0u64; c * c];
    for i in which {
        for (t, v) in conf.iter_mut().zip(&per_image[i]) {
            *t += v;
        }
    }
    conf
}

/// The 95% percentile interval of the mIoU over `resamples` bootstrap draws of the val images (with
/// replacement, each draw as many images as the set): how much the number moves with the images chosen,
/// which is what a 1-point difference between two backbones on 101 images must be judged against.
pub fn bootstrap_interval(per_image: &[Vec<u64>], classes: usize, resamples: usize, seed: u64) -> (f64, f64) {
    use rand::Rng;
    let n = per_image.len();
    let mut rng = common::seed::rng(seed, common::seed::Purpose::Model, &[78]);
    let mut draws: Vec<f64> = (0..resamples)
        .map(|_| {
            let which: Vec<usize> = (0..n).map(|_| rng.random_range(0..n)).collect();
            miou(&sum_confusions(per_image, which, classes), classes).0
        })
        .collect();
    draws.sort_by(f64::total_cmp);
    let at = |q: f64| draws[((q * (resamples - 1) as f64).round() as usize).min(resamples - 1)];
    (at(0.025), at(0.975))
}

/// The segmentation sets the probe reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SegDataset {
    /// CamVid (SegNet's 11-class version): `train/`, `trainannot/`, `val/`, `valannot/`.
    Camvid,
    /// Pascal VOC 2012: `JPEGImages/`, `SegmentationClass/` (or `SegmentationClassAug/`), split lists in
    /// `ImageSets/Segmentation/`.
    Voc,
}

impl SegDataset {
    pub fn name(self) -> &'static str {
        match self {
            SegDataset::Camvid => "camvid",
            SegDataset::Voc => "voc",
        }
    }

    /// (class count, the ignored label, class names).
    pub fn classes(self) -> (usize, u8, Vec<String>) {
        match self {
            SegDataset::Camvid => (11, 11, CAMVID_CLASSES.map(String::from).to_vec()),
            SegDataset::Voc => (21, 255, VOC_CLASSES.map(String::from).to_vec()),
        }
    }
}

/// Pascal VOC's 21 classes (255 = void).
pub const VOC_CLASSES: [&str; 21] = [
    "background",
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
];

/// CamVid's 11 classes (void = 11).
pub const CAMVID_CLASSES: [&str; 11] = [
    "sky",
    "building",
    "pole",
    "road",
    "pavement",
    "tree",
    "sign",
    "fence",
    "car",
    "pedestrian",
    "bicyclist",
];

/// The file recording which source a packed split came from (beside its `index.json`).
const SOURCE_FILE: &str = "source.json";

/// What a packed split depends on: the folders and list it was packed from, and each of their files'
/// name, size and modification time. New masks, another `--data` folder or an edited list change it;
/// listing the folders costs a `stat` per file, far less than packing.
fn source_fingerprint(images: &Path, masks: &Path, list: Option<&Path>) -> Result<String> {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for dir in [images, masks] {
        h.update(format!("{}\n", dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf()).display()));
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .with_context(|| format!("listing {}", dir.display()))?
            .filter_map(|e| e.ok())
            .collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            // Through links: a linked file that changed is a changed source.
            let Ok(meta) = std::fs::metadata(e.path()) else { continue };
            let mtime = meta.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok());
            h.update(format!("{:?} {} {:?}\n", e.file_name(), meta.len(), mtime));
        }
    }
    if let Some(list) = list {
        h.update(common::files::read_regular(list, common::files::MAX_TEXT_BYTES).unwrap_or_default());
    }
    Ok(hex::encode(h.finalize()))
}

/// Where a raw data set's splits are, packed on first use into shards under `cache` (images + masks), so
/// the probe reads them with the same decoder and crop as the rest. A packed split is reused only while
/// its source is unchanged (see [`source_fingerprint`]); otherwise it is packed again in place.
pub fn packed_split(data: &Path, dataset: SegDataset, split: &str, cache: &Path) -> Result<PathBuf> {
    let out = cache.join(format!("{}-{split}", dataset.name()));
    let (images, masks, list) = match dataset {
        SegDataset::Camvid => (data.join(split), data.join(format!("{split}annot")), None),
        SegDataset::Voc => {
            let masks = if data.join("SegmentationClassAug").is_dir() && split == "train" {
                data.join("SegmentationClassAug")
            } else {
                data.join("SegmentationClass")
            };
            let name = if split == "train" && data.join("ImageSets/Segmentation/trainaug.txt").exists() {
                "trainaug"
            } else {
                split
            };
            (data.join("JPEGImages"), masks, Some(data.join(format!("ImageSets/Segmentation/{name}.txt"))))
        }
    };
    let packed = out.join("index.json").exists();
    if !images.is_dir() || !masks.is_dir() {
        if packed {
            // A machine with the packed cache only: nothing to compare it with.
            eprintln!("{}: the raw split is absent; using the packed copy {}", data.display(), out.display());
            return Ok(out);
        }
        bail!("{}: expected {} and {}", data.display(), images.display(), masks.display());
    }
    let source = source_fingerprint(&images, &masks, list.as_deref())?;
    if packed && std::fs::read_to_string(out.join(SOURCE_FILE)).is_ok_and(|s| s.trim() == source) {
        return Ok(out);
    }
    if packed {
        eprintln!("{}: packed from another source (or an older one); packing it again", out.display());
    }
    let opts = shard::pack::PackOptions {
        input: images.clone(),
        out: out.clone(),
        layout: shard::input::LayoutArgs { list, masks: Some(masks), ..Default::default() },
        prefix: split.to_string(),
        quiet: true,
        force: packed,
        ..Default::default()
    };
    let _ = std::fs::remove_file(out.join(SOURCE_FILE));
    shard::pack::pack(&opts).with_context(|| format!("packing {}", images.display()))?;
    shard::format::write_atomic(&out.join(SOURCE_FILE), format!("{source}\n").as_bytes())?;
    Ok(out)
}
