//! What a run tells as it goes: a progress bar on a terminal (a stats line every `run.log_every` steps
//! otherwise), one record per step and per epoch in `metrics.jsonl` and the same numbers in TensorBoard's
//! event file, and the run's throughput at the end.

use std::io::IsTerminal;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Result;
use indicatif::{ProgressBar, ProgressStyle};

use crate::recipe::config::RunConfig;
use crate::recipe::step::StepMetrics;
use crate::run::metrics::{MetricsLog, Record};
use crate::run::tensorboard::EventWriter;

/// The run's voice: the progress bar or stats lines, the metrics file, the epoch's running sums and the
/// run's throughput.
pub struct Reporter {
    /// None on the ranks other than 0 of a data-parallel run (rank 0 writes the run's history).
    log: Option<MetricsLog>,
    /// This process's TensorBoard event file (rank 0, as the log).
    events: Option<EventWriter>,
    bar: Option<ProgressBar>,
    quiet: bool,
    log_every: usize,
    total_steps: usize,
    batch_size: usize,
    start: Instant,
    /// Over the whole run: time spent waiting for the loader, images trained on.
    wait: Duration,
    images: usize,
    epoch: EpochAccumulator,
}

impl Reporter {
    /// Appends to `run_dir/metrics.jsonl` (cut back to `first_step` on resume; no file when `run_dir` is
    /// `None`), writes a new TensorBoard event file there that drops earlier processes' steps from
    /// `first_step` on, and shows progress from `first_step` to `total_steps` unless `quiet`. Each step is
    /// `global_batch` images (`run.batch_size` on each of the job's ranks).
    pub fn new(
        run_dir: Option<&Path>,
        run: &RunConfig,
        global_batch: usize,
        first_step: usize,
        total_steps: usize,
        quiet: bool,
    ) -> Result<Self> {
        let bar = (!quiet && std::io::stderr().is_terminal()).then(|| {
            let bar = ProgressBar::new(total_steps as u64);
            bar.set_style(
                ProgressStyle::with_template(
                    "{bar:30} {pos}/{len} steps {elapsed_precise} (eta {eta}) {msg}",
                )
                .expect("template"),
            );
            bar.set_position(first_step as u64);
            bar
        });
        let log = run_dir.map(|d| MetricsLog::open(&d.join("metrics.jsonl"), first_step)).transpose()?;
        let events = run_dir.map(|d| EventWriter::create(d, Some(first_step))).transpose()?;
        // A run resumed inside an epoch continues that epoch's sums from the steps it logged before, so
        // the epoch's record is the same as an uninterrupted run's (its timings excepted).
        let mut epoch = EpochAccumulator::new();
        for r in log.iter().flat_map(|l| &l.kept) {
            match r {
                Record::Step { m, .. } => epoch.add_logged(m),
                Record::Epoch { .. } => epoch = EpochAccumulator::new(),
            }
        }
        Ok(Self {
            log,
            events,
            bar,
            quiet,
            log_every: run.log_every.max(1),
            total_steps,
            batch_size: global_batch,
            start: Instant::now(),
            wait: Duration::ZERO,
            images: 0,
            epoch,
        })
    }

    /// One finished step: its record, the progress bar or a stats line, the epoch's running sums.
    pub fn step(&mut self, m: &StepMetrics, step_time: Duration, wait: Duration) -> Result<()> {
        let step_time = step_time.as_secs_f64();
        self.wait += wait;
        self.images += self.batch_size;
        self.epoch.add(m, wait);
        self.write(&Record::Step {
            m: m.clone(),
            step_time,
            data_wait: wait.as_secs_f64(),
            images_per_s: self.batch_size as f64 / step_time,
        })?;
        let (ips, wait_fraction) = self.throughput();
        let line = stats_line(m, ips, step_time, wait_fraction);
        let done = m.it + 1;
        match &self.bar {
            Some(bar) => {
                bar.set_position(done as u64);
                bar.set_message(line);
            }
            None if !self.quiet && (m.it.is_multiple_of(self.log_every) || done == self.total_steps) => {
                eprintln!("{line}")
            }
            None => {}
        }
        Ok(())
    }

