//! One DenseDINO training step, top to bottom (`train_one_epoch` in `main_dino.py`): schedules → teacher and
//! student forward → loss → backward → per-tensor clip and frozen last layer → AdamW → EMA teacher → centers.

use std::sync::Arc;

use anyhow::{Context, Result, bail};
use burn::tensor::{Device, Tensor};
use common::Batch;
use common::seed::{self, Purpose};
use serde::{Deserialize, Serialize};

use crate::model::head::HeadConfig;
use crate::model::params::Params;
use crate::model::params::host;
use crate::model::vit::{self, DropKey, Precision, VitConfig};
use crate::model::{DenseDino, Logits};
use crate::parallel::World;
use crate::recipe::config::TrainConfig;
use crate::recipe::loss::{DenseDinoLoss, Layout, LossConfig, LossOutput};
use crate::recipe::optim::{self, AdamW, OptimConfig, StepOptions};
use crate::recipe::scaler::GradScaler;
use crate::recipe::schedule::Schedules;

/// What one step reports (host numbers).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct StepMetrics {
    pub it: usize,
    pub epoch: usize,
    pub loss: f64,
    pub cls_loss: Option<f64>,
    pub ref_loss: Option<f64>,
    pub lr: f64,
    pub weight_decay: f64,
    pub momentum: f64,
    pub teacher_temp: f64,
    /// Mean entropy of the teacher's CLS targets per sample (ln K: uniform collapse; 0: one-hot).
    pub teacher_entropy: f64,
    /// Entropy of the batch-mean teacher target (near 0: every sample on one prototype, the other collapse).
    /// Data-parallel: each rank's batch, averaged over the ranks, like every number here.
    pub teacher_batch_entropy: f64,
    /// fp16: the loss scale this step's backward ran with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_scale: Option<f64>,
    /// fp16: the steps skipped for a non-finite gradient since the run began, this one included.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skipped_steps: Option<u64>,
}

/// One student parameter's gradient from each loss, as it enters the step's total (host values).
pub struct LossGradients {
    pub name: String,
    pub cls: Vec<f32>,
    pub refs: Vec<f32>,
}

/// Everything a step reads and writes.
pub struct Trainer {
    pub device: Device,
    pub seed: u64,
    pub vit: VitConfig,
    pub head: HeadConfig,
    pub optim_cfg: OptimConfig,
    pub student: DenseDino,
    pub teacher: DenseDino,
    pub loss: DenseDinoLoss,
    pub optim: AdamW,
    pub schedules: Schedules,
    /// The next global iteration.
    pub it: usize,
    /// The job this trainer is one rank of: its batches are its slice of the global batch.
    pub world: Arc<World>,
    /// fp16's loss scale (`None` in f32 and bf16).
    pub scaler: Option<GradScaler>,
}

/// How far the teacher has come from its random initialisation.
#[derive(Clone, Copy, Debug)]
pub struct TeacherMovement {
    /// The share of the initial weights still in the teacher's EMA: the product of the momenta of the
    /// steps run (1 at step 0; with momentum 0.996 it takes about 1,150 steps to fall below 1%).
    pub init_share: f64,
    /// `‖θ − θ₀‖ / ‖θ₀‖` over the teacher's backbone.
    pub distance: f64,
}

impl Trainer {
    /// The teacher's [`TeacherMovement`] after the steps run so far (its initialisation is drawn again
    /// from the seed).
    pub fn teacher_movement(&mut self) -> TeacherMovement {
        let init_share = (0..self.it).map(|i| self.schedules.momentum.at(i)).product();
        let with_ref_head = self.teacher.ref_head.is_some();
        let mut init = initial_teacher(&self.vit, &self.head, with_ref_head, self.seed, &self.device);
        let backbone = |m: &mut DenseDino| crate::model::params::to_host(&mut m.backbone);
        let (now, then) = (backbone(&mut self.teacher), backbone(&mut init));
        let (mut diff, mut norm) = (0.0f64, 0.0f64);
        for ((_, _, a), (_, _, b)) in now.iter().zip(&then) {
            for (x, y) in a.iter().zip(b) {
                diff += ((x - y) as f64).powi(2);
                norm += (*y as f64).powi(2);
            }
        }
        TeacherMovement { init_share, distance: (diff / norm.max(f64::MIN_POSITIVE)).sqrt() }
    }

