//! Weights in the official layout and back: the teacher backbone under the key names of DINO's
//! `vision_transformer.py` and timm's `vit_*_patch16_224` (`cls_token`, `pos_embed` [1, 1+N, D],
//! `patch_embed.proj.weight`, `blocks.{i}.attn.qkv.weight`, …, `norm.weight`), Linear weights as PyTorch's
//! `[out, in]`, so `model.load_state_dict(load_file(path))` takes it with strict key matching; optionally
//! the heads (`head.mlp.0.weight`, …, `head.last_layer.weight_v/_g`, and `ref_head.*`).
//!
//! Import reads such files back, and the checkpoints of the official code, as `.pth` or safetensors: a
//! training checkpoint gives its teacher, prefixes `module.` and `backbone.` are stripped, and DenseDINO's
//! split `cls_pos_embed` [1,1,D] / `patch_pos_embed` [1,N,D] are joined into `pos_embed`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};

use burn::tensor::Device;
use common::Cursor;

use crate::model::params::{self, Params};
use crate::recipe::config::TrainConfig;
use crate::recipe::schedule::Schedules;
use crate::recipe::step::Trainer;
use crate::run::checkpoint::{self, Meta};

pub use crate::model::params::Named;

/// Writes each model's parameters under its prefix in the official layout to `out` (atomically).
/// A head with `norm_last_layer` has no `weight_g` parameter here (it is fixed at 1), but PyTorch's
/// `weight_norm` state dict always holds one, so ones `[K, 1]` are written in its place for strict loading.
pub fn write_official(
    models: &mut [(&str, &mut dyn Params)],
    out: &Path,
    metadata: HashMap<String, String>,
) -> Result<usize> {
    let mut tensors = Vec::new();
    for (prefix, model) in models.iter_mut() {
        let official = params::to_official(*model);
        let has_g = official.iter().any(|(n, _, _)| n == "last_layer.weight_g");
        for (name, dims, values) in official {
            if name == "last_layer.weight_v" && !has_g {
                let k = dims[0];
                tensors.push((format!("{prefix}last_layer.weight_g"), vec![k, 1], vec![1.0; k]));
            }
            tensors.push((format!("{prefix}{name}"), dims, values));
        }
    }
    shard::format::write_atomic(out, &checkpoint::serialize(&tensors, metadata)?)?;
    Ok(tensors.len())
}

/// `trainer export`: the teacher of a checkpoint (optionally with its heads) in the official layout.
/// `out` must not exist unless `force`, and is never a training checkpoint, a folder or a device.
pub fn export(
    ckpt: &Path,
    out: &Path,
    heads: bool,
    force: bool,
    device: &burn::tensor::Device,
) -> Result<usize> {
    check_export_target(out, force)?;
    let (_, bytes) = checkpoint::latest(ckpt)?;
    let meta = checkpoint::meta(&bytes)?;
    let cfg = meta.config;
    let with_ref = cfg.loss.use_ref_loss && !cfg.head.shared_ref_head;
    let mut rng = common::seed::rng(0, common::seed::Purpose::Model, &[0]);
    let mut teacher = crate::model::DenseDino::new(&cfg.model, &cfg.head, with_ref, &mut rng, device);
    let map = checkpoint::tensors(&bytes)?;
    let get = |n: &str| map.get(n).cloned();
    params::load(&mut teacher, "teacher.", &get, device, false)?;
    let metadata = HashMap::from([
        ("format".to_string(), "densedino-export/1 (official DINO ViT layout)".to_string()),
        ("embed_dim".to_string(), cfg.model.embed_dim.to_string()),
        ("depth".to_string(), cfg.model.depth.to_string()),
        ("num_heads".to_string(), cfg.model.num_heads.to_string()),
        ("patch_size".to_string(), cfg.model.patch_size.to_string()),
        ("img_size".to_string(), cfg.model.img_size.to_string()),
        ("step".to_string(), meta.it.to_string()),
    ]);
    if heads {
        let crate::model::DenseDino { backbone, head, ref_head } = &mut teacher;
        let mut models: Vec<(&str, &mut dyn Params)> = vec![("", backbone), ("head.", head)];
        if let Some(r) = ref_head {
            models.push(("ref_head.", r));
        }
        write_official(&mut models, out, metadata)
    } else {
        write_official(&mut [("", &mut teacher.backbone)], out, metadata)
    }
}