    /// The epoch of the last record kept from an earlier process, if that record is an epoch's end.
    pub fn last_epoch_logged(&self) -> Option<usize> {
        match self.log.as_ref()?.kept.last() {
            Some(Record::Epoch { epoch, .. }) => Some(*epoch),
            _ => None,
        }
    }

    /// The epoch that just ended after `steps` steps: its averages as one record.
    pub fn epoch_end(&mut self, epoch: usize, steps: usize) -> Result<()> {
        let record = self.epoch.record(epoch, steps, self.batch_size);
        self.epoch = EpochAccumulator::new();
        self.write(&record)
    }

    /// A record into the history and TensorBoard's file (where this process writes them).
    fn write(&mut self, record: &Record) -> Result<()> {
        if let Some(log) = &mut self.log {
            log.write(record)?;
        }
        if let Some(events) = &mut self.events {
            events.record(record)?;
        }
        Ok(())
    }

    /// Images per second and the fraction of the time spent waiting for data, over the run so far.
    pub fn throughput(&self) -> (f64, f64) {
        let secs = self.start.elapsed().as_secs_f64().max(1e-9);
        (self.images as f64 / secs, self.wait.as_secs_f64() / secs)
    }

    /// Clears the progress bar.
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// One epoch's running sums, for its averages. The losses cover every step of the epoch; the timings
/// only those of this process (`timed`), whose clock `start` is.
struct EpochAccumulator {
    start: Instant,
    wait: Duration,
    timed: usize,
    steps: usize,
    loss: f64,
    /// (sum, count) of the parts, which a step may lack (a loss switched off).
    cls: (f64, usize),
    refs: (f64, usize),
}

impl EpochAccumulator {
    fn new() -> Self {
        Self {
            start: Instant::now(),
            wait: Duration::ZERO,
            timed: 0,
            steps: 0,
            loss: 0.0,
            cls: (0.0, 0),
            refs: (0.0, 0),
        }
    }

    fn add(&mut self, m: &StepMetrics, wait: Duration) {
        self.timed += 1;
        self.wait += wait;
        self.add_logged(m);
    }

    /// A step of this epoch that an earlier process ran (read back from `metrics.jsonl` on resume).
    fn add_logged(&mut self, m: &StepMetrics) {
        self.steps += 1;
        self.loss += m.loss;
        for (acc, v) in [(&mut self.cls, m.cls_loss), (&mut self.refs, m.ref_loss)] {
            if let Some(v) = v {
                *acc = (acc.0 + v, acc.1 + 1);
            }
        }
    }

    fn record(&self, epoch: usize, steps: usize, batch_size: usize) -> Record {
        let secs = self.start.elapsed().as_secs_f64().max(1e-9);
        let mean = |(sum, n): (f64, usize)| (n > 0).then(|| sum / n as f64);
        Record::Epoch {
            epoch,
            steps,
            loss: mean((self.loss, self.steps)).unwrap_or(f64::NAN),
            cls_loss: mean(self.cls),
            ref_loss: mean(self.refs),
            images_per_s: (self.timed * batch_size) as f64 / secs,
            data_wait_fraction: self.wait.as_secs_f64() / secs,
        }
    }
}

/// The one-line summary of a step.
fn stats_line(m: &StepMetrics, images_per_s: f64, step_time: f64, wait_fraction: f64) -> String {
    let part = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.4}"));
    let scale = match (m.loss_scale, m.skipped_steps) {
        (Some(scale), Some(skipped)) => format!(" scale {scale} ({skipped} skipped)"),
        _ => String::new(),
    };
    format!(
        "ep {} it {} loss {:.4} (cls {} ref {}) lr {:.2e} wd {:.3} mom {:.5} T {:.3} H {:.2}{scale} | {:.1} img/s, \
         {:.3} s/step, data wait {:.0}%",
        m.epoch,
        m.it,
        m.loss,
        part(m.cls_loss),
        part(m.ref_loss),
        m.lr,
        m.weight_decay,
        m.momentum,
        m.teacher_temp,
        m.teacher_entropy,
        images_per_s,
        step_time,
        100.0 * wait_fraction
    )
}