    /// `device`: the plain device; the student lives on its autodiff twin. Student and teacher start equal.
    pub fn new(
        vit_cfg: &VitConfig,
        head_cfg: &HeadConfig,
        loss_cfg: &LossConfig,
        optim_cfg: &OptimConfig,
        schedules: Schedules,
        seed: u64,
        device: &Device,
    ) -> Self {
        let with_ref_head = loss_cfg.use_ref_loss && !head_cfg.shared_ref_head;
        let mut rng = seed::rng(seed, Purpose::Model, &[0]);
        let student = DenseDino::new(vit_cfg, head_cfg, with_ref_head, &mut rng, &device.clone().autodiff());
        let teacher = initial_teacher(vit_cfg, head_cfg, with_ref_head, seed, device);
        Self {
            device: device.clone(),
            seed,
            vit: vit_cfg.clone(),
            head: head_cfg.clone(),
            optim_cfg: optim_cfg.clone(),
            student,
            teacher,
            loss: DenseDinoLoss::new(loss_cfg, head_cfg.out_dim, device),
            optim: AdamW {
                beta1: optim_cfg.betas.0,
                beta2: optim_cfg.betas.1,
                eps: optim_cfg.eps,
                ..Default::default()
            },
            schedules,
            it: 0,
            world: Arc::new(World::single()),
            scaler: None,
        }
    }

    /// The trainer `cfg` describes on the plain device `device` (student and teacher equal, fresh
    /// optimiser and centers), one rank of `world`: its batches are its slice of the global batch.
    pub fn from_config(
        cfg: &TrainConfig,
        schedules: Schedules,
        device: &Device,
        world: &Arc<World>,
    ) -> Result<Self> {
        let p = cfg.run.precision;
        if p != Precision::F32 && matches!(device.as_dispatch(), burn::backend::DispatchDevice::Flex(_)) {
            bail!(
                "run.precision = \"{p}\" needs a LibTorch device (tch-cpu or cuda:N): the flex backend computes \
                 {p} through f32 and would be slower than f32"
            );
        }
        let mut t = Self::new(&cfg.model, &cfg.head, &cfg.loss, &cfg.optim, schedules, cfg.run.seed, device);
        t.student.set_precision(p);
        t.teacher.set_precision(p);
        t.scaler = (p == Precision::Fp16).then(|| GradScaler::new(&cfg.run.grad_scaler));
        t.world = world.clone();
        Ok(t)
    }

    /// The forward half of a step on `batch`: the teacher's logits (the centers' update reads them) and
    /// the losses on the student's graph, at teacher temperature `temp`.
    fn forward(&self, batch: &Batch, temp: f64) -> (LossOutput, Logits, Layout) {
        let (b, v, m) = (batch.batch_size, batch.num_views(), batch.num_points);
        let refs_on = self.loss.cfg.use_ref_loss;
        let layout = Layout { batch: b, views: v, points: m };
        // u8 → normalised f32 once on the device; the student reads the same tensors as autodiff constants.
        let views: Vec<Tensor<4>> = batch
            .views
            .iter()
            .map(|view| vit::normalize_pixels(&view.data, b, view.size, &self.device))
            .collect();
        let teacher_out =
            self.teacher.forward(&views[..2], refs_on.then_some(&batch.teacher_points[..]), None);
        let student_views: Vec<Tensor<4>> = views.into_iter().map(Tensor::from_inner).collect();
        let drop = DropKey { seed: self.seed, it: self.it as u64, first: (self.world.rank * b) as u64 };
        let student_out =
            self.student.forward(&student_views, refs_on.then_some(&batch.student_points[..]), Some(drop));
        let out = self.loss.forward(
            teacher_out.cls.clone(),
            student_out.cls,
            teacher_out.refs.clone(),
            student_out.refs,
            layout,
            temp,
        );
        (out, teacher_out, layout)
    }