/// Where an export may go: not over anything but a regular file (`/dev/full` as root would become a
/// regular file), not over a run's checkpoint even with `force` (its resume would then fail), and not
/// over an existing file without `force`.
fn check_export_target(out: &Path, force: bool) -> Result<()> {
    common::files::check_replaceable(out).with_context(|| format!("--out {}", out.display()))?;
    if !out.exists() {
        return Ok(());
    }
    let in_checkpoints = out
        .canonicalize()
        .ok()
        .and_then(|p| p.parent().and_then(|d| d.file_name()).map(|d| d == "checkpoints"))
        .unwrap_or(false);
    if in_checkpoints
        && checkpoint::verify(&common::files::read_regular(out, common::files::MAX_WEIGHTS_BYTES)?).is_ok()
    {
        bail!("--out {}: is a training checkpoint of a run; export elsewhere", out.display());
    }
    if !force {
        bail!("--out {}: exists; pass --force to replace it", out.display());
    }
    Ok(())
}

/// Reads official-layout weights from safetensors or a PyTorch `.pth`/`.pt` (read without PyTorch by
/// burn's `pytorch-reader`; f16, bf16 and f64 become f32, integer tensors such as step counts are left
/// out). A full training checkpoint of the official code (`student`, `teacher`, `optimizer`, …) gives its
/// teacher. Prefixes `module.` and `backbone.` are stripped; DenseDINO's split position embeddings are
/// joined.
pub fn import(path: &Path) -> Result<Named> {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    let raw = if ext == "pth" || ext == "pt" {
        read_pytorch(path)?
    } else {
        let bytes = common::files::read_regular(path, common::files::MAX_WEIGHTS_BYTES)
            .with_context(|| format!("reading {}", path.display()))?;
        checkpoint::tensors(&bytes)
            .with_context(|| format!("{}: not a safetensors file of f32 tensors", path.display()))?
    };
    // A file with both sides holds a training state: the teacher is the model DINO evaluates.
    let side = ["teacher.", "student."].into_iter().find(|side| raw.keys().any(|k| k.starts_with(side)));
    let mut out = Named::new();
    for (name, t) in raw {
        let mut n = name.as_str();
        if let Some(side) = side {
            let Some(rest) = n.strip_prefix(side) else {
                continue;
            };
            n = rest;
        }
        for p in ["module.", "backbone."] {
            n = n.strip_prefix(p).unwrap_or(n);
        }
        out.insert(n.to_string(), t);
    }
    if out.is_empty() {
        bail!("{}: no floating-point tensors found", path.display());
    }
    if !out.contains_key("pos_embed")
        && let (Some(cls), Some(patch)) = (out.remove("cls_pos_embed"), out.remove("patch_pos_embed"))
    {
        let d = cls.0[2];
        let n = patch.0[1];
        let mut v = cls.1;
        v.extend(patch.1);
        out.insert("pos_embed".into(), (vec![1, 1 + n, d], v));
    }
    Ok(out)
}

/// Every floating-point tensor of a PyTorch pickle checkpoint, by its dotted path, as f32.
fn read_pytorch(path: &Path) -> Result<Named> {
    use pytorch_reader::DType;
    let reader = pytorch_reader::PytorchReader::new(path)
        .map_err(|e| anyhow!("{}: not a readable PyTorch checkpoint: {e}", path.display()))?;
    let mut out = Named::new();
    for (name, t) in reader.tensors() {
        let read = || t.read().with_context(|| format!("{}: reading {name}", path.display()));
        let values: Vec<f32> = match t.dtype() {
            DType::F64 => read()?
                .chunks_exact(8)
                .map(|c| f64::from_ne_bytes(c.try_into().expect("8 bytes")) as f32)
                .collect(),
            DType::F32 => {
                read()?.chunks_exact(4).map(|c| f32::from_ne_bytes(c.try_into().expect("4 bytes"))).collect()
            }
            DType::F16 => {
                read()?.chunks_exact(2).map(|c| half::f16::from_ne_bytes([c[0], c[1]]).to_f32()).collect()
            }
            DType::BF16 => {
                read()?.chunks_exact(2).map(|c| half::bf16::from_ne_bytes([c[0], c[1]]).to_f32()).collect()
            }
            // Integer tensors (optimizer step counts, index buffers) are not weights.
            _ => continue,
        };
        out.insert(name.clone(), (t.shape().to_vec(), values));
    }
    Ok(out)
}

