//! The DenseDINO objective (`DINOLoss` in DenseDINO's `main_dino.py`; the paper's §3.1 and §3.2): DINO's
//! centred, sharpened cross-entropy on the CLS token plus the same on reference tokens, matched point for
//! point across views, with separate centers.

use anyhow::Context;
use burn::tensor::activation::softmax;
use burn::tensor::{Device, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use crate::fused::{self, Pairs};
use crate::parallel::World;

/// Which teacher reference groups feed `ref_center` (the paper and the code differ here; the code's choice is
/// the default).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RefCenterGroups {
    /// The official code: groups v ∈ {0, 1} of both global views, self-pairs (g, g) included.
    Global,
    /// Only the cross pairs (0, 1) and (1, 0): leaves out the self-pair points spread over a whole crop.
    GlobalCross,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LossConfig {
    /// The CLS (DINO) loss (`--use_global_loss`).
    pub use_global_loss: bool,
    /// The reference-token loss (`--use_ref_loss`).
    pub use_ref_loss: bool,
    /// α in `α·L_cls + (1−α)·L_ref` (0.5, the paper and the `--alpha` default).
    pub alpha: f64,
    /// Student temperature (0.1, hard-coded in DINOLoss).
    pub student_temp: f64,
    /// Teacher temperature after warmup (0.04 in the code default; 0.07 for the DINO "boost" recipe).
    pub teacher_temp: f64,
    /// Teacher temperature at epoch 0 of the warmup (0.04).
    pub warmup_teacher_temp: f64,
    /// Epochs of linear teacher-temperature warmup (0: constant).
    pub warmup_teacher_temp_epochs: usize,
    /// Center EMA momentum (0.9, hard-coded).
    pub center_momentum: f64,
    /// CLS terms over every student view (`--use_all_crop_global`; off in the official command, so the
    /// CLS loss then has only the two global↔global terms). The paper's Eq. 2 sums over all views.
    pub use_all_crop_global: bool,
    /// Reference terms over every student view (`--use_all_crop_ref`; on in the official command).
    pub use_all_crop_ref: bool,
    /// Which teacher reference groups update `ref_center`.
    pub ref_center_groups: RefCenterGroups,
}

impl Default for LossConfig {
    fn default() -> Self {
        Self {
            use_global_loss: true,
            use_ref_loss: true,
            alpha: 0.5,
            student_temp: 0.1,
            teacher_temp: 0.04,
            warmup_teacher_temp: 0.04,
            warmup_teacher_temp_epochs: 0,
            center_momentum: 0.9,
            use_all_crop_global: false,
            use_all_crop_ref: true,
            ref_center_groups: RefCenterGroups::Global,
        }
    }
}

impl LossConfig {
    /// τ_t(epoch): `linspace(warmup, temp, E_w)` per epoch (inclusive), then constant.
    pub fn teacher_temp_at(&self, epoch: usize) -> f64 {
        let ew = self.warmup_teacher_temp_epochs;
        if epoch >= ew {
            self.teacher_temp
        } else if ew == 1 {
            self.warmup_teacher_temp
        } else {
            self.warmup_teacher_temp
                + (self.teacher_temp - self.warmup_teacher_temp) * epoch as f64 / (ew - 1) as f64
        }
    }
}

/// How the logits of one step are laid out: B images, V views, M points per ordered pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    pub batch: usize,
    pub views: usize,
    pub points: usize,
}

/// The two centers (buffers, saved in checkpoints) and the loss itself.
pub struct DenseDinoLoss {
    pub cfg: LossConfig,
    /// `[1, K]` for the CLS logits.
    pub center: Tensor<2>,
    /// `[1, K]` for the reference logits.
    pub ref_center: Tensor<2>,
}

/// The loss of one step. `total` carries the gradient; the parts are for logging.
pub struct LossOutput {
    pub total: Tensor<1>,
    pub cls: Option<Tensor<1>>,
    pub refs: Option<Tensor<1>>,
    /// The teacher's CLS targets `softmax((t − c)/τ)` `[2B, K]` (plain device), for the collapse metrics.
    pub cls_targets: Tensor<2>,
}

impl DenseDinoLoss {
    pub fn new(cfg: &LossConfig, out_dim: usize, device: &Device) -> Self {
        let zeros = || Tensor::<2>::zeros([1, out_dim], device);
        Self { cfg: cfg.clone(), center: zeros(), ref_center: zeros() }
    }

