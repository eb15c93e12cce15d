//! `trainer`: DenseDINO pretraining from the command line. With no arguments it runs the embedded CPU demo
//! (`configs/default.toml`): a synthetic data set made on first use, a small DenseDINO, a few minutes.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Result;
use burn::tensor::Device;
use clap::{Parser, Subcommand};
use trainer::eval::seg::SegDataset;
use trainer::model::vit::Vit;
use trainer::parallel::World;
use trainer::recipe::config::{DeviceSpec, TrainConfig};
use trainer::run::{self, RunOptions, Start};

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "trainer", version, about = "DenseDINO self-supervised pretraining (burn)")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

/// `trainer train`'s options (`trainer` alone runs the demo: `TrainArgs::default()`, the embedded config).
#[derive(clap::Args)]
struct TrainArgs {
    /// A TOML config (see configs/); without it, the embedded CPU demo.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Override a config value, e.g. --set run.epochs=10 --set loss.alpha=0.3 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
    /// Continue the run in this folder (or from this checkpoint file) exactly where it stopped; a run
    /// killed before its first checkpoint starts over from its config.toml.
    #[arg(long)]
    resume: Option<PathBuf>,
    /// With --resume from a checkpoint older than its run's newest: continue in this new run folder.
    #[arg(long, requires = "resume")]
    branch: Option<PathBuf>,
    /// cpu (burn's pure-Rust backend), tch-cpu or cuda:N (LibTorch, the `tch` feature).
    #[arg(long)]
    device: Option<DeviceSpec>,
    /// No progress output.
    #[arg(long)]
    quiet: bool,
    /// Data-parallel on this machine: run N processes under `mpirun` (the `mpi` feature), each with
    /// run.batch_size images per step. Other launches: `mpirun -n N trainer train ...`, `srun` (README).
    #[arg(long, value_name = "N", default_value_t = 1)]
    nproc_per_node: usize,
}

