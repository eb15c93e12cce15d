//! Progress output: a bar with images/s and MB/s on a terminal, a plain line every few seconds otherwise
//! (so logs of batch jobs stay readable).

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

const PLAIN_EVERY: Duration = Duration::from_secs(10);

pub struct Progress {
    bar: Option<ProgressBar>,
    label: &'static str,
    total: u64,
    done: u64,
    bytes: u64,
    start: Instant,
    last_line: Instant,
    quiet: bool,
}

impl Progress {
    pub fn new(label: &'static str, total: u64, quiet: bool) -> Self {
        let bar = (!quiet && std::io::stderr().is_terminal()).then(|| {
            let bar = ProgressBar::new(total);
            let style = ProgressStyle::with_template(
                "{prefix} [{elapsed_precise}] {wide_bar} {pos}/{len} {per_sec} {msg} eta {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar());
            bar.set_style(style);
            bar.set_prefix(label);
            bar
        });
        let now = Instant::now();
        Progress { bar, label, total, done: 0, bytes: 0, start: now, last_line: now, quiet }
    }

    /// Records `n` more images and `bytes` more output bytes.
    pub fn inc(&mut self, n: u64, bytes: u64) {
        self.done += n;
        self.bytes += bytes;
        let secs = self.start.elapsed().as_secs_f64().max(1e-9);
        match &self.bar {
            Some(bar) => {
                bar.set_position(self.done);
                bar.set_message(format!("{:.1} MB/s", self.bytes as f64 / 1e6 / secs));
            }
            None if !self.quiet && self.last_line.elapsed() >= PLAIN_EVERY => {
                self.last_line = Instant::now();
                eprintln!(
                    "{}: {}/{} images, {:.0} images/s, {:.1} MB/s",
                    self.label,
                    self.done,
                    self.total,
                    self.done as f64 / secs,
                    self.bytes as f64 / 1e6 / secs
                );
            }
            None => {}
        }
    }

    pub fn finish(self) -> Duration {
        if let Some(bar) = self.bar {
            bar.finish_and_clear();
        }
        self.start.elapsed()
    }
}