    /// Each loss's own gradient on `batch`, as it enters the step's total (the CLS loss times `alpha`, the
    /// reference loss times `1 − alpha`), per student parameter, on the host. Nothing is updated. Two
    /// forwards, one per loss: a backward pass consumes its graph. `None` when the run trains only one of
    /// the two losses.
    pub fn loss_gradients(&mut self, batch: &Batch) -> Option<Vec<LossGradients>> {
        let temp = self.loss.cfg.teacher_temp_at(batch.epoch as usize);
        let alpha = self.loss.cfg.alpha;
        // fp16: through the loss scale as the step, or the small gradients would flush to zero.
        let scale = self.scaler.as_ref().map(|s| (s.scale, s.inv_scale()));
        let mut grads_of = |cls: bool| {
            let (out, _, _) = self.forward(batch, temp);
            let loss = if cls { out.cls?.mul_scalar(alpha) } else { out.refs?.mul_scalar(1.0 - alpha) };
            let grads = match scale {
                Some((s, _)) => loss.mul_scalar(s).backward(),
                None => loss.backward(),
            };
            let mut by_name = std::collections::HashMap::new();
            self.student.visit("", &mut |name, p| {
                if let Some(g) = p.grad_flat(&grads) {
                    let mut g = host(optim::plain(g));
                    if let Some((_, inv)) = scale {
                        g.iter_mut().for_each(|v| *v *= inv);
                    }
                    by_name.insert(name.to_string(), g);
                }
            });
            Some(by_name)
        };
        let (mut cls, mut refs) = (grads_of(true)?, grads_of(false)?);
        // In the model's order; a parameter one loss never reaches (the other loss's head) has a zero
        // gradient from it.
        let mut out = Vec::new();
        self.student.visit("", &mut |name, p| {
            let zeros = || vec![0.0; p.dims().iter().product()];
            let (c, r) = (cls.remove(name), refs.remove(name));
            if c.is_some() || r.is_some() {
                out.push(LossGradients {
                    name: name.to_string(),
                    cls: c.unwrap_or_else(zeros),
                    refs: r.unwrap_or_else(zeros),
                });
            }
        });
        Some(out)
    }

    /// One optimisation step on `batch`. A non-finite loss is the error [`NonFiniteLoss`]; nothing was
    /// updated then (the official code exits at that point). Any other error is a collective over the
    /// ranks failing, after which the job cannot go on. With fp16's scaler, a step whose scaled
    /// gradients overflowed leaves the student and AdamW as they were and still moves the teacher, the
    /// centers and the schedules' index, as the official loop does around `scaler.step`.
    pub fn step(&mut self, batch: &Batch) -> Result<StepMetrics> {
        let it = self.it;
        // The data's epoch, as the official loop variable (an epoch may run short of iters_per_epoch when
        // bad images were skipped; the schedules stay indexed by the global iteration).
        let epoch = batch.epoch as usize;
        let lr = self.schedules.lr.at(it);
        let wd = self.schedules.wd.at(it);
        let momentum = self.schedules.momentum.at(it);
        let temp = self.loss.cfg.teacher_temp_at(epoch);
        let (out, teacher_out, layout) = self.forward(batch, temp);
        let reported = reported_across(&self.world, &out).with_context(|| format!("step {it}"))?;
        let mut metrics = StepMetrics {
            it,
            epoch,
            lr,
            weight_decay: wd,
            momentum,
            teacher_temp: temp,
            loss_scale: self.scaler.as_ref().map(|s| s.scale as f64),
            ..reported
        };
        if !metrics.loss.is_finite() {
            return Err(NonFiniteLoss { loss: metrics.loss, it, epoch }.into());
        }

        // fp16: the backward runs on the loss times the scale (a power of two: exact in f32).
        let grads = match &self.scaler {
            Some(s) => out.total.mul_scalar(s.scale).backward(),
            None => out.total.backward(),
        };
        let opts = StepOptions {
            lr,
            weight_decay: wd,
            clip_grad: self.optim_cfg.clip_grad,
            freeze_last_layer: epoch < self.optim_cfg.freeze_last_layer,
            unscale: self.scaler.as_ref().map(GradScaler::inv_scale),
        };
        let stepped = self
            .optim
            .step_across(&self.world, &mut self.student, &grads, opts)
            .with_context(|| format!("step {it}"))?;
        if let Some(s) = &mut self.scaler {
            s.update(!stepped);
            metrics.skipped_steps = Some(s.skipped);
        }
        optim::ema_update(&mut self.teacher, &mut self.student, momentum);
        self.loss
            .update_centers_across(&self.world, teacher_out.cls, teacher_out.refs, layout)
            .with_context(|| format!("step {it}"))?;
        self.it += 1;
        Ok(metrics)
    }
}