impl Default for TrainArgs {
    fn default() -> Self {
        Self {
            config: None,
            sets: Vec::new(),
            resume: None,
            branch: None,
            device: None,
            quiet: false,
            nproc_per_node: 1,
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Pretrain (or continue with --resume).
    Train(TrainArgs),
    /// Time training steps of a config: step time and images/s.
    Bench {
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
        #[arg(long, default_value_t = 10)]
        steps: usize,
        /// Untimed steps first (allocation, kernel selection).
        #[arg(long, default_value_t = 2)]
        warmup: usize,
        /// Feed one generated batch repeatedly: model speed without the data pipeline.
        #[arg(long)]
        synthetic_batches: bool,
        /// cpu, tch-cpu or cuda:N (default: the config's run.device).
        #[arg(long)]
        device: Option<DeviceSpec>,
    },
    /// Draw a run's metrics as PNG plots (loss, schedules, teacher entropy); for a run from before
    /// TensorBoard's event files, also write one from its metrics.
    Plot { run_dir: PathBuf },
    /// Evaluate a backbone: weighted k-NN classification or the linear segmentation probe.
    Eval {
        #[command(subcommand)]
        what: EvalCommand,
    },
    /// The last block's CLS attention per head (and 60%-mass masks) and a PCA of the patch features.
    Attention {
        #[command(flatten)]
        model: ModelArgs,
        #[arg(long)]
        image: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// Input side in pixels (a multiple of the patch size); default: the model's training size.
        #[arg(long)]
        size: Option<usize>,
        /// Also draw masks keeping this fraction of the attention mass (DINO uses 0.6).
        #[arg(long)]
        threshold: Option<f32>,
    },
    /// Write a checkpoint's teacher in the official DINO/timm key layout (safetensors).
    Export {
        #[arg(long)]
        checkpoint: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// Include the projection heads (`head.*`, `ref_head.*`).
        #[arg(long)]
        heads: bool,
        /// Replace an existing file at --out (never a run's checkpoint, a folder or a device).
        #[arg(long)]
        force: bool,
    },
    /// Make a step-0 checkpoint from official-layout weights (DINO/DenseDINO `.pth` or safetensors), to
    /// evaluate them or to start a run from them (`train --resume OUT`).
    Import {
        /// The weights (`.pth`/`.pt` or `.safetensors`): backbone keys, optionally `head.*` / `ref_head.*`;
        /// a full training checkpoint of the official code gives its teacher.
        #[arg(long)]
        weights: PathBuf,
        /// The config whose model the weights fit.
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
        /// The run folder to create.
        #[arg(long)]
        out: PathBuf,
        /// Replace a run that `--out` already holds (its checkpoints, metrics and config are removed).
        #[arg(long)]
        force: bool,
    },
}

/// Which backbone to evaluate.
#[derive(clap::Args)]
struct ModelArgs {
    /// A checkpoint file or run folder (its teacher is evaluated, or its student with --backbone student).
    #[arg(long, required_unless_present = "random_init")]
    checkpoint: Option<PathBuf>,
    /// A randomly initialised backbone from --config instead: the floor a trained one must beat.
    #[arg(long)]
    random_init: bool,
    #[arg(long)]
    config: Option<PathBuf>,
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
    #[arg(long, default_value = "cpu")]
    device: DeviceSpec,
    /// The checkpoint's network to evaluate: its teacher (DINO's choice) or its student.
    #[arg(long, value_enum, default_value_t = trainer::eval::Side::Teacher)]
    backbone: trainer::eval::Side,
}

#[derive(Subcommand)]
enum EvalCommand {
    /// DINO's weighted k-NN on the teacher's CLS features.
    Knn {
        #[command(flatten)]
        model: ModelArgs,
        /// Training shards (the neighbours).
        #[arg(long)]
        train: PathBuf,
        /// Test shards.
        #[arg(long)]
        val: PathBuf,
        #[arg(long, value_delimiter = ',', default_values_t = [10, 20, 100, 200], value_parser = in_range(1, 100_000))]
        k: Vec<usize>,
        /// The softmax temperature of the neighbours' votes (DINO: 0.07).
        #[arg(long, default_value_t = 0.07, value_parser = positive_finite)]
        temperature: f64,
        /// Centre-crop size (resize = crop · 256/224), a multiple of the patch size; default: the
        /// model's training size.
        #[arg(long, value_parser = in_range(1, common::config::MAX_VIEW_SIZE as u64))]
        crop: Option<usize>,
        #[arg(long, default_value_t = 64, value_parser = in_range(1, 4096))]
        batch: usize,
        /// Cache extracted features here.
        #[arg(long)]
        cache: Option<PathBuf>,
        /// Also write the results to this file as JSON.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// The linear segmentation probe on frozen patch tokens.
    Seg {
        #[command(flatten)]
        model: ModelArgs,
        /// CamVid folder (train/, trainannot/, val/, valannot/) or VOC2012 folder.
        #[arg(long)]
        data: PathBuf,
        #[arg(long, value_enum, default_value_t = SegDataset::Camvid)]
        dataset: SegDataset,
        /// Input side in pixels (a multiple of the patch size). Default: the size of the model's training
        /// views (`views.global_size`), so the probe reads the grid the model learned; the paper's
        /// protocol is 448 for /16 models at 224.
        #[arg(long, value_parser = in_range(1, common::config::MAX_VIEW_SIZE as u64))]
        size: Option<usize>,
        #[arg(long, default_value_t = 25, value_parser = in_range(1, 10_000))]
        epochs: usize,
        /// Train the probe this many times (seeds 0, 1, ...: its initialisation and batch order) and
        /// report the mean and spread.
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=100))]
        probe_seeds: u64,
        /// Where the packed splits go.
        #[arg(long, default_value = "data")]
        cache: PathBuf,
        /// Also write the results to this file as JSON.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Point correspondence: for each patch of one global view that lies in the other, is the most
    /// similar patch of the other view the true one (within one patch)? Needs no labels.
    Match {
        #[command(flatten)]
        model: ModelArgs,
        /// Held-out shards (e.g. the test split of the pretraining set).
        #[arg(long)]
        data: PathBuf,
        /// Use the first N images.
        #[arg(long, default_value_t = 1000, value_parser = in_range(1, 10_000_000))]
        images: usize,
        /// Seeds the views (the same seed gives every backbone the same view pairs).
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Also write the results to this file as JSON.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Each loss's share of the student's gradient, per parameter group, on a DenseDINO run's latest
    /// checkpoint and the batches its data gives next: raw norms, their cosine, and after AdamW's
    /// preconditioning by the run's second moments.
    Grads {
        /// A run folder or checkpoint file of a run with both losses.
        #[arg(long)]
        checkpoint: PathBuf,
        #[arg(long, default_value_t = 8, value_parser = in_range(1, 10_000))]
        batches: usize,
        #[arg(long, default_value = "cpu")]
        device: DeviceSpec,
        /// Also write the results to this file as JSON.
        #[arg(long)]
        json: Option<PathBuf>,
    },
}

/// A count option's parser: whole numbers in `lo..=hi`, so that 0 is refused with the option named and
/// a huge value never becomes an allocation.
fn in_range(lo: u64, hi: u64) -> clap::builder::RangedU64ValueParser<usize> {
    clap::builder::RangedU64ValueParser::<usize>::new().range(lo..=hi)
}

/// A positive, finite number (a temperature: 0 divides by zero, NaN poisons every vote).
fn positive_finite(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        Ok(v) => Err(format!("{v} is not a positive finite number")),
        Err(e) => Err(e.to_string()),
    }
}

/// The backbone `m` names (a checkpoint's teacher, or a random initialisation), its config, device and
/// identity (what its features depend on: the checkpoint's digest, or the random network's config).
fn load_model(m: &ModelArgs) -> Result<(Vit, TrainConfig, Device, String)> {
    let device = m.device.device()?;
    let (vit, cfg, identity) = if m.random_init {
        let cfg = TrainConfig::load(m.config.as_deref(), &m.sets)?;
        trainer::eval::backbone(None, Some(&cfg), m.backbone, &device)?
    } else {
        trainer::eval::backbone(m.checkpoint.as_deref(), None, m.backbone, &device)?
    };
    Ok((vit, cfg, device, identity))
}

fn main() -> ExitCode {
    run::keep_freed_memory();
    let cli = Cli::parse();
    let demo = Command::Train(TrainArgs::default());
    let result = match cli.command.unwrap_or(demo) {
        Command::Train(args) if args.nproc_per_node == 1 => train(args),
        Command::Train(args) => spawn_local_ranks(&args),
        Command::Bench { config, sets, steps, warmup, synthetic_batches, device } => {
            bench(config.as_deref(), &sets, steps, warmup, synthetic_batches, device)
        }
        Command::Plot { run_dir } => plot(&run_dir),
        Command::Eval {
            what: EvalCommand::Knn { model, train, val, k, temperature, crop, batch, cache, json },
        } => knn(&model, &train, &val, &k, temperature, crop, batch, cache.as_deref(), json.as_deref()),
        Command::Eval {
            what: EvalCommand::Seg { model, data, dataset, size, epochs, probe_seeds, cache, json },
        } => seg(&model, &data, dataset, size, epochs, probe_seeds, &cache, json.as_deref()),
        Command::Eval { what: EvalCommand::Match { model, data, images, seed, json } } => {
            matching(&model, &data, images, seed, json.as_deref())
        }
        Command::Eval { what: EvalCommand::Grads { checkpoint, batches, device, json } } => {
            gradients(&checkpoint, batches, device, json.as_deref())
        }
        Command::Attention { model, image, out, size, threshold } => {
            attention(&model, &image, &out, size, threshold)
        }
        Command::Export { checkpoint, out, heads, force } => export(&checkpoint, &out, heads, force),
        Command::Import { weights, config, sets, out, force } => {
            import(&weights, config.as_deref(), &sets, &out, force)
        }
    };
    // Reader threads of a remote set may still be copying shards into the cache.
    shard::remote::abandon_copies();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // Stopped by a signal, its checkpoint written: 128 + the signal, as a shell reports a process
        // the signal ended, so that a scheduler or a `&&` chain sees an unfinished job.
        Err(e) => match e.downcast_ref::<run::Interrupted>() {
            Some(stop) => {
                eprintln!("{stop}");
                ExitCode::from((128 + stop.signal).clamp(0, 255) as u8)
            }
            None => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}

/// `trainer train`: a fresh run of a config (the embedded demo without one), or `--resume` of a run; on
/// the synthetic set the run then scores its teacher by k-NN against a random network.
fn train(args: TrainArgs) -> Result<()> {
    let TrainArgs { config, sets, resume, branch, device, quiet, .. } = args;
    // Before MPI's start-up: SIGUSR1 (a stop forwarded by mpirun) would otherwise end the process.
    run::stop::install(true)?;
    let start = match resume {
        Some(from) => {
            if config.is_some() {
                anyhow::bail!(
                    "--resume continues a run with its stored config; --config cannot change it (use --set run.* \
                     for the run's length, checkpointing, logging or device, or start a new run with --config)"
                );
            }
            Start::Resume { from, sets, branch }
        }
        None => Start::Fresh(TrainConfig::load(config.as_deref(), &sets)?),
    };
    let world = std::sync::Arc::new(World::from_env()?);
    let summary = run_rank(start, RunOptions { device, quiet, world: world.clone() })?;
    // A stop asked after the last step: the run is complete (its checkpoint written); what follows (the
    // synthetic k-NN) is skipped, and the exit status says a signal ended the process.
    if let Some(signal) = run::stop::requested() {
        let checkpoint = summary.last_checkpoint.as_ref().map_or("none".into(), |c| c.display().to_string());
        let run_dir = summary.run_dir.clone();
        let step = summary.steps.last().map(|m| m.it + 1);
        let processes = world.size;
        return Err(anyhow::Error::new(run::Interrupted { signal, step, checkpoint, run_dir, processes }));
    }
    if world.rank != 0 {
        return Ok(());
    }
    print_summary(&summary);
    if let (None, Some(c)) = (&summary.config.data.shards, &summary.last_checkpoint) {
        synthetic_knn(&summary, c)?;
    }
    Ok(())
}

/// This process's run. In a job of several processes, a failure here ends the whole job, the others
/// waiting in a collective for this one: an error (a collective that failed included) aborts every rank
/// through the launcher, and so does a panic (an out-of-memory GPU; unwinding would finalise MPI or NCCL
/// under them). The one place where a rank's failure becomes the job's.
fn run_rank(start: Start, opts: RunOptions) -> Result<run::RunSummary> {
    let world = opts.world.clone();
    if world.alone() {
        return run::train(start, &opts);
    }
    let w = world.clone();
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        report(info);
        eprintln!("rank {} of {} panicked: ending the job", w.rank, w.size);
        w.abort(101);
    }));
    let result = run::train(start, &opts);
    // The hook holds the World: dropped with it, the World finalises MPI when the caller returns (a
    // process that leaves without MPI_Finalize makes mpirun fail the job).
    drop(std::panic::take_hook());
    match result {
        Ok(summary) => Ok(summary),
        // Every rank stopped after the same step (they agree on it), the checkpoint written: leave
        // through MPI_Finalize like a finished run.
        Err(e) if e.downcast_ref::<run::Interrupted>().is_some() => Err(e),
        Err(e) => {
            eprintln!("error (rank {} of {}): {e:#}", world.rank, world.size);
            world.abort(1)
        }
    }
}

