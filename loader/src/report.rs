//! The loader's stats line: images/s, batches/s, queue depth, per-sample time p50/p99, skipped
//! samples and damaged shards. On a terminal it is the message of a progress bar (or spinner, when the
//! length is open); otherwise a plain line every few seconds, so logs of batch jobs stay readable.

use std::io::IsTerminal;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

use crate::pipeline::Stats;

/// One stats line from counters and the batch queue.
pub fn stats_line(stats: &Stats, elapsed: Duration, queue: usize, capacity: usize) -> String {
    let secs = elapsed.as_secs_f64().max(1e-9);
    let (p50, p99) = stats.time_percentiles();
    let images = stats.images.load(Ordering::Relaxed) as f64;
    let batches = stats.batches.load(Ordering::Relaxed) as f64;
    let mut line = format!(
        "{:.0} images/s, {:.2} batches/s, queue {queue}/{capacity}, sample p50 {p50:.1} ms p99 {p99:.1} ms, skipped {}",
        images / secs,
        batches / secs,
        stats.skipped.load(Ordering::Relaxed)
    );
    // Rare events, shown only once they happen.
    let fallbacks = stats.overlap_fallbacks.load(Ordering::Relaxed);
    let damaged = stats.truncated_shards.load(Ordering::Relaxed);
    if fallbacks > 0 {
        line.push_str(&format!(", overlap fallbacks {fallbacks}"));
    }
    if damaged > 0 {
        let lost = stats.lost_samples.load(Ordering::Relaxed);
        let s = if lost == 1 { "" } else { "s" };
        line.push_str(&format!(", damaged shards {damaged} ({lost} sample{s} lost)"));
    }
    line
}

/// Reports on `stats` until `stop` resolves: a bar of `total` batches (or a spinner) on a terminal,
/// a plain stderr line every `every` otherwise.
pub async fn report(
    stats: Arc<Stats>,
    batches: async_channel::Receiver<common::Batch>,
    total: Option<u64>,
    every: Duration,
    stop: tokio::sync::oneshot::Receiver<()>,
) {
    let start = Instant::now();
    let bar = std::io::stderr().is_terminal().then(|| {
        let bar = match total {
            Some(n) => ProgressBar::new(n),
            None => ProgressBar::new_spinner(),
        };
        let template = if total.is_some() {
            "loader [{elapsed_precise}] {wide_bar} {pos}/{len} batches {msg}"
        } else {
            "loader [{elapsed_precise}] {pos} batches {msg}"
        };
        bar.set_style(
            ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar
    });
    let tick = if bar.is_some() { Duration::from_millis(250) } else { every };
    let mut stop = stop;
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = tokio::time::sleep(tick) => {}
        }
        let line = stats_line(&stats, start.elapsed(), batches.len(), batches.capacity().unwrap_or(0));
        match &bar {
            Some(bar) => {
                bar.set_position(stats.batches.load(Ordering::Relaxed));
                bar.set_message(line);
            }
            None => eprintln!("loader: {line}"),
        }
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
}
