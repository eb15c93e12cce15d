//! The `loader` command: `bench` measures the pipeline against decode alone on the same images; `soak`
//! streams many epochs and prints resident memory after each (a long run must not grow); `preview` draws
//! views and reference points for a person to check.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Result;
use clap::{Parser, Subcommand};

use common::config::ViewsConfig;
use loader::pipeline::{for_each_sample, open_index};
use loader::views::{Scratch, decode_only, make_views};
use loader::{LoaderOptions, start};

#[derive(Parser)]
#[command(name = "loader", version, about = "The densedino streaming loader, standalone")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// What every pipeline run needs: the shards, the views preset, the workers and the batch size.
#[derive(clap::Args)]
struct PipelineArgs {
    /// A shard folder or its index.json, or a remote set: s3://, gs://, az://, http(s)://, pipe:.
    #[arg(long)]
    shards: PathBuf,
    /// Where a remote set's shards are kept once read (default: streamed every epoch).
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// The most the cache may hold, e.g. 20G (default: no limit).
    #[arg(long, value_parser = shard::remote::parse_size, requires = "cache_dir")]
    cache_limit: Option<u64>,
    /// paper-main, readme-ablation or dino.
    #[arg(long, default_value = "paper-main")]
    preset: String,
    /// Decode workers (default: the available cores).
    #[arg(long, value_parser = in_range(1, 1024))]
    workers: Option<usize>,
    #[arg(long, default_value_t = 32, value_parser = in_range(1, 65_536))]
    batch_size: usize,
}

impl PipelineArgs {
    fn options(&self) -> Result<LoaderOptions> {
        let views = ViewsConfig::preset(&self.preset)?;
        let mut opts = LoaderOptions::new(self.shards.clone(), views, self.batch_size);
        opts.workers =
            self.workers.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        opts.cache = self
            .cache_dir
            .clone()
            .map(|dir| shard::remote::Cache { dir, limit: self.cache_limit.unwrap_or(u64::MAX) });
        Ok(opts)
    }
}

#[derive(Subcommand)]
enum Command {
    /// Throughput of the full pipeline and of decode alone on the same images, with their ratio.
    Bench {
        #[command(flatten)]
        pipeline: PipelineArgs,
        /// Total seconds for each of the two measurements (split over the rounds).
        #[arg(long, default_value_t = 12.0, value_parser = positive_seconds)]
        seconds: f64,
        /// Alternating decode/pipeline windows; the median ratio is reported.
        #[arg(long, default_value_t = 3, value_parser = in_range(1, 1000))]
        rounds: usize,
        /// Samples in the shuffle buffer.
        #[arg(long, default_value_t = 1000, value_parser = in_range(1, loader::pipeline::MAX_SHUFFLE_BUFFER as u64))]
        shuffle_buffer: usize,
        /// Shards read at once.
        #[arg(long, default_value_t = 4, value_parser = in_range(1, loader::pipeline::MAX_INTERLEAVE as u64))]
        interleave: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Stream `epochs` epochs through the pipeline alone, printing resident memory after each.
    Soak {
        #[command(flatten)]
        pipeline: PipelineArgs,
        #[arg(long, default_value_t = 20, value_parser = in_range(1, 1_000_000))]
        epochs: usize,
    },
    /// Draw the first images' view pairs with their reference points (a PNG): one pair per row, a global
    /// view and the view it is matched to, each point numbered in one colour in both, joined by a line;
    /// flipped views framed in orange.
    Preview {
        #[arg(long)]
        shards: PathBuf,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value = "paper-main")]
        preset: String,
        /// Images to draw (each gives one row per view pair).
        #[arg(long, default_value_t = 2, value_parser = in_range(1, 256))]
        count: usize,
        /// Reference points drawn per pair (at most the preset's).
        #[arg(long, default_value_t = 4, value_parser = in_range(1, 1024))]
        points: usize,
        /// Side of each view in the picture, in pixels.
        #[arg(long, default_value_t = 320, value_parser = clap::value_parser!(u32).range(16..=1024))]
        cell: u32,
        /// The dense grid instead: one row per image, all its views, every point of every pair.
        #[arg(long)]
        grid: bool,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
}

/// A count option's parser: whole numbers in `lo..=hi`, so that 0 is never silently replaced and a
/// huge value never becomes an allocation.
fn in_range(lo: u64, hi: u64) -> clap::builder::RangedU64ValueParser<usize> {
    clap::builder::RangedU64ValueParser::<usize>::new().range(lo..=hi)
}