/// A finished run's summary on stdout: its loss, speed, data, teacher and files.
fn print_summary(summary: &run::RunSummary) {
    let loss =
        |m: Option<&trainer::recipe::step::StepMetrics>| m.map_or("-".into(), |m| format!("{:.4}", m.loss));
    println!(
        "done: {} steps, loss {} -> {}, {:.1} images/s, data wait {:.0}%",
        summary.steps.len(),
        loss(summary.steps.first()),
        loss(summary.steps.last()),
        summary.images_per_s,
        100.0 * summary.data_wait_fraction
    );
    if let Some(problems) = &summary.data_problems {
        println!("data problems: {problems}");
    }
    if let Some(last) = summary.steps.last().filter(|m| m.it + 1 < summary.planned_steps) {
        println!(
            "the run took {} of its planned {} steps: its data ended first",
            last.it + 1,
            summary.planned_steps
        );
    }
    let t = summary.teacher;
    println!(
        "teacher: {:.1}% of its random initialisation remains in its EMA (the product of the momenta), \
         ‖θ−θ₀‖/‖θ₀‖ = {:.3} over its backbone{}",
        100.0 * t.init_share,
        t.distance,
        if t.init_share > 0.2 {
            "; it has barely moved (a run short for its optim.momentum_teacher)"
        } else {
            ""
        }
    );
    println!("outputs in {}:", summary.run_dir.display());
    println!(
        "  metrics.jsonl, loss.png, schedules.png, entropy.png, config.toml, TensorBoard's events.out.tfevents.*"
    );
    if let Some(c) = &summary.last_checkpoint {
        println!("  checkpoint {}", c.display());
    }
}