/// A step whose loss is not finite: nothing was updated. What [`Trainer::step`] returns then, for the
/// run to say where to resume from.
#[derive(Clone, Debug)]
pub struct NonFiniteLoss {
    pub loss: f64,
    pub it: usize,
    pub epoch: usize,
}

impl std::fmt::Display for NonFiniteLoss {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "non-finite loss ({}) at step {} (epoch {})", self.loss, self.it, self.epoch)
    }
}

impl std::error::Error for NonFiniteLoss {}

/// The numbers a step reads from its device tensors (the losses and the teacher's entropies; the rest
/// of [`StepMetrics`] at its default), the mean over the ranks (the same on every rank, so a non-finite
/// loss stops them all).
fn reported_across(world: &World, out: &LossOutput) -> Result<StepMetrics> {
    // One host read for every number: each read is a device sync. Read back in the order pushed.
    let mut scalars = vec![optim::plain(out.total.clone())];
    scalars.extend(out.cls.clone().map(optim::plain));
    scalars.extend(out.refs.clone().map(optim::plain));
    scalars.extend(target_entropies(out.cls_targets.clone()));
    let mut sums = host(Tensor::cat(scalars, 0));
    world.all_reduce_sum(&mut sums).context("averaging the step's losses")?;
    let mut means = sums.into_iter().map(|x| f64::from(x) / world.size as f64);
    let mut next = || means.next().expect("one number per tensor pushed");
    Ok(StepMetrics {
        loss: next(),
        cls_loss: out.cls.is_some().then(&mut next),
        ref_loss: out.refs.is_some().then(&mut next),
        teacher_entropy: next(),
        teacher_batch_entropy: next(),
        ..Default::default()
    })
}

/// The teacher as a run starts: the student's initial draws (the same seed) on the plain device, without
/// stochastic depth; an exact copy of the student, as the official `teacher.load_state_dict(student)`.
fn initial_teacher(
    vit_cfg: &VitConfig,
    head_cfg: &HeadConfig,
    with_ref_head: bool,
    seed: u64,
    device: &Device,
) -> DenseDino {
    let mut teacher_cfg = vit_cfg.clone();
    teacher_cfg.drop_path_rate = 0.0;
    let mut rng = seed::rng(seed, Purpose::Model, &[0]);
    DenseDino::new(&teacher_cfg, head_cfg, with_ref_head, &mut rng, device)
}

/// Mean per-sample entropy of the targets `p` `[n, K]` and the entropy of their batch mean, in nats, as two
/// `[1]` tensors (left on the device: the caller reads all step numbers at once).
pub fn target_entropies(p: Tensor<2>) -> [Tensor<1>; 2] {
    let plogp = |p: Tensor<2>| (p.clone() * p.clamp_min(1e-30).log()).sum_dim(1).neg(); // [n, 1]
    [plogp(p.clone()).mean(), plogp(p.mean_dim(0)).mean()]
}
