//! The program end to end on the demo configuration (shrunk to seconds): a stop-and-resume gives the same
//! per-step losses as an uninterrupted run, bit for bit on the CPU backend, and a crash while writing a
//! checkpoint leaves the previous one loadable.

use std::path::Path;

mod util;

use trainer::recipe::config::TrainConfig;
use trainer::run::checkpoint;
use trainer::run::metrics::{self, Record};
use trainer::run::{self, RunOptions, Start};

/// [`util::tiny_sets`] as a config, for `max_steps` steps.
fn demo(dir: &Path, name: &str, max_steps: usize) -> TrainConfig {
    let mut sets = util::tiny_sets(dir, name);
    sets.push(format!("run.max_steps={max_steps}"));
    TrainConfig::load(None, &sets).expect("demo config")
}

fn losses(run_dir: &Path) -> Vec<(usize, f64, Option<f64>, Option<f64>)> {
    metrics::read(&run_dir.join("metrics.jsonl"))
        .unwrap()
        .into_iter()
        .filter_map(|r| match r {
            Record::Step { m, .. } => Some((m.it, m.loss, m.cls_loss, m.ref_loss)),
            _ => None,
        })
        .collect()
}

fn quiet() -> RunOptions {
    RunOptions { quiet: true, ..Default::default() }
}

fn fresh(cfg: TrainConfig) -> Result<run::RunSummary, anyhow::Error> {
    run::train(Start::Fresh(cfg), &quiet())
}

#[test]
fn resume_matches_an_uninterrupted_run_exactly_and_survives_a_crash_mid_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    // 40 images at batch 8: 5 steps per epoch; 8 steps cross an epoch boundary.
    let full = fresh(demo(tmp.path(), "full", 8)).expect("uninterrupted run");
    let want = losses(&full.run_dir);
    assert_eq!(want.len(), 8);
    assert!(full.run_dir.join("loss.png").exists(), "the run draws its plots");

    // Stop after 3 steps (checkpoints at 2 and 3, the run end), resume to 6 (checkpoints at 4 and 5, the
    // epoch end) with the one at 6
    // failing half way (as a full disk would), then resume again from the last good one to 8.
    let part = fresh(demo(tmp.path(), "split", 3)).expect("first part");
    let dir = part.run_dir.clone();
    let resume = |steps: usize| Start::Resume {
        from: dir.clone(),
        sets: vec![format!("run.max_steps={steps}")],
        branch: None,
    };
    checkpoint::inject_failure(&dir.join("checkpoints"), 6);
    let err = run::train(resume(6), &quiet()).expect_err("injected failure");
    assert!(format!("{err:#}").contains("half way"), "{err:#}");
    let ckpts = checkpoint::list(&dir.join("checkpoints"));
    assert_eq!(
        ckpts.last().map(|c| c.0),
        Some(5),
        "the last complete checkpoint is the epoch end at 5: {ckpts:?}"
    );
    assert!(
        !dir.join("checkpoints").join("ckpt-00000006.safetensors.partial").exists(),
        "a failed write removes its .partial (a full disk would otherwise stay full)"
    );
    let (path, bytes) = checkpoint::latest(&dir).expect("the previous checkpoint loads");
    assert_eq!(checkpoint::meta(&bytes).unwrap().it, 5, "{}", path.display());

    run::train(resume(8), &quiet()).expect("resumed run");
    let got = losses(&dir);
    assert_eq!(got.len(), 8, "one record per step after the resumes: {got:?}");
    for (a, b) in want.iter().zip(&got) {
        assert_eq!(a, b, "step {}: uninterrupted {a:?} vs resumed {b:?}", a.0);
    }
}

#[test]
fn resume_may_not_change_the_method() {
    let cfg = demo(Path::new("/tmp"), "x", 1);
    let err = cfg.with_run_overrides(&["loss.alpha=0.1".into()]).expect_err("only run.* may change");
    assert!(format!("{err:#}").contains("loss.alpha"));
    assert_eq!(cfg.with_run_overrides(&["run.max_steps=9".into()]).unwrap().run.max_steps, 9);
}

