//! fp16's loss scaler (`trainer::recipe::scaler`) in the step, on flex in f32: scaling by a power of two
//! and back is exact in f32, so the scaled step must equal the plain one bit for bit, and a scale near
//! f32's top makes the scaled gradients overflow, which must skip the step as PyTorch's `GradScaler`
//! does (student and AdamW untouched; teacher EMA, centers and the step index still moving). The fp16
//! numbers themselves are checked against the official loop in `official_parity.rs` (LibTorch).

use std::collections::BTreeMap;

use burn::tensor::Device;
use common::Batch;
use trainer::model::params;
use trainer::recipe::config::TrainConfig;
use trainer::recipe::scaler::{GradScaler, GradScalerConfig};
use trainer::recipe::schedule::Schedules;
use trainer::recipe::step::{StepMetrics, Trainer};
use trainer::run::checkpoint::{self, Meta};

const SIZES: [usize; 4] = [32, 32, 16, 16];

fn config() -> TrainConfig {
    let sets: Vec<String> = [
        "model.embed_dim=48",
        "model.depth=2",
        "model.num_heads=2",
        "model.img_size=32",
        "views.global_size=32",
        "views.local_size=16",
        "head.out_dim=256",
        "head.hidden_dim=64",
        "head.bottleneck_dim=32",
        "run.batch_size=4",
        "run.epochs=2",
        "optim.freeze_last_layer=0",
        "optim.warmup_epochs=0",
        "optim.lr=0.05",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    TrainConfig::load(None, &sets).unwrap()
}

/// A flex trainer of [`config`] with `scaler` (`None`: plain f32 steps).
fn trainer(scaler: Option<GradScalerConfig>) -> Trainer {
    let cfg = config();
    let schedules = Schedules::new(&cfg.optim, cfg.run.epochs, 20, cfg.run.batch_size);
    let mut t = Trainer::from_config(&cfg, schedules, &Device::default(), &Default::default()).unwrap();
    t.scaler = scaler.as_ref().map(GradScaler::new);
    t
}

fn batch(i: u64) -> Batch {
    trainer::run::bench::random_batch(4, &SIZES, 3, 100 + i)
}

/// Everything a step may change, on the host: student, teacher, AdamW (moments and counts), centers.
#[derive(Clone, PartialEq)]
struct State {
    student: Vec<(String, Vec<usize>, Vec<f32>)>,
    teacher: Vec<(String, Vec<usize>, Vec<f32>)>,
    adam: BTreeMap<String, (Vec<f32>, Vec<f32>, u64)>,
    centers: (Vec<f32>, Vec<f32>),
}

fn state(t: &mut Trainer) -> State {
    State {
        student: params::to_host(&mut t.student),
        teacher: params::to_host(&mut t.teacher),
        adam: t
            .optim
            .state
            .iter()
            .map(|(n, s)| (n.clone(), (params::host(s.m.clone()), params::host(s.v.clone()), s.step)))
            .collect(),
        centers: t.loss.centers_to_host(),
    }
}

fn step(t: &mut Trainer, i: u64) -> StepMetrics {
    t.step(&batch(i)).unwrap_or_else(|e| panic!("step {i}: {e:#}"))
}

#[test]
fn a_scaled_step_equals_the_plain_step_bit_for_bit() {
    // 2^12, growing after two clean steps: the scale runs 4096, 4096, 8192, 8192, 16384.
    let cfg = GradScalerConfig { init_scale: 4096.0, growth_interval: 2, ..Default::default() };
    let (mut plain, mut scaled) = (trainer(None), trainer(Some(cfg)));
    let mut scales = Vec::new();
    for i in 0..5 {
        let (a, b) = (step(&mut plain, i), step(&mut scaled, i));
        assert_eq!(a.loss, b.loss, "step {i}");
        assert_eq!((a.loss_scale, a.skipped_steps), (None, None));
        assert_eq!(b.skipped_steps, Some(0));
        scales.push(b.loss_scale.unwrap());
    }
    assert_eq!(scales, [4096.0, 4096.0, 8192.0, 8192.0, 16384.0]);
    let (a, b) = (state(&mut plain), state(&mut scaled));
    assert!(a.student == b.student, "the students differ");
    assert!(a.teacher == b.teacher && a.adam == b.adam && a.centers == b.centers, "the states differ");
    assert!(a.adam.values().all(|(_, _, n)| *n == 5), "every tensor stepped five times");
}

/// The EMA of a skipped step: `t ← m t + (1 − m) s` with the student as it was.
fn ema_of(before: &State, momentum: f64) -> Vec<Vec<f32>> {
    before
        .teacher
        .iter()
        .zip(&before.student)
        .map(|((_, _, t), (_, _, s))| {
            t.iter()
                .zip(s)
                .map(|(&t, &s)| (momentum * t as f64 + (1.0 - momentum) * s as f64) as f32)
                .collect()
        })
        .collect()
}

#[test]
fn an_overflowing_step_is_skipped_as_gradscaler_skips_it() {
    // 2^127: every gradient above 2 (in the backward's intermediates too) overflows f32 once scaled, so the
    // first steps overflow and halve the scale until it fits; then it grows 16-fold after three clean
    // steps, which overflows again.
    let cfg = GradScalerConfig {
        init_scale: 2f64.powi(127),
        growth_interval: 3,
        growth_factor: 16.0,
        ..Default::default()
    };
    let mut t = trainer(Some(cfg));
    let (mut skips, mut clean, mut tracker) = (0u64, 0, 0u32);
    let mut scale = 2f64.powi(127);
    let mut first_update = None;
    for i in 0..24 {
        let before = state(&mut t);
        let momentum = t.schedules.momentum.at(t.it);
        let m = step(&mut t, i);
        assert_eq!(m.loss_scale, Some(scale), "step {i}: the scale the backward ran with");
        let after = state(&mut t);
        let skipped = m.skipped_steps.unwrap() > skips;
        if skipped {
            skips += 1;
            assert!(after.student == before.student, "step {i}: a skipped step moved the student");
            assert!(after.adam == before.adam, "step {i}: a skipped step changed AdamW's state");
            // The teacher still follows the (unchanged) student, and the centers still move.
            for ((_, _, got), want) in after.teacher.iter().zip(ema_of(&before, momentum)) {
                let worst = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                assert!(worst < 1e-6, "step {i}: the teacher's EMA is off by {worst}");
            }
            assert!(after.centers != before.centers, "step {i}: the centers did not move");
            (scale, tracker) = (scale * 0.5, 0);
        } else {
            clean += 1;
            assert!(after.student != before.student, "step {i}: a clean step left the student");
            if first_update.is_none() {
                first_update = Some(i);
                // AdamW's counts start at the first step that updated, as in PyTorch.
                assert!(after.adam.values().all(|(_, _, n)| *n == 1), "step {i}: first AdamW counts");
            }
            tracker += 1;
            if tracker == 3 {
                (scale, tracker) = (scale * 16.0, 0);
            }
        }
        assert_eq!(t.it as u64, i + 1, "the step index advances either way");
        assert_eq!(t.scaler.as_ref().unwrap().scale as f64, scale, "step {i}: the scale after it");
    }
    println!("24 steps: {skips} skipped, {clean} clean; the scale ended at 2^{}", scale.log2());
    assert!(skips >= 2 && clean >= 4, "{skips} skipped, {clean} clean: the run must show both");
    // After growing back, the scale overflowed again at least once: skips after the first clean step.
    assert!(skips > first_update.unwrap(), "no skip after the first clean step: growth never overflowed");
    assert_eq!(t.optim.state.values().next().unwrap().step, clean, "AdamW counted the clean steps only");
}

#[test]
fn a_checkpoint_keeps_the_scalers_state() {
    let cfg = GradScalerConfig { init_scale: 2f64.powi(127), growth_interval: 3, ..Default::default() };
    let mut t = trainer(Some(cfg.clone()));
    for i in 0..9 {
        step(&mut t, i);
    }
    let saved = t.scaler.clone().unwrap();
    assert!(saved.skipped > 0 && saved.scale < 2f32.powi(127));
    let dir = tempfile::tempdir().unwrap();
    let meta = Meta { it: t.it, cursor: Default::default(), config: config(), world_size: 1, data: None };
    let path = checkpoint::save(dir.path(), &mut t, &meta, 3).unwrap();
    // A fresh trainer's scaler starts at 2^127: the stored state must replace it.
    let mut resumed = trainer(Some(cfg));
    checkpoint::restore(&mut resumed, &std::fs::read(path).unwrap()).unwrap();
    assert_eq!(resumed.scaler.as_ref(), Some(&saved));
    for i in 9..15 {
        let (a, b) = (step(&mut t, i), step(&mut resumed, i));
        assert_eq!((a.loss, a.loss_scale, a.skipped_steps), (b.loss, b.loss_scale, b.skipped_steps));
    }
    assert!(state(&mut t) == state(&mut resumed), "the resumed run parted from the uninterrupted one");
}