/// `--seconds`: a positive, finite duration (0 would divide by a zero count into a NaN ratio).
fn positive_seconds(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 && v <= 86_400.0 => Ok(v),
        Ok(v) => Err(format!("{v} is not a duration in (0, 86400] seconds")),
        Err(e) => Err(e.to_string()),
    }
}

#[allow(clippy::too_many_arguments)]
fn preview(
    shards: PathBuf,
    out: &std::path::Path,
    preset: &str,
    count: usize,
    points: usize,
    cell: u32,
    grid: bool,
    seed: u64,
) -> Result<()> {
    let views = ViewsConfig::preset(preset)?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let batch = rt.block_on(async {
        let mut opts = LoaderOptions::new(shards, views, count.max(1));
        opts.seed = seed;
        let loader = start(opts)?;
        loader.next().await?.ok_or_else(|| anyhow::anyhow!("the set gave no batch"))
    })?;
    let img = if grid {
        loader::preview::render(&batch, cell)
    } else {
        loader::preview::render_pairs(&batch, cell, points)
    };
    img.save(out).map_err(|e| anyhow::anyhow!("{}: cannot write: {e}", out.display()))?;
    println!(
        "wrote {} ({} images x {} views; keys: {})",
        out.display(),
        batch.batch_size,
        batch.num_views(),
        batch.keys.join(", ")
    );
    Ok(())
}

/// Resident memory of this process in MB (Linux), to show that a long run does not grow.
fn rss_mb() -> Option<f64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: f64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096.0 / 1e6)
}

