//! Data parallelism over Open MPI (the `mpi` feature), against one process: 2 ranks, each fed its half of
//! a fixed global batch of 2B samples, must hold after 3 steps the student, teacher, centers and AdamW
//! moments that 1 process fed all 2B samples holds, stochastic depth on (drawn per global sample).
//!
//! The ranks then check [`World::check_same`]: equal digests pass, a differing one is named on every rank.
//!
//! The test runs itself under `mpirun -n 2` (with `DP_TEST_OUT` set, the same test function is a rank);
//! the one-process reference runs in the test's own process. Both make the same batches with the loader.
#![cfg(feature = "mpi")]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use burn::tensor::Device;
use trainer::parallel::World;
use trainer::recipe::config::TrainConfig;
use trainer::recipe::schedule::Schedules;
use trainer::recipe::step::Trainer;
use trainer::run::checkpoint::{self, Meta};
use trainer::run::data;

/// Per-rank batch B: the global batch is 2B.
const B: usize = 4;
const STEPS: usize = 3;
const TEST: &str = "two_ranks_on_half_batches_match_one_process_on_the_whole";

fn config(dir: &Path) -> TrainConfig {
    let sets = [
        format!("data.synth_dir={}", dir.join("synth").display()),
        "data.synth_count=64".into(),
        format!("run.batch_size={}", 2 * B),
        // Stochastic depth on, and the last layer trained from the first step: every path of the step runs.
        "model.drop_path_rate=0.3".into(),
        "optim.freeze_last_layer=0".into(),
        "optim.warmup_epochs=0".into(),
        "optim.lr=0.002".into(),
    ];
    TrainConfig::load(None, &sets).unwrap()
}

/// The first `STEPS` global batches of 2B samples, as the loader makes them (one process, seeded).
fn global_batches(cfg: &TrainConfig) -> Vec<common::Batch> {
    let shards = data::shards(cfg, true).unwrap();
    let rt = data::runtime().unwrap();
    let loader =
        rt.block_on(async { loader::start(data::loader_options(cfg, &shards, Default::default())) }).unwrap();
    let batches = (0..STEPS).map(|_| rt.block_on(loader.batches.recv()).unwrap()).collect();
    rt.block_on(loader.shutdown());
    batches
}

/// Trains `STEPS` steps as rank `world.rank` of `world.size` (each rank its slice of every global batch)
/// and saves the state to `out/rank{rank}`.
fn train(cfg: &TrainConfig, world: Arc<World>, out: &Path) {
    let batches = global_batches(cfg);
    let schedules = Schedules::new(&cfg.optim, cfg.run.epochs, 10, 2 * B);
    let mut trainer = Trainer::from_config(cfg, schedules, &Device::flex(), &world).unwrap();
    let per = 2 * B / world.size;
    for batch in &batches {
        let mine = batch.slice(world.rank * per..(world.rank + 1) * per);
        trainer.step(&mine).unwrap_or_else(|e| panic!("{e:#}"));
    }
    let meta = Meta {
        it: STEPS,
        cursor: Default::default(),
        config: cfg.clone(),
        world_size: world.size,
        data: None,
    };
    checkpoint::save(&out.join(format!("rank{}", world.rank)), &mut trainer, &meta, 1).unwrap();
}

fn load(dir: &Path) -> trainer::model::params::Named {
    let (_, file) = checkpoint::list(dir).pop().unwrap();
    checkpoint::tensors(&std::fs::read(file).unwrap()).unwrap()
}

#[test]
fn two_ranks_on_half_batches_match_one_process_on_the_whole() {
    if let Some(out) = std::env::var_os("DP_TEST_OUT") {
        // A rank under mpirun.
        let world = Arc::new(World::from_env().unwrap());
        assert_eq!(world.size, 2, "run by the test under mpirun -n 2");
        let out = PathBuf::from(out);
        train(&config(&out), world.clone(), &out);
        // The ranks' consistency check: equal digests pass, a differing one stops every rank, naming it.
        world.check_same("a digest", b"equal on every rank").unwrap();
        let e = world.check_same("a digest", &[world.rank as u8]).unwrap_err().to_string();
        assert!(e.contains("rank(s) 1 hold another than rank 0"), "{e}");
        return;
    }
    let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let dir = tmp.path();
    let one = dir.join("one");
    let cfg = config(dir);
    // The synthetic set once, before the ranks read it.
    data::shards(&cfg, true).unwrap();
    train(&cfg, Arc::new(World::single()), &one);

    let mut mpirun = std::process::Command::new("mpirun");
    mpirun.args(["-n", "2", "--bind-to", "none"]);
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        mpirun.arg("--allow-run-as-root");
    }
    let status = mpirun
        .arg(std::env::current_exe().unwrap())
        .args(["--exact", TEST, "--nocapture", "--test-threads=1"])
        .env("DP_TEST_OUT", dir)
        .env("RAYON_NUM_THREADS", "1")
        .status()
        .expect("mpirun (Open MPI's openmpi-bin) runs the ranks");
    assert!(status.success(), "the ranks failed: {status}");

    let want = load(&one.join("rank0"));
    let ranks = [load(&dir.join("rank0")), load(&dir.join("rank1"))];
    // The ranks hold one state, to the bit: every rank applies the same averaged gradients.
    assert!(ranks[0] == ranks[1], "rank 0 and rank 1 differ after {STEPS} steps");
    // Weights and centers: the largest absolute difference. AdamW's moments (m ~ g, v ~ g², tiny and
    // spanning decades): the largest difference relative to the tensor's largest magnitude.
    let mut worst: Vec<(f32, String)> = Vec::new();
    for (name, (dims, values)) in &want {
        let (got_dims, got) = &ranks[0][name];
        assert_eq!(got_dims, dims, "{name}");
        let diff = values.iter().zip(got).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        let scale = values.iter().map(|x| x.abs()).fold(0.0f32, f32::max);
        worst.push((
            if name.starts_with("optim.") { diff / scale.max(f32::MIN_POSITIVE) } else { diff },
            name.clone(),
        ));
    }
    worst.sort_by(|a, b| b.0.total_cmp(&a.0));
    let (moments, state): (Vec<_>, Vec<_>) = worst.iter().partition(|(_, n)| n.starts_with("optim."));
    eprintln!("{} tensors of student, teacher and centers; the 4 furthest apart (max |Δ|):", state.len());
    for (d, n) in state.iter().take(4) {
        eprintln!("  {n}: {d:.2e}");
    }
    eprintln!("{} AdamW moment tensors; the 4 furthest apart (max |Δ| / max |x|):", moments.len());
    for (d, n) in moments.iter().take(4) {
        eprintln!("  {n}: {d:.2e}");
    }
    for (d, n) in &state {
        assert!(*d <= 1e-5, "{n}: 2 ranks and 1 process differ by {d:.2e} (tolerance 1e-5)");
    }
    for (d, n) in &moments {
        assert!(*d <= 1e-4, "{n}: 2 ranks and 1 process differ by {d:.2e} of its scale (tolerance 1e-4)");
    }
    // The step moved the weights (a test of nothing otherwise).
    let init = {
        let schedules = Schedules::new(&cfg.optim, cfg.run.epochs, 10, 2 * B);
        let mut t = Trainer::from_config(&cfg, schedules, &Device::flex(), &Default::default()).unwrap();
        trainer::model::params::to_host(&mut t.student)
    };
    let (name, _, v0) = &init[init.len() / 2];
    let v3 = &want[&format!("student.{name}")].1;
    let step = v0.iter().zip(v3).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    assert!(step > 1e-4, "student.{name} moved only {step:.2e} in {STEPS} steps");
}
