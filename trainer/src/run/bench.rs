//! `trainer bench`: the time of a training step, with the real loader or with one generated batch fed
//! again and again (the model's speed alone), and the generated batches themselves, which tests use too.

use std::time::{Duration, Instant};

use anyhow::{Result, anyhow};
use common::{Batch, Cursor};
use rand::Rng;

use crate::recipe::config::{DeviceSpec, TrainConfig};
use crate::recipe::schedule::Schedules;
use crate::recipe::step::Trainer;
use crate::run::data;

/// Times `steps` training steps (after `warmup` untimed ones) of `cfg` on `device` (default:
/// `run.device`) and prints step time and images/s (the line `bench/compare.sh` reads).
pub fn bench(
    cfg: &TrainConfig,
    steps: usize,
    warmup: usize,
    synthetic: bool,
    device: Option<DeviceSpec>,
) -> Result<()> {
    let spec = device.unwrap_or(cfg.run.device);
    let schedules = Schedules::new(&cfg.optim, cfg.run.epochs, 1000, cfg.run.batch_size);
    let mut trainer = Trainer::from_config(cfg, schedules, &spec.device()?, &Default::default())?;
    let b = cfg.run.batch_size;
    let mut next: Box<dyn FnMut() -> Result<Batch>> = if synthetic {
        let sizes: Vec<usize> = (0..cfg.views.num_views()).map(|i| cfg.views.view_size(i)).collect();
        let batch = random_batch(b, &sizes, cfg.views.num_points, cfg.run.seed);
        Box::new(move || Ok(batch.clone()))
    } else {
        let shards = data::shards(cfg, false)?;
        let rt = data::runtime()?;
        let loader =
            rt.block_on(async { loader::start(data::loader_options(cfg, &shards, Cursor::default())) })?;
        Box::new(move || rt.block_on(loader.next())?.ok_or_else(|| anyhow!("the data ended")))
    };
    for _ in 0..warmup {
        trainer.step(&next()?).map_err(|e| said_non_finite(e, " in warmup"))?;
    }
    let mut wait = Duration::ZERO;
    let t0 = Instant::now();
    for _ in 0..steps {
        let w = Instant::now();
        let batch = next()?;
        wait += w.elapsed();
        trainer.step(&batch).map_err(|e| said_non_finite(e, ""))?;
    }
    let secs = t0.elapsed().as_secs_f64();
    let (step_time, images_per_s) = (secs / steps as f64, (steps * b) as f64 / secs);
    let m = &cfg.model;
    println!(
        "bench: {} on {spec} in {}, {} views, batch {b}, D={} depth={} heads={} patch={} ({}): {:.4} s/step, \
         {:.1} images/s, data wait {:.0}%",
        if cfg.loss.use_ref_loss { "DenseDINO" } else { "DINO" },
        cfg.run.precision,
        cfg.views.num_views(),
        m.embed_dim,
        m.depth,
        m.num_heads,
        m.patch_size,
        if synthetic { "generated batches" } else { "real loader" },
        step_time,
        images_per_s,
        100.0 * wait.as_secs_f64() / secs
    );
    Ok(())
}

/// A batch of `b` images with views of the given sizes, random pixels and valid reference points: for
/// timing the model without the data pipeline, and for tests. The same `seed` gives the same batch.
pub fn random_batch(b: usize, sizes: &[usize], m: usize, seed: u64) -> Batch {
    let mut rng = common::seed::rng(seed, common::seed::Purpose::Synth, &[u64::MAX]);
    let v = sizes.len();
    let mut pts = |n: usize| (0..n).map(|_| rng.random::<f32>() * 1.8 - 0.9).collect::<Vec<f32>>();
    let teacher_points = (0..2).map(|_| pts(b * v * m * 2)).collect();
    let student_points = (0..v).map(|_| pts(b * 2 * m * 2)).collect();
    let views = sizes
        .iter()
        .map(|&s| common::ViewPixels { size: s, data: (0..b * 3 * s * s).map(|_| rng.random()).collect() })
        .collect();
    Batch {
        batch_size: b,
        num_points: m,
        views,
        teacher_points,
        student_points,
        flips: vec![false; b * v],
        labels: vec![-1; b],
        keys: (0..b).map(|i| format!("generated-{i}")).collect(),
        seq: (0..b as u64).collect(),
        epoch: 0,
        cursor: Cursor::default(),
    }
}

/// A step's error as the benchmark says it: a non-finite loss as `non-finite loss L` and `what`.
fn said_non_finite(e: anyhow::Error, what: &str) -> anyhow::Error {
    match e.downcast_ref::<crate::recipe::step::NonFiniteLoss>() {
        Some(nf) => anyhow!("non-finite loss {}{what}", nf.loss),
        None => e,
    }
}