#[test]
fn a_non_finite_loss_stops_the_run_and_keeps_the_last_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    // A learning rate of 1e30 (valid, absurd) is 0 in the first step of its warmup, then blows the weights
    // past f32's range: a NaN loss a few steps in, after checkpoints (every 2 steps).
    let mut cfg = demo(tmp.path(), "nan", 8);
    cfg.optim.lr = 1e30;
    let err = fresh(cfg.clone()).expect_err("NaN must stop the run");
    let msg = format!("{err:#}");
    let step: usize = msg
        .split("at step ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("the message names the step: {msg}"));
    let dir = cfg.run_dir();
    let ckpts = checkpoint::list(&dir.join("checkpoints"));
    let (last_it, last_good) = ckpts.last().cloned().expect("checkpoints before the NaN");
    assert!(
        step >= 2 && last_it == step,
        "the last checkpoint holds the state the NaN step began from: {ckpts:?} {msg}"
    );
    assert!(msg.contains("non-finite loss"), "{msg}");
    assert!(
        msg.contains(&last_good.display().to_string()),
        "the message names the last good checkpoint: {msg}"
    );
    let (path, bytes) = checkpoint::latest(&dir).expect("the last good checkpoint loads");
    assert_eq!((path, checkpoint::meta(&bytes).unwrap().it), (last_good, step));
    // Resuming the same config meets the same NaN at the same step, naming the same checkpoint.
    let again = run::train(Start::Resume { from: dir.clone(), sets: vec![], branch: None }, &quiet())
        .expect_err("same config");
    assert!(format!("{again:#}").contains(&format!("at step {step} ")), "{again:#}");
}

/// The summary's teacher movement against independent sources: the momenta the steps logged, and a
/// teacher that cannot move (momentum 1), whose re-drawn initialisation must be exactly its start.
#[test]
fn the_summary_says_how_far_the_teacher_moved_from_its_initialisation() {
    let tmp = tempfile::tempdir().unwrap();
    let s = fresh(demo(tmp.path(), "moved", 6)).unwrap();
    let product: f64 = s.steps.iter().map(|m| m.momentum).product();
    assert_eq!(s.teacher.init_share, product);
    assert!(s.teacher.init_share < 1.0 && s.teacher.distance > 0.0, "{:?}", s.teacher);

    let mut cfg = demo(tmp.path(), "frozen", 6);
    cfg.optim.momentum_teacher = 1.0;
    let s = fresh(cfg).unwrap();
    assert_eq!((s.teacher.init_share, s.teacher.distance), (1.0, 0.0));
}

/// `--backbone student` evaluates the checkpoint's student, the default its teacher: each is exactly the
/// checkpoint's tensors of that network.
#[test]
fn eval_loads_the_teacher_by_default_and_the_student_on_request() {
    use trainer::eval::{Side, backbone};
    let tmp = tempfile::tempdir().unwrap();
    let s = fresh(demo(tmp.path(), "sides", 4)).unwrap();
    let ckpt = s.last_checkpoint.unwrap();
    let stored = checkpoint::tensors(&std::fs::read(&ckpt).unwrap()).unwrap();
    let dev = burn::tensor::Device::flex();
    let mut keys = vec![];
    for (side, prefix) in [(Side::Teacher, "teacher.backbone."), (Side::Student, "student.backbone.")] {
        let (mut vit, _, key) = backbone(Some(&ckpt), None, side, &dev).unwrap();
        let loaded = trainer::model::params::to_host(&mut vit);
        assert!(!loaded.is_empty());
        for (name, dims, values) in loaded {
            let (want_dims, want) = &stored[&format!("{prefix}{name}")];
            assert_eq!((&dims, &values), (want_dims, want), "{side:?} {name}");
        }
        keys.push(key);
    }
    assert_ne!(keys[0], keys[1], "the feature cache tells the two apart");
    assert_ne!(
        stored["teacher.backbone.pos_embed"].1, stored["student.backbone.pos_embed"].1,
        "they differ after 4 steps"
    );
}