/// A run on the synthetic set: its teacher (checkpoint `c`) against a random network by k-NN on a held-out
/// synthetic set, printed and written beside the run's curves in TensorBoard, at its last step.
fn synthetic_knn(summary: &run::RunSummary, c: &Path) -> Result<()> {
    let (trained, random) = trainer::eval::synthetic_knn(&summary.config, c)?;
    println!(
        "k-NN (k=20) on a held-out synthetic set: trained teacher top-1 {:.1}%, randomly initialised {:.1}%",
        100.0 * trained.top1,
        100.0 * random.top1
    );
    let step = summary.trained_steps.saturating_sub(1);
    let scalars = [("knn/top1_trained", trained.top1), ("knn/top1_random", random.top1)];
    trainer::run::tensorboard::EventWriter::create(&summary.run_dir, None)?
        .scalars(step, &scalars.map(|(k, v)| (k.to_string(), 100.0 * v)))?;
    Ok(())
}

/// `trainer train --nproc-per-node N`: this command, N times under Open MPI's `mpirun` on this machine
/// (which ends the whole job when one rank fails). Each rank gets an even share of the cores for its
/// thread pools unless RAYON_NUM_THREADS says otherwise.
fn spawn_local_ranks(args: &TrainArgs) -> Result<()> {
    let n = args.nproc_per_node;
    if n == 0 {
        anyhow::bail!("--nproc-per-node 0: at least one process");
    }
    if !cfg!(feature = "mpi") {
        anyhow::bail!(
            "--nproc-per-node needs the `mpi` feature: cargo build --release -p trainer --features mpi \
             (libopenmpi-dev and libclang-dev installed)"
        );
    }
    if let Some(env) = trainer::parallel::launch_env(|k| std::env::var(k).ok())? {
        anyhow::bail!(
            "--nproc-per-node starts the ranks itself, but this process is already rank {} of {} under {}: \
             drop one of the two",
            env.rank,
            env.size,
            env.launcher
        );
    }
    let mut cmd = std::process::Command::new("mpirun");
    cmd.args(["-n", &n.to_string(), "--bind-to", "none"]);
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        cmd.arg("--allow-run-as-root"); // containers run as root; Open MPI refuses that by default
    }
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
        cmd.args(["-x", &format!("RAYON_NUM_THREADS={}", (cores / n).max(1))]);
    }
    // Every rank runs this very command line, but the launch flag: an option added to `train` reaches
    // the ranks without being copied here.
    cmd.arg(std::env::current_exe()?).args(without_launch_flag(std::env::args_os().skip(1)));
    supervise(cmd, args)
}