/// A step-0 run folder from official-layout weights: backbone into student and teacher; heads from the
/// file when present, else freshly initialised; a missing `ref_head` starts as a copy of `head` (the
/// official code's fine-tuning mode).
///
/// `out` must not hold a run already (its checkpoints, metrics or config); with `force` that run's files
/// are removed first, so the folder holds the imported run alone.
pub fn import_run(cfg: &TrainConfig, weights: &Path, out: &Path, force: bool) -> Result<PathBuf> {
    let run_files = ["checkpoints", "metrics.jsonl", "config.toml"].map(|f| out.join(f));
    let holds_run = run_files.iter().any(|f| f.exists());
    if holds_run && !force {
        bail!(
            "{} already holds a run (its checkpoints, metrics or config): importing would mix two runs. Choose \
             a new --out, or pass --force to replace that run",
            out.display()
        );
    }
    let mut named = import(weights)?;
    if !named.keys().any(|k| k.starts_with("ref_head.")) {
        let copies: Vec<(String, crate::model::params::HostTensor)> = named
            .iter()
            .filter(|(k, _)| k.starts_with("head."))
            .map(|(k, v)| (format!("ref_{k}"), v.clone()))
            .collect();
        named.extend(copies);
    }
    let device = Device::flex();
    let schedules = Schedules::new(&cfg.optim, cfg.run.epochs, 1, cfg.run.batch_size);
    let mut trainer = Trainer::from_config(cfg, schedules, &device, &Default::default())?;
    // `import` has stripped `backbone.`: backbone tensors sit at the top level, heads under their prefix.
    let get = |n: &str| named.get(n).cloned();
    let load_side = |model: &mut crate::model::DenseDino, dev: &burn::tensor::Device| -> Result<()> {
        let mut parts: Vec<(&str, &mut dyn crate::model::params::Params)> = vec![("", &mut model.backbone)];
        if named.contains_key("head.last_layer.weight_v") {
            parts.push(("head.", &mut model.head));
            if let Some(r) = &mut model.ref_head {
                parts.push(("ref_head.", r));
            }
        }
        for (prefix, part) in parts {
            crate::model::params::load_official(part, prefix, &get, dev)
                .with_context(|| weights.display().to_string())?;
        }
        Ok(())
    };
    load_side(&mut trainer.student, &device.clone().autodiff())?;
    load_side(&mut trainer.teacher, &device)?;
    let meta = Meta { it: 0, cursor: Cursor::default(), config: cfg.clone(), world_size: 1, data: None };
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    // Held until the import is written: a trainer running in `out` is never pulled from under itself.
    let _lock = crate::run::lock_run(out)?;
    if holds_run {
        // Only now, with the new weights read and loaded: a failed import leaves the old run as it was.
        for f in &run_files {
            let removed = if f.is_dir() { std::fs::remove_dir_all(f) } else { std::fs::remove_file(f) };
            if let Err(e) = removed.or_else(|e| if f.exists() { Err(e) } else { Ok(()) }) {
                bail!("--force: cannot remove {}: {e}", f.display());
            }
        }
        for plot in ["loss.png", "schedules.png", "entropy.png"] {
            let _ = std::fs::remove_file(out.join(plot)); // drawn from the metrics just removed
        }
        for events in crate::run::tensorboard::files(out) {
            let _ = std::fs::remove_file(events); // the same history, as TensorBoard shows it
        }
    }
    // The checkpoint first: a folder with a config and no checkpoint reads as a run killed before its first
    // step, which `--resume` would start over from random weights.
    let saved = checkpoint::save(&out.join("checkpoints"), &mut trainer, &meta, cfg.run.keep_checkpoints)?;
    shard::format::write_atomic(&out.join("config.toml"), cfg.to_toml().as_bytes())?;
    Ok(saved)
}
