//! Pretraining learns: `configs/palettes-cpu.toml` (2000 DenseDINO steps of a tiny ViT on the `palettes`
//! synthetic set, about four minutes on two cores) lifts the teacher's k-NN accuracy on a held-out set far
//! above a randomly initialised network's. The floor is measured, not assumed: the same k-NN on a random
//! backbone of the same config.
//!
//! Each class of `palettes` is a set of hues under random brightness, contrast and saturation (the
//! loader's jitter ranges), so a random network, whose features carry mean colour and brightness, sits
//! near 59%; what the views of an image share is its hues, which DINO's objective rewards. This is its own
//! test binary so that it has the machine's cores to itself while it runs, and it is ignored by default so
//! that the README's test command stays a few minutes: `.ci/run` runs it as its own step,
//! `cargo test --workspace --release --test learning -- --ignored`.

use std::path::Path;

use trainer::recipe::config::TrainConfig;
use trainer::run::{self, RunOptions, Start};

/// The trainer binary's allocator and its settings ([`run::keep_freed_memory`]): the training steps here
/// would otherwise run under glibc's malloc, which hands every step's activations back to the kernel
/// (measured: twice the wall time of the same run in `trainer train`, half of it system time).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[test]
#[ignore = "four minutes of training: .ci/run runs it with `--test learning -- --ignored`"]
fn a_trained_teacher_scores_far_above_a_random_network_on_the_palettes_set() {
    run::keep_freed_memory();
    let tmp = tempfile::tempdir().unwrap();
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/palettes-cpu.toml");
    let sets = [
        format!("run.out_dir=\"{}\"", tmp.path().join("runs").display()),
        format!("data.synth_dir=\"{}\"", tmp.path().join("palettes").display()),
    ];
    let cfg = TrainConfig::load(Some(&config), &sets).expect("the palettes config");
    let summary = run::train(Start::Fresh(cfg.clone()), &RunOptions { quiet: true, ..Default::default() })
        .expect("the run");
    assert_eq!(summary.steps.len(), 2000, "the run is 250 epochs of 8 steps");
    let checkpoint = summary.last_checkpoint.expect("a final checkpoint");
    let (trained, random) = trainer::eval::synthetic_knn(&cfg, &checkpoint).expect("k-NN");
    eprintln!(
        "k-NN top-1 (k = 20) on the held-out palettes set: trained {:.1}%, random init {:.1}% (chance 25%)",
        100.0 * trained.top1,
        100.0 * random.top1
    );
    assert!(random.top1 < 0.7, "a random network should not solve the set: {:.1}%", 100.0 * random.top1);
    assert!(
        trained.top1 >= random.top1 + 0.12,
        "the trained teacher ({:.1}%) should score at least 12 points above a random network ({:.1}%)",
        100.0 * trained.top1,
        100.0 * random.top1
    );
}