    /// `t_cls`: teacher CLS logits `[2B, K]` (views 0, 1), `s_cls`: student CLS logits `[V*B, K]`;
    /// `t_ref`: teacher reference logits `[2B * V * M, K]` (group-major: view g, then partner v, then point);
    /// `s_ref`: student reference logits `[V * B * 2 * M, K]` (view v, then global g, then point).
    /// Teacher logits carry no gradient. The centers are *not* updated here ([`Self::update_centers`]).
    pub fn forward(
        &self,
        t_cls: Tensor<2>,
        s_cls: Tensor<2>,
        t_ref: Option<Tensor<2>>,
        s_ref: Option<Tensor<2>>,
        layout: Layout,
        teacher_temp: f64,
    ) -> LossOutput {
        let (b, v, m) = (layout.batch, layout.views, layout.points);
        let cfg = &self.cfg;
        let inv_s = 1.0 / cfg.student_temp;
        let inv_t = 1.0 / teacher_temp;
        let device = s_cls.device();
        // Teacher targets are computed without autodiff, then enter the student's graph as constants.
        let autodiff = device.is_autodiff();
        let as_const = |t: Tensor<2>| {
            if autodiff { Tensor::<2>::from_inner(t) } else { t }
        };

        // Computed even without the CLS loss: the step's collapse metrics read them.
        let cls_targets = softmax((t_cls - self.center.clone()).mul_scalar(inv_t), 1); // [2B, K]
        let cls = cfg.use_global_loss.then(|| {
            // Teacher view g (rows g·B + i) against student view sv ≠ g (rows sv·B + i): the two
            // global↔global terms, or every student view with `use_all_crop_global`.
            let terms: Vec<(usize, usize)> = (0..2)
                .flat_map(|g| (0..v).map(move |sv| (g, sv)))
                .filter(|&(g, sv)| sv != g && (cfg.use_all_crop_global || sv < 2))
                .collect();
            let pairs = Pairs::new(
                v * b,
                terms.iter().flat_map(|&(g, sv)| (0..b).map(move |i| (sv * b + i, g * b + i))),
            );
            // Each term is a mean over B rows; the terms are averaged as the official `n_loss_terms`.
            let weight = 1.0 / (b as f64 * (terms.len() as f64 + 1e-5));
            fused::dino_ce(s_cls, as_const(cls_targets.clone()), &pairs, inv_s, weight)
        });

        let refs = match (cfg.use_ref_loss, t_ref, s_ref) {
            (true, Some(t_ref), Some(s_ref)) => {
                let p = softmax((t_ref - self.ref_center.clone()).mul_scalar(inv_t), 1); // [2·B·V·M, K]
                let terms: Vec<(usize, usize)> = (0..2)
                    .flat_map(|g| (0..v).map(move |sv| (g, sv)))
                    .filter(|&(g, sv)| sv != g && (cfg.use_all_crop_ref || sv < 2))
                    .collect();
                // Teacher view g, partner sv, point j  ↔  student view sv, global g, point j.
                let pairs = Pairs::new(
                    v * b * 2 * m,
                    terms.iter().flat_map(|&(g, sv)| {
                        (0..b * m).map(move |bj| {
                            let (i, j) = (bj / m, bj % m);
                            (((sv * b + i) * 2 + g) * m + j, ((g * b + i) * v + sv) * m + j)
                        })
                    }),
                );
                let weight = 1.0 / ((b * m) as f64 * (terms.len() as f64 + 1e-5));
                Some(fused::dino_ce(s_ref, as_const(p), &pairs, inv_s, weight))
            }
            _ => None,
        };

        let total = match (&cls, &refs) {
            (Some(c), Some(r)) => c.clone().mul_scalar(cfg.alpha) + r.clone().mul_scalar(1.0 - cfg.alpha),
            (Some(c), None) => c.clone(),
            (None, Some(r)) => r.clone(),
            (None, None) => {
                panic!("the loss config enables neither the CLS nor the reference loss")
            }
        };
        LossOutput { total, cls, refs, cls_targets }
    }

    /// `c ← m·c + (1−m)·mean(teacher logits)`, after the loss (each step uses the previous centers), in
    /// one process.
    pub fn update_centers(&mut self, t_cls: Tensor<2>, t_ref: Option<Tensor<2>>, layout: Layout) {
        self.update_centers_across(&World::single(), t_cls, t_ref, layout)
            .expect("one process runs no collective");
    }

    /// The same over the ranks of `world`, as the official code: the batch sums all-reduced, divided by
    /// the global count (every rank holds `layout.batch` samples). An error is an all-reduce failing.
    pub fn update_centers_across(
        &mut self,
        world: &World,
        t_cls: Tensor<2>,
        t_ref: Option<Tensor<2>>,
        layout: Layout,
    ) -> anyhow::Result<()> {
        let (batch, views, points) = (layout.batch, layout.views, layout.points);
        let mom = self.cfg.center_momentum;
        let n = (t_cls.dims()[0] * world.size) as f64;
        let batch_center = world.sum(t_cls.sum_dim(0)).context("summing the teacher's CLS logits")?; // [1, K]
        let batch_center = batch_center.div_scalar(n);
        self.center = self.center.clone().mul_scalar(mom) + batch_center.mul_scalar(1.0 - mom);
        if let Some(t_ref) = t_ref {
            let k = t_ref.dims()[1];
            let t = t_ref.reshape([2, batch, views, points, k]);
            let used = match self.cfg.ref_center_groups {
                RefCenterGroups::Global => t.narrow(2, 0, 2).reshape([2 * batch * 2 * points, k]),
                RefCenterGroups::GlobalCross => Tensor::cat(
                    vec![
                        t.clone().narrow(0, 0, 1).narrow(2, 1, 1).reshape([batch * points, k]),
                        t.narrow(0, 1, 1).narrow(2, 0, 1).reshape([batch * points, k]),
                    ],
                    0,
                ),
            };
            let n = (used.dims()[0] * world.size) as f64;
            let ref_center = world.sum(used.sum_dim(0)).context("summing the teacher's reference logits")?;
            let ref_center = ref_center.div_scalar(n);
            self.ref_center = self.ref_center.clone().mul_scalar(mom) + ref_center.mul_scalar(1.0 - mom);
        }
        Ok(())
    }

    /// The centers as host vectors (checkpoints) and back.
    pub fn centers_to_host(&self) -> (Vec<f32>, Vec<f32>) {
        (crate::model::params::host(self.center.clone()), crate::model::params::host(self.ref_center.clone()))
    }
    pub fn set_centers(&mut self, center: Vec<f32>, ref_center: Vec<f32>, device: &Device) {
        let k = center.len();
        self.center = Tensor::from_data(TensorData::new(center, [1, k]), device);
        self.ref_center = Tensor::from_data(TensorData::new(ref_center, [1, k]), device);
    }
}