/// Decodes in-memory images on `workers` threads for `seconds`; images/s.
fn decode_rate(images: &Arc<Vec<Vec<u8>>>, workers: usize, seconds: f64) -> f64 {
    let count = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let t0 = Instant::now();
    let handles: Vec<_> = (0..workers)
        .map(|w| {
            let (images, count, stop) = (images.clone(), count.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut s = Scratch::default();
                let mut i = w;
                while !stop.load(Ordering::Relaxed) {
                    let _ = decode_only(&images[i % images.len()], &mut s);
                    count.fetch_add(1, Ordering::Relaxed);
                    i += workers;
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs_f64(seconds));
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        let _ = h.join();
    }
    count.load(Ordering::Relaxed) as f64 / t0.elapsed().as_secs_f64()
}

fn bench(opts: LoaderOptions, preset: &str, seconds: f64, rounds: usize) -> Result<()> {
    let rounds = rounds.max(1);
    let (workers, seed, views) = (opts.workers, opts.seed, opts.views.clone());
    let (dir, index) = open_index(&opts.shards)?;
    let mut images = vec![];
    for_each_sample(&dir, &index, |s| {
        if let Some(j) = s.get("jpg") {
            images.push(j.to_vec());
        }
        images.len() < 2000
    })?;
    anyhow::ensure!(!images.is_empty(), "{}: no images", dir.display());
    println!(
        "bench: {} images from {}, preset {preset}, {workers} workers, {seconds} s per measurement in {rounds} rounds",
        images.len(),
        dir.display()
    );

    // Where one core's time goes, per image (single thread, same images).
    let mut s = Scratch::default();
    let n = images.len().min(200);
    let t = Instant::now();
    for img in &images[..n] {
        let _ = decode_only(img, &mut s);
    }
    let dec = t.elapsed().as_secs_f64() / n as f64;
    let t = Instant::now();
    for (i, img) in images[..n].iter().enumerate() {
        let _ = make_views(img, &views, seed, 0, i as u64, &mut s);
    }
    let full = t.elapsed().as_secs_f64() / n as f64;
    println!(
        "one core: decode {:.2} ms/image, decode+views {:.2} ms/image (views {:.2} ms: crop/resize, colour, blur, points)",
        dec * 1e3,
        full * 1e3,
        (full - dec) * 1e3
    );

    // The machine is shared and noisy: measure in rounds, each a decode-only window followed by a
    // pipeline window, and report the median ratio. Between windows the pipeline stalls on its full
    // channel (back-pressure), so it does not compete with the decode-only window.
    let images = Arc::new(images);
    let window = seconds / rounds as f64;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let (decodes, pipes, stats_line) = rt.block_on(async {
        let loader = start(opts)?;
        // Warm up: the first batch fills the shuffle buffer.
        loader.next().await?;
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
        let reporter = tokio::spawn(loader::report::report(
            loader.stats.clone(),
            loader.batches.clone(),
            None,
            Duration::from_secs(2),
            stop_rx,
        ));
        let rss_start = rss_mb();
        let (mut decodes, mut pipes) = (vec![], vec![]);
        for _ in 0..rounds {
            // Let the pipeline fill its channel and stall before timing decode alone.
            tokio::time::sleep(Duration::from_millis(300)).await;
            let imgs = images.clone();
            decodes.push(tokio::task::spawn_blocking(move || decode_rate(&imgs, workers, window)).await?);
            // Drain what queued up meanwhile, then time the pipeline from a steady state.
            while loader.batches.try_recv().is_ok() {}
            let t0 = Instant::now();
            let mut n = 0u64;
            while t0.elapsed().as_secs_f64() < window {
                n += loader.next().await?.ok_or_else(|| anyhow::anyhow!("the data ended"))?.batch_size as u64;
            }
            pipes.push(n as f64 / t0.elapsed().as_secs_f64());
        }
        let _ = stop_tx.send(());
        let _ = reporter.await;
        if let (Some(a), Some(b)) = (rss_start, rss_mb()) {
            let epochs = loader.stats.images.load(Ordering::Relaxed) / loader.index.total_samples.max(1);
            eprintln!("memory: {a:.0} MB resident after warm-up, {b:.0} MB at the end ({epochs} epochs read; between windows the channel fills to capacity and allocator pools grow to their working size; `loader soak` prints memory per epoch)");
        }
        let (p50, p99) = loader.stats.time_percentiles();
        let problems = loader.stats.problems().unwrap_or_else(|| "no data problems".into());
        let line = format!("sample time p50 {p50:.1} ms, p99 {p99:.1} ms, {problems}");
        anyhow::Ok((decodes, pipes, line))
    })?;
    let ratios: Vec<f64> = pipes.iter().zip(&decodes).map(|(p, d)| p / d).collect();
    let median = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (decode, pipe) = (median(&decodes), median(&pipes));
    println!(
        "decode only:   {decode:8.1} images/s  ({:.1} per worker; median of {rounds} windows)",
        decode / workers as f64
    );
    println!("full pipeline: {pipe:8.1} images/s  ({:.1} per worker; {stats_line})", pipe / workers as f64);
    let each: Vec<String> = ratios.iter().map(|r| format!("{r:.2}")).collect();
    println!("ratio full/decode: {:.2} (median; rounds: {})", median(&ratios), each.join(" "));
    Ok(())
}

/// Resident memory per epoch. The first epochs fill the allocator's pools (one per worker thread) and
/// the channel; after that a pipeline that reuses its buffers stays flat.
fn soak(opts: LoaderOptions, epochs: usize) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(async {
        let loader = start(opts)?;
        let t0 = Instant::now();
        let (mut epoch, mut images, mut rss) = (0usize, 0u64, vec![]);
        while rss.len() < epochs {
            let batch = loader.next().await?.ok_or_else(|| anyhow::anyhow!("the data ended"))?;
            if batch.epoch as usize != epoch {
                let mb = rss_mb().unwrap_or(f64::NAN);
                println!(
                    "epoch {epoch:3}: {mb:6.1} MB resident, {images} images, {:.0} images/s",
                    images as f64 / t0.elapsed().as_secs_f64()
                );
                rss.push(mb);
                epoch = batch.epoch as usize;
            }
            images += batch.batch_size as u64;
        }
        if let Some(problems) = loader.stats.problems() {
            eprintln!("data problems: {problems}");
        }
        let settled = rss.len().min(3);
        if rss.len() <= settled {
            println!("resident memory: {:.1} MB at the end (run more epochs to see a trend)", rss[rss.len() - 1]);
            return anyhow::Ok(());
        }
        let after = rss[settled - 1];
        let max_later = rss[settled..].iter().copied().fold(after, f64::max);
        println!(
            "resident memory: {after:.1} MB after epoch {}, at most {max_later:.1} MB over epochs {}..{}, {:.1} MB at the end",
            settled - 1,
            settled,
            rss.len() - 1,
            rss[rss.len() - 1]
        );
        anyhow::Ok(())
    })
}

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Command::Bench { pipeline, seconds, rounds, shuffle_buffer, interleave, seed } => {
            pipeline.options().and_then(|mut opts| {
                opts.seed = seed;
                opts.shuffle_buffer = shuffle_buffer;
                opts.interleave = interleave;
                bench(opts, &pipeline.preset, seconds, rounds)
            })
        }
        Command::Soak { pipeline, epochs } => pipeline.options().and_then(|opts| soak(opts, epochs.max(1))),
        Command::Preview { shards, out, preset, count, points, cell, grid, seed } => {
            preview(shards, &out, &preset, count, points, cell, grid, seed)
        }
    };
    // Reader threads of a remote set may still be copying shards into the cache.
    shard::remote::abandon_copies();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
