//! The two losses' shares of the student's gradient (`trainer eval grads`): does the reference loss move
//! the backbone, and which parts of it?
//!
//! A run's checkpoint is restored whole (student, teacher, centers, AdamW moments) and fed the batches its
//! loader would give next. For each, the CLS loss and the reference loss are backpropagated separately,
//! each weighted as it enters the step's total. Per parameter group the report gives both gradients' RMS
//! norm over the batches and their cosine, and the same two norms after AdamW's preconditioning by the
//! run's second-moment estimate `g / (sqrt(v_hat) + eps)`: Adam's update is made of that, so a loss whose
//! raw gradient is small can still steer a tensor that the other loss leaves alone.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Result, anyhow, bail};
use burn::tensor::Device;
use serde::Serialize;

use crate::model::params::{Params, host};
use crate::recipe::schedule::Schedules;
use crate::recipe::step::Trainer;
use crate::run::checkpoint;
use crate::run::data;

/// One parameter group's numbers (norms summed in quadrature over the group's tensors).
#[derive(Clone, Debug, Default, Serialize)]
pub struct GroupShare {
    pub group: String,
    pub params: usize,
    /// RMS over the batches of `alpha · ‖∇ L_cls‖`.
    pub cls_norm: f64,
    /// RMS over the batches of `(1 − alpha) · ‖∇ L_ref‖`.
    pub ref_norm: f64,
    /// `Σ_b ⟨g_cls, g_ref⟩ / sqrt(Σ_b ‖g_cls‖² · Σ_b ‖g_ref‖²)`: do the two losses push the same way?
    pub cosine: f64,
    /// The same norms after AdamW's preconditioning by the checkpoint's second moments.
    pub cls_adam: f64,
    pub ref_adam: f64,
}

impl GroupShare {
    /// The reference loss's share of the two norms, raw and preconditioned.
    pub fn ref_share(&self) -> (f64, f64) {
        let share = |c: f64, r: f64| if c + r > 0.0 { r / (c + r) } else { 0.0 };
        (share(self.cls_norm, self.ref_norm), share(self.cls_adam, self.ref_adam))
    }
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub checkpoint: PathBuf,
    pub step: usize,
    pub batches: usize,
    pub alpha: f64,
    /// In the model's order, then "backbone" (every backbone tensor) and "all".
    pub groups: Vec<GroupShare>,
}

/// The group a parameter is reported in: the backbone's embeddings one by one, each block, the final norm,
/// and each head as a whole.
pub fn group_of(name: &str) -> String {
    let name = name.strip_prefix("backbone.").unwrap_or(name);
    let mut parts = name.split('.');
    match (parts.next(), parts.next()) {
        (Some("blocks"), Some(i)) => format!("blocks.{i}"),
        (Some(first), _) => first.to_string(),
        (None, _) => String::new(),
    }
}

/// The groups a parameter is counted in: its own ([`group_of`]), the whole backbone's, and everything's.
fn groups_of(name: &str) -> impl Iterator<Item = String> {
    let backbone = name.starts_with("backbone.").then(|| "backbone".to_string());
    [group_of(name)].into_iter().chain(backbone).chain(["all".to_string()])
}

/// Sums of squares and products over the batches, per group.
#[derive(Default, Clone)]
struct Sums {
    params: usize,
    cc: f64,
    rr: f64,
    cr: f64,
    cc_adam: f64,
    rr_adam: f64,
}

impl Sums {
    fn add(&mut self, o: &Sums) {
        self.cc += o.cc;
        self.rr += o.rr;
        self.cr += o.cr;
        self.cc_adam += o.cc_adam;
        self.rr_adam += o.rr_adam;
    }

    fn share(&self, group: &str, batches: usize) -> GroupShare {
        let n = batches.max(1) as f64;
        GroupShare {
            group: group.to_string(),
            params: self.params,
            cls_norm: (self.cc / n).sqrt(),
            ref_norm: (self.rr / n).sqrt(),
            cosine: if self.cc > 0.0 && self.rr > 0.0 { self.cr / (self.cc * self.rr).sqrt() } else { 0.0 },
            cls_adam: (self.cc_adam / n).sqrt(),
            ref_adam: (self.rr_adam / n).sqrt(),
        }
    }
}

/// One tensor's contribution: the two gradients `c`, `r` and Adam's denominator `sqrt(v_hat) + eps`
/// (`None` before the tensor's first update: no preconditioning to report).
fn tensor_sums(c: &[f32], r: &[f32], denom: Option<&[f32]>) -> Sums {
    let mut s = Sums::default();
    for (i, (&c, &r)) in c.iter().zip(r).enumerate() {
        let (c, r) = (f64::from(c), f64::from(r));
        s.cc += c * c;
        s.rr += r * r;
        s.cr += c * r;
        if let Some(d) = denom {
            let d = f64::from(d[i]);
            s.cc_adam += (c / d).powi(2);
            s.rr_adam += (r / d).powi(2);
        }
    }
    s
}