/// Command-line arguments without `--nproc-per-node N` (or `--nproc-per-node=N`).
fn without_launch_flag(mut args: impl Iterator<Item = std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    let mut kept = Vec::new();
    while let Some(a) = args.next() {
        if a == "--nproc-per-node" {
            args.next();
        } else if !a.to_str().is_some_and(|s| s.starts_with("--nproc-per-node=")) {
            kept.push(a);
        }
    }
    kept
}

/// Runs `mpirun` (`cmd`) to its end, passing a stop request on to the ranks.
fn supervise(mut cmd: std::process::Command, args: &TrainArgs) -> Result<()> {
    let n = args.nproc_per_node;
    // mpirun in a process group of its own: a terminal's Ctrl-C reaches this launcher only, which turns
    // it (or a scheduler's SIGTERM) into SIGUSR1 for mpirun. Open MPI forwards SIGUSR1 to every rank,
    // where it asks for a checkpoint at the next step; SIGTERM or SIGINT to mpirun itself kill the ranks
    // a few seconds later, checkpoint or not, which is what a second signal here does. If this launcher
    // dies (SIGKILL, a closed terminal), the kernel sends mpirun SIGTERM: no rank outlives it.
    {
        use std::os::unix::process::CommandExt;
        cmd.process_group(0);
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
    }
    run::stop::install(false)?;
    let mut child = cmd.spawn().map_err(|e| {
        anyhow::anyhow!("--nproc-per-node runs `mpirun` (Open MPI: apt install openmpi-bin): {e}")
    })?;
    let pid = child.id() as i32;
    let (mut forwarded, mut ended) = (None, false);
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if let (None, Some(signal)) = (forwarded, run::stop::requested()) {
            eprintln!("stop asked (signal {signal}): the ranks finish their step, checkpoint and stop");
            // SAFETY: kill has no memory preconditions; the pid is our live child's.
            unsafe { libc::kill(pid, libc::SIGUSR1) };
            forwarded = Some(signal);
        }
        if !ended && run::stop::insisted() {
            eprintln!("asked again: ending the ranks now (the last checkpoint stays)");
            // SAFETY: as above; mpirun leads its own process group.
            unsafe { libc::kill(-pid, libc::SIGTERM) };
            ended = true;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    // The ranks stopped as asked exit with 128 + SIGUSR1, and mpirun with theirs; anything else (a rank
    // that failed writing its checkpoint, ranks ended by a second signal) is a failure, said as one.
    if let Some(signal) = forwarded {
        if status.code() != Some(128 + libc::SIGUSR1) {
            anyhow::bail!(
                "the {n} ranks under mpirun did not stop cleanly after the stop request (signal {signal}): \
                 mpirun ended with {status}; resume from the last checkpoint named above"
            );
        }
        let run_dir = match &args.resume {
            Some(r) => r.clone(),
            None => TrainConfig::load(args.config.as_deref(), &args.sets)?.run_dir(),
        };
        let checkpoint = "written by the ranks (above)".to_string();
        return Err(anyhow::Error::new(run::Interrupted {
            signal,
            step: None,
            checkpoint,
            run_dir,
            processes: n,
        }));
    }
    if !status.success() {
        anyhow::bail!(
            "the {n} ranks under mpirun ended with {status} (mpirun's message above names the rank)"
        );
    }
    Ok(())
}

/// `trainer bench`: the time of `steps` training steps of a config, after `warmup` untimed ones.
fn bench(
    config: Option<&Path>,
    sets: &[String],
    steps: usize,
    warmup: usize,
    synthetic_batches: bool,
    device: Option<DeviceSpec>,
) -> Result<()> {
    let cfg = TrainConfig::load(config, sets)?;
    trainer::run::bench::bench(&cfg, steps, warmup, synthetic_batches, device)
}

/// `trainer plot`: a run's metrics as PNG plots.
fn plot(run_dir: &Path) -> Result<()> {
    for p in trainer::run::metrics::plot(run_dir)? {
        println!("{}", p.display());
    }
    if let Some(p) = trainer::run::tensorboard::from_history(run_dir)? {
        println!("{}", p.display());
    }
    Ok(())
}

/// `trainer eval knn`: DINO's weighted k-NN on CLS features, at every k asked for.
#[allow(clippy::too_many_arguments)]
fn knn(
    model: &ModelArgs,
    train: &Path,
    val: &Path,
    k: &[usize],
    temperature: f64,
    crop: Option<usize>,
    batch: usize,
    cache: Option<&Path>,
    json: Option<&Path>,
) -> Result<()> {
    trainer::eval::check_knn_sets(train, val)?;
    // The features depend on the backbone's contents (its identity), not on where it lies: a run that
    // moved on gives new features under the same path.
    let (vit, cfg, device, identity) = load_model(model)?;
    let crop = crop.unwrap_or(cfg.views.global_size);
    let patch = cfg.model.patch_size;
    if !crop.is_multiple_of(patch) {
        anyhow::bail!("--crop {crop}: must be a positive multiple of the model's patch size {patch}");
    }
    let pre = trainer::eval::Preprocess::for_crop(crop);
    let feats = |shards: &Path| {
        let key = trainer::eval::feature_key(&identity, pre, shards)?;
        let (f, l) = trainer::eval::cached(cache, &key, || {
            trainer::eval::extract_cls(&vit, shards, pre, batch, &device)
        })?;
        trainer::eval::check_labels(shards, &l)?;
        anyhow::Ok((f, l))
    };
    let (tf, tl) = feats(train)?;
    let (vf, vl) = feats(val)?;
    println!(
        "k-NN ({}; {} train, {} test images, T = {temperature}, crop {}):",
        match (model.random_init, model.backbone) {
            (true, _) => "random init",
            (false, trainer::eval::Side::Teacher) => "teacher",
            (false, trainer::eval::Side::Student) => "student",
        },
        tl.len(),
        vl.len(),
        pre.crop
    );
    let results = trainer::eval::knn((&tf, &tl), (&vf, &vl), k, temperature, &device);
    for r in &results {
        println!(
            "  k={:<4} top-1 {:6.2}%  top-5 {:6.2}%  mean per-class {:6.2}%",
            r.k,
            100.0 * r.top1,
            100.0 * r.top5,
            100.0 * r.mean_per_class
        );
    }
    write_json(json, || {
        let by_k: Vec<_> = results
            .iter()
            .map(|r| {
                serde_json::json!({"k": r.k, "top1": r.top1, "top5": r.top5, "mean_per_class": r.mean_per_class})
            })
            .collect();
        serde_json::json!({"eval": "knn", "model": short_identity(&identity), "crop": pre.crop, "temperature": temperature,
            "train_images": tl.len(), "test_images": vl.len(), "results": by_k})
    })
}

/// A backbone's identity for a results file: a checkpoint's digest and side, or "random-init" (the full
/// identity of a random backbone is its whole config).
fn short_identity(identity: &str) -> &str {
    if identity.starts_with("random:") { "random-init" } else { identity }
}

/// Writes an eval's results as JSON to `path` (whole or not at all), when one is given.
fn write_json(path: Option<&Path>, value: impl FnOnce() -> serde_json::Value) -> Result<()> {
    if let Some(path) = path {
        let text = serde_json::to_string_pretty(&value())? + "\n";
        shard::format::write_atomic(path, text.as_bytes())?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

/// `trainer eval seg`: the linear probe on frozen patch tokens, mIoU on the val split: the mean and spread
/// over probe seeds, a bootstrap interval over the val images, and the IoU of each class.
#[allow(clippy::too_many_arguments)]
fn seg(
    model: &ModelArgs,
    data: &Path,
    dataset: SegDataset,
    size: Option<usize>,
    epochs: usize,
    probe_seeds: u64,
    cache: &Path,
    json: Option<&Path>,
) -> Result<()> {
    use trainer::eval::seg;
    if probe_seeds == 0 {
        anyhow::bail!("--probe-seeds 0: the probe must be trained at least once");
    }
    let (vit, cfg, device, identity) = load_model(model)?;
    let size = seg::probe_size(&cfg, size)?;
    let patch = cfg.model.patch_size;
    let (classes, ignore, names) = dataset.classes();
    let train = seg::packed_split(data, dataset, "train", cache)?;
    let val = seg::packed_split(data, dataset, "val", cache)?;
    let tr = seg::features(&vit, &train, size, &device)?;
    let va = seg::features(&vit, &val, size, &device)?;
    let learned = cfg.model.img_size / patch;
    eprintln!(
        "probe at {size} px: a {g}x{g} patch grid ({}; the model learned {learned}x{learned} at {} px views)",
        if tr.grid == learned { "the learned positional grid" } else { "the positional grid interpolated" },
        cfg.views.global_size,
        g = tr.grid,
    );
    let runs: Vec<seg::ProbeResult> = (0..probe_seeds)
        .map(|seed| {
            let opts = seg::ProbeOptions { epochs, seed, ..seg::ProbeOptions::new(classes, ignore) };
            seg::probe(&tr, &va, &opts, size, &device, probe_seeds > 1)
        })
        .collect::<Result<_>>()?;
    let mious: Vec<f64> = runs.iter().map(|r| r.miou).collect();
    let (mean, sd) = mean_sd(&mious);
    // The images' spread, read on the first probe (the probe seeds move mIoU by ~0.05 points).
    let (lo, hi) = seg::bootstrap_interval(&runs[0].per_image, classes, 1000, 0);
    let per_class: Vec<f64> =
        (0..classes).map(|c| runs.iter().map(|r| r.per_class[c]).sum::<f64>() / runs.len() as f64).collect();
    let acc = runs.iter().map(|r| r.pixel_accuracy).sum::<f64>() / runs.len() as f64;
    println!(
        "{} val ({} images, {size} px): mIoU {:.2}% ± {:.2} (mean ± sd over {probe_seeds} probe seeds; \
         95% bootstrap interval over the images {:.2}-{:.2}%), pixel accuracy {:.2}%",
        dataset.name(),
        va.masks.len(),
        100.0 * mean,
        100.0 * sd,
        100.0 * lo,
        100.0 * hi,
        100.0 * acc
    );
    for (n, v) in names.iter().zip(&per_class) {
        println!("  {n:<12} IoU {:6.2}%", 100.0 * v);
    }
    write_json(json, || {
        serde_json::json!({"eval": "seg", "model": short_identity(&identity), "dataset": dataset.name(), "size": size,
            "grid": tr.grid, "val_images": va.masks.len(), "miou": mean, "miou_sd": sd, "miou_per_seed": mious,
            "bootstrap_95": [lo, hi], "pixel_accuracy": acc,
            "per_class": names.iter().zip(&per_class).map(|(n, v)| (n.clone(), *v)).collect::<std::collections::BTreeMap<_, _>>()})
    })
}

/// Mean and sample standard deviation (0 for one value).
fn mean_sd(xs: &[f64]) -> (f64, f64) {
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    let var = if xs.len() > 1 { xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0) } else { 0.0 };
    (mean, var.sqrt())
}

/// `trainer eval match`: the point-correspondence rate of the backbone's patch features.
fn matching(model: &ModelArgs, data: &Path, images: usize, seed: u64, json: Option<&Path>) -> Result<()> {
    let (vit, cfg, device, identity) = load_model(model)?;
    use trainer::eval::matching;
    let report = matching::evaluate(&vit, data, &cfg.views, seed, images, &device)?;
    let (c, r, n) = (report.patches, report.refs, report.images);
    let (local, own, peak, uniform) = report.attention.means();
    let grid = cfg.views.global_size / cfg.model.patch_size;
    println!(
        "correspondence ({n} images, two {} px views each, {grid}x{grid} patches, {} points): \
         within one patch {:.2}%, exact {:.2}%; reference tokens: own point's token found among {} {:.2}% \
         (cosine to it {:.3}, to the others {:.3})",
        cfg.views.global_size,
        c.points,
        100.0 * c.within_one_rate(),
        100.0 * c.exact_rate(),
        matching::REF_POINTS,
        100.0 * r.rate(),
        r.sims().0,
        r.sims().1
    );
    let per_block = |v: &[f64]| v.iter().map(|x| format!("{:.1}", 100.0 * x)).collect::<Vec<_>>().join(" ");
    println!(
        "reference tokens' attention within one patch of their point, per block: {}% (uniform: {:.1}%); on \
         the point's own patch: {}%; the largest share on one patch: {}% (uniform: {:.1}%)",
        per_block(&local),
        100.0 * uniform,
        per_block(&own),
        per_block(&peak),
        100.0 / (grid * grid) as f64
    );
    let (mass, patch_local, patch_uniform) = report.attention.control_means();
    println!(
        "reference tokens' attention on the patches at all (the rest on themselves), per block: {}%; the \
         control, patches' attention within one patch of themselves: {}% (uniform: {:.1}%)",
        per_block(&mass),
        per_block(&patch_local),
        100.0 * patch_uniform
    );
    write_json(json, || {
        serde_json::json!({"eval": "match", "model": short_identity(&identity), "images": n, "size": cfg.views.global_size,
            "grid": grid, "points": c.points, "within_one": c.within_one_rate(), "exact": c.exact_rate(),
            "ref_points": matching::REF_POINTS, "ref_retrieval": r.rate(), "ref_cos_own": r.sims().0,
            "ref_cos_other": r.sims().1, "ref_attn_local": local, "ref_attn_own": own, "ref_attn_peak": peak,
            "ref_attn_uniform": uniform, "ref_attn_mass": mass,
            "patch_attn_local": patch_local, "patch_attn_uniform": patch_uniform})
    })
}

/// `trainer eval grads`: the table of [`trainer::eval::gradients::Report`].
fn gradients(run: &Path, batches: usize, device: DeviceSpec, json: Option<&Path>) -> Result<()> {
    let report = trainer::eval::gradients::evaluate(run, batches, &device.device()?)?;
    println!(
        "{} (step {}), {} batches; each loss weighted as in the total (alpha {}); RMS norms over the batches",
        report.checkpoint.display(),
        report.step,
        report.batches,
        report.alpha
    );
    println!(
        "{:<12} {:>9} {:>10} {:>10} {:>9} {:>7} {:>10} {:>10} {:>9}",
        "group", "params", "|g cls|", "|g ref|", "ref share", "cosine", "adam cls", "adam ref", "ref share"
    );
    for g in &report.groups {
        let (raw, adam) = g.ref_share();
        println!(
            "{:<12} {:>9} {:>10.3e} {:>10.3e} {:>8.1}% {:>7.3} {:>10.3e} {:>10.3e} {:>8.1}%",
            g.group,
            g.params,
            g.cls_norm,
            g.ref_norm,
            100.0 * raw,
            g.cosine,
            g.cls_adam,
            g.ref_adam,
            100.0 * adam
        );
    }
    write_json(json, || serde_json::json!({"eval": "grads", "report": &report}))
}

/// `trainer attention`: the last block's CLS attention per head, masks and a PCA of the patch features.
fn attention(
    model: &ModelArgs,
    image: &Path,
    out: &Path,
    size: Option<usize>,
    threshold: Option<f32>,
) -> Result<()> {
    let (vit, cfg, device, _) = load_model(model)?;
    let size = size.unwrap_or(cfg.views.global_size);
    for p in trainer::eval::attention::draw(&vit, image, out, size, threshold, &device)? {
        println!("{}", p.display());
    }
    Ok(())
}

/// `trainer export`: a checkpoint's teacher in the official DINO/timm layout.
fn export(checkpoint: &Path, out: &Path, heads: bool, force: bool) -> Result<()> {
    let n = trainer::export::export(checkpoint, out, heads, force, &Device::flex())?;
    println!("wrote {} ({n} tensors, official DINO layout)", out.display());
    Ok(())
}

/// `trainer import`: a step-0 run folder from official-layout weights.
fn import(weights: &Path, config: Option<&Path>, sets: &[String], out: &Path, force: bool) -> Result<()> {
    let cfg = TrainConfig::load(config, sets)?;
    let path = trainer::export::import_run(&cfg, weights, out, force)?;
    println!(
        "wrote {}: evaluate it with --checkpoint {}, or continue with train --resume {}",
        path.display(),
        out.display(),
        out.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ranks_get_the_launch_command_line_without_the_launch_flag() {
        let args = |s: &str| s.split(' ').map(std::ffi::OsString::from).collect::<Vec<_>>();
        let kept = without_launch_flag(
            args("train --config c.toml --nproc-per-node 2 --set run.epochs=3 --quiet").into_iter(),
        );
        assert_eq!(kept, args("train --config c.toml --set run.epochs=3 --quiet"));
        let kept = without_launch_flag(args("train --nproc-per-node=4 --resume runs/x").into_iter());
        assert_eq!(kept, args("train --resume runs/x"));
        // Every option of `train` reaches the ranks, whatever it is (a new flag needs no forwarding code).
        let kept = without_launch_flag(args("train --some-future-flag v --nproc-per-node 2").into_iter());
        assert_eq!(kept, args("train --some-future-flag v"));
    }

    #[test]
    fn the_default_train_arguments_are_one_process() {
        assert_eq!(TrainArgs::default().nproc_per_node, 1);
    }
}
