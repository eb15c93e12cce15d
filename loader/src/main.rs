//! The `loader` command: `bench` measures the pipeline against decode alone on the same images;
//! `preview` draws views and reference points for a person to check.

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
#[command(
    name = "loader",
    version,
    about = "The densedino streaming loader, standalone"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Throughput of the full pipeline and of decode alone on the same images, with their ratio.
    Bench {
        #[arg(long)]
        shards: PathBuf,
        /// paper-main, readme-ablation or dino.
        #[arg(long, default_value = "paper-main")]
        preset: String,
        #[arg(long)]
        workers: Option<usize>,
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
        #[arg(long, default_value_t = 32)]
        batch_size: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Draw a PNG grid of the first images' views with their reference points.
    Preview {
        #[arg(long)]
        shards: PathBuf,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value = "paper-main")]
        preset: String,
        /// Images (rows) to draw.
        #[arg(long, default_value_t = 4)]
        count: usize,
        /// Side of each view in the picture, in pixels.
        #[arg(long, default_value_t = 160)]
        cell: u32,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
}

fn preview(
    shards: PathBuf,
    out: &std::path::Path,
    preset: &str,
    count: usize,
    cell: u32,
    seed: u64,
) -> Result<()> {
    let views = ViewsConfig::preset(preset)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let batch = rt.block_on(async {
        let mut opts = LoaderOptions::new(shards, views, count.max(1));
        opts.seed = seed;
        let loader = start(opts)?;
        anyhow::Ok(loader.batches.recv().await?)
    })?;
    let img = loader::preview::render(&batch, cell);
    img.save(out)
        .map_err(|e| anyhow::anyhow!("{}: cannot write: {e}", out.display()))?;
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

fn bench(
    shards: PathBuf,
    preset: &str,
    workers: usize,
    seconds: f64,
    batch_size: usize,
    seed: u64,
) -> Result<()> {
    let views = ViewsConfig::preset(preset)?;
    let (dir, index) = open_index(&shards)?;
    let mut images = vec![];
    for_each_sample(&dir, &index, |_, s| {
        if let Some(j) = s.get("jpg") {
            images.push(j.to_vec());
        }
        images.len() < 2000
    })?;
    anyhow::ensure!(!images.is_empty(), "{}: no images", dir.display());
    println!(
        "bench: {} images from {}, preset {preset}, {workers} workers, {seconds} s per phase",
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

    let images = Arc::new(images);
    let decode = decode_rate(&images, workers, seconds);

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let (pipe, stats_line) = rt.block_on(async {
        let mut opts = LoaderOptions::new(shards.clone(), views.clone(), batch_size);
        opts.workers = workers;
        opts.seed = seed;
        let loader = start(opts)?;
        // Warm up: the first batch fills the shuffle buffer.
        loader.batches.recv().await?;
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
        let reporter = tokio::spawn(loader::report::report(
            loader.stats.clone(),
            loader.batches.clone(),
            None,
            Duration::from_secs(2),
            stop_rx,
        ));
        let rss_start = rss_mb();
        let t0 = Instant::now();
        let mut imgs = 0u64;
        while t0.elapsed().as_secs_f64() < seconds {
            let b = loader.batches.recv().await?;
            imgs += b.batch_size as u64;
        }
        let _ = stop_tx.send(());
        let _ = reporter.await;
        if let (Some(a), Some(b)) = (rss_start, rss_mb()) {
            eprintln!(
                "memory: {a:.0} MB resident after warm-up, {b:.0} MB at the end ({} epochs read)",
                loader
                    .stats
                    .images
                    .load(std::sync::atomic::Ordering::Relaxed)
                    / loader.index.total_samples.max(1)
            );
        }
        let rate = imgs as f64 / t0.elapsed().as_secs_f64();
        let (p50, p99) = loader.stats.time_percentiles();
        anyhow::Ok((
            rate,
            format!(
                "sample time p50 {p50:.1} ms, p99 {p99:.1} ms, skipped {}",
                loader.stats.skipped.load(Ordering::Relaxed)
            ),
        ))
    })?;
    println!(
        "decode only:   {decode:8.1} images/s  ({:.1} per worker)",
        decode / workers as f64
    );
    println!(
        "full pipeline: {pipe:8.1} images/s  ({:.1} per worker; {stats_line})",
        pipe / workers as f64
    );
    println!("ratio full/decode: {:.2}", pipe / decode);
    Ok(())
}

fn main() -> ExitCode {
    let workers_default = std::thread::available_parallelism().map_or(1, |n| n.get());
    let result = match Cli::parse().command {
        Command::Bench {
            shards,
            preset,
            workers,
            seconds,
            batch_size,
            seed,
        } => bench(
            shards,
            &preset,
            workers.unwrap_or(workers_default),
            seconds,
            batch_size,
            seed,
        ),
        Command::Preview {
            shards,
            out,
            preset,
            count,
            cell,
            seed,
        } => preview(shards, &out, &preset, count, cell, seed),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
