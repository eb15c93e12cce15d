//! Weights in the official layout and back: the teacher backbone under the key names of DINO's
//! `vision_transformer.py` and timm's `vit_*_patch16_224` (`cls_token`, `pos_embed` [1, 1+N, D],
//! `patch_embed.proj.weight`, `blocks.{i}.attn.qkv.weight`, …, `norm.weight`), Linear weights as PyTorch's
//! `[out, in]`, so `model.load_state_dict(load_file(path))` takes it with strict key matching; optionally
//! the heads (`head.mlp.0.weight`, …, `head.last_layer.weight_v/_g`, and `ref_head.*`).
//!
//! Import reads such files back, and the checkpoints of the official code once converted to safetensors:
//! prefixes `module.`, `teacher.`/`student.` and `backbone.` are stripped, and DenseDINO's split
//! `cls_pos_embed` [1,1,D] / `patch_pos_embed` [1,N,D] are joined into `pos_embed`. PyTorch `.pth` pickles
//! are not read here (see [`import`]).

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};

use crate::checkpoint;
use crate::params::{self, Params};

pub use crate::params::Named;

/// Writes `model`'s parameters under `prefix` in the official layout to `out` (atomically).
pub fn write_official(
    models: &mut [(&str, &mut dyn Params)],
    out: &Path,
    metadata: HashMap<String, String>,
) -> Result<usize> {
    let mut tensors = Vec::new();
    for (prefix, model) in models.iter_mut() {
        for (name, dims, values) in params::to_official(*model) {
            tensors.push((format!("{prefix}{name}"), dims, values));
        }
    }
    let tmp = out.with_extension("safetensors.partial");
    std::fs::write(&tmp, checkpoint::serialize(&tensors, metadata)?)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, out)?;
    Ok(tensors.len())
}

/// `trainer export`: the teacher of a checkpoint (optionally with its heads) in the official layout.
pub fn export(
    ckpt: &Path,
    out: &Path,
    heads: bool,
    device: &burn::tensor::Device,
) -> Result<usize> {
    let (_, bytes) = checkpoint::latest(ckpt)?;
    let meta = checkpoint::meta(&bytes)?;
    let cfg = meta.config;
    let with_ref = cfg.loss.use_ref_loss && !cfg.head.shared_ref_head;
    let mut rng = common::seed::rng(0, common::seed::Purpose::Model, &[0]);
    let mut teacher =
        crate::model::DenseDino::new(&cfg.model, &cfg.head, with_ref, &mut rng, device);
    let map = checkpoint::tensors(&bytes)?;
    let get = |n: &str| map.get(n).cloned();
    params::load(&mut teacher, "teacher.", &get, device, false).map_err(|e| anyhow!(e))?;
    let metadata = HashMap::from([
        (
            "format".to_string(),
            "densedino-export/1 (official DINO ViT layout)".to_string(),
        ),
        ("embed_dim".to_string(), cfg.model.embed_dim.to_string()),
        ("depth".to_string(), cfg.model.depth.to_string()),
        ("num_heads".to_string(), cfg.model.num_heads.to_string()),
        ("patch_size".to_string(), cfg.model.patch_size.to_string()),
        ("img_size".to_string(), cfg.model.img_size.to_string()),
        ("step".to_string(), meta.it.to_string()),
    ]);
    if heads {
        let crate::model::DenseDino {
            backbone,
            head,
            ref_head,
        } = &mut teacher;
        let mut models: Vec<(&str, &mut dyn Params)> = vec![("", backbone), ("head.", head)];
        if let Some(r) = ref_head {
            models.push(("ref_head.", r));
        }
        write_official(&mut models, out, metadata)
    } else {
        write_official(&mut [("", &mut teacher.backbone)], out, metadata)
    }
}

/// Reads official-layout weights: safetensors only. For a `.pth` checkpoint of the official code, convert
/// it once with PyTorch (the error message says how); unpickling arbitrary Python is not done here.
pub fn import(path: &Path) -> Result<Named> {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    if ext == "pth" || ext == "pt" {
        bail!(
            "{}: PyTorch pickles are not read directly; convert once with\n  python -c \"import torch; from safetensors.torch import save_file; \
             sd = torch.load('{0}', map_location='cpu'); sd = sd.get('teacher', sd); \
             save_file({{k: v.float().contiguous() for k, v in sd.items()}}, '{0}.safetensors')\"",
            path.display()
        );
    }
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let raw = checkpoint::tensors(&bytes)
        .with_context(|| format!("{}: not a safetensors file of f32 tensors", path.display()))?;
    let mut out = Named::new();
    for (name, t) in raw {
        let mut n = name.as_str();
        for p in ["module.", "teacher.", "student.", "backbone."] {
            n = n.strip_prefix(p).unwrap_or(n);
        }
        out.insert(n.to_string(), t);
    }
    if !out.contains_key("pos_embed")
        && let (Some(cls), Some(patch)) =
            (out.remove("cls_pos_embed"), out.remove("patch_pos_embed"))
    {
        let d = cls.0[2];
        let n = patch.0[1];
        let mut v = cls.1;
        v.extend(patch.1);
        out.insert("pos_embed".into(), (vec![1, 1 + n, d], v));
    }
    Ok(out)
}