/// The report for the latest checkpoint of `run` (a run folder or a checkpoint file) over `batches`
/// batches of its own data (those it would train on next; a finished run's last epoch), on `device`.
pub fn evaluate(run: &Path, batches: usize, device: &Device) -> Result<Report> {
    let (file, bytes) = checkpoint::latest(run)?;
    let meta = checkpoint::meta(&bytes)?;
    let cfg = meta.config.clone();
    if !(cfg.loss.use_ref_loss && cfg.loss.use_global_loss) {
        bail!(
            "{}: the run trains {} only; the split needs both losses (a DenseDINO run)",
            file.display(),
            if cfg.loss.use_ref_loss { "the reference loss" } else { "the CLS loss" }
        );
    }
    let shards = data::shards(&cfg, true)?;
    let ipe = data::iters_per_epoch(&cfg, &shards, 0, 1)?;
    let schedules = Schedules::new(&cfg.optim, cfg.run.epochs, ipe, cfg.run.batch_size * meta.world_size);
    let mut trainer = Trainer::from_config(&cfg, schedules, device, &Default::default())?;
    checkpoint::restore(&mut trainer, &bytes)?;
    let (b2, eps) = (trainer.optim.beta2, trainer.optim.eps);
    // AdamW's denominator per tensor, as its next update would use it (the step count after this one).
    let denoms: BTreeMap<String, Vec<f32>> = trainer
        .optim
        .state
        .iter()
        .map(|(name, st)| {
            let correction = 1.0 - b2.powi((st.step + 1) as i32);
            let d = host(st.v.clone()).into_iter().map(|v| ((f64::from(v) / correction).sqrt() + eps) as f32);
            (name.clone(), d.collect())
        })
        .collect();

    let rt = data::runtime()?;
    // A finished run's cursor is past its data: its last epoch's batches are read again.
    let last = cfg.run.epochs.saturating_sub(1) as u64;
    let cursor = match meta.cursor {
        c if c.epoch > last => common::Cursor { epoch: last, samples: 0 },
        c => c,
    };
    let loader = rt.block_on(async { loader::start(data::loader_options(&cfg, &shards, cursor)) })?;
    // The groups in the model's order (the backbone's and everything's last), with their sizes.
    let mut order: Vec<String> = Vec::new();
    let mut sums: BTreeMap<String, Sums> = BTreeMap::new();
    trainer.student.visit("", &mut |name, p| {
        for g in groups_of(name) {
            if !sums.contains_key(&g) && g != "backbone" && g != "all" {
                order.push(g.clone());
            }
            sums.entry(g).or_default().params += p.dims().iter().product::<usize>();
        }
    });
    order.extend(["backbone".to_string(), "all".to_string()]);
    let mut seen = 0;
    while seen < batches {
        let Some(batch) = rt.block_on(loader.next())? else { break };
        let parts = trainer.loss_gradients(&batch).ok_or_else(|| anyhow!("the run has no reference loss"))?;
        for crate::recipe::step::LossGradients { name, cls, refs } in &parts {
            let s = tensor_sums(cls, refs, denoms.get(name).map(Vec::as_slice));
            for g in groups_of(name) {
                sums.entry(g).or_default().add(&s);
            }
        }
        seen += 1;
    }
    rt.block_on(loader.shutdown());
    if seen == 0 {
        bail!("{}: the data gave no batch", shards.display());
    }
    let groups = order.iter().map(|g| sums[g].share(g, seen)).collect();
    Ok(Report { checkpoint: file, step: meta.it, batches: seen, alpha: cfg.loss.alpha, groups })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_are_the_embeddings_each_block_and_each_head() {
        assert_eq!(group_of("backbone.pos_embed"), "pos_embed");
        assert_eq!(group_of("backbone.patch_embed.proj.weight"), "patch_embed");
        assert_eq!(group_of("backbone.blocks.11.attn.qkv.weight"), "blocks.11");
        assert_eq!(group_of("backbone.norm.bias"), "norm");
        assert_eq!(group_of("head.last_layer.weight_v"), "head");
        assert_eq!(group_of("ref_head.mlp.0.weight"), "ref_head");
    }

    #[test]
    fn norms_cosine_and_preconditioning_by_hand() {
        // c = (3, 0), r = (0, 4): orthogonal; then c = r = (1, 1): parallel. Denominators 2 and 0.5.
        let d = [2.0f32, 0.5];
        let mut s = tensor_sums(&[3.0, 0.0], &[0.0, 4.0], Some(&d));
        s.add(&tensor_sums(&[1.0, 1.0], &[1.0, 1.0], Some(&d)));
        let g = s.share("x", 2);
        assert!((g.cls_norm - (11.0f64 / 2.0).sqrt()).abs() < 1e-12); // (9 + 2) / 2
        assert!((g.ref_norm - (18.0f64 / 2.0).sqrt()).abs() < 1e-12); // (16 + 2) / 2
        assert!((g.cosine - 2.0 / (11.0f64 * 18.0).sqrt()).abs() < 1e-12);
        // (3/2)² + (1/2)² + 2² = 6.5 ; (4/0.5)² + (1/2)² + 2² = 68.25
        assert!((g.cls_adam - (6.5f64 / 2.0).sqrt()).abs() < 1e-12);
        assert!((g.ref_adam - (68.25f64 / 2.0).sqrt()).abs() < 1e-12);
        let (raw, adam) = g.ref_share();
        assert!((raw - 9f64.sqrt() / (5.5f64.sqrt() + 9f64.sqrt())).abs() < 1e-12);
        assert!(adam > raw, "the reference gradient sits where Adam's denominator is small");
    }
}
