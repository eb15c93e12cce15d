//! The run's record: JSON lines per step and per epoch in `metrics.jsonl`, and PNG plots drawn from them
//! (`trainer plot RUN_DIR`, and at the end of every run).

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use plotters::prelude::*;
use serde::{Deserialize, Serialize};

use crate::recipe::step::StepMetrics;

/// One line of `metrics.jsonl`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Record {
    Step {
        #[serde(flatten)]
        m: StepMetrics,
        /// Seconds of this step (data wait included).
        step_time: f64,
        /// Seconds spent waiting for the loader before this step.
        data_wait: f64,
        images_per_s: f64,
    },
    Epoch {
        epoch: usize,
        steps: usize,
        loss: f64,
        cls_loss: Option<f64>,
        ref_loss: Option<f64>,
        images_per_s: f64,
        /// Fraction of the epoch's wall time spent waiting for data.
        data_wait_fraction: f64,
    },
}

/// Appends records; on resume, first drops the lines of steps at or after the resumed step (they will be
/// run again), so the file reads as one uninterrupted run.
pub struct MetricsLog {
    file: std::fs::File,
    /// The kept records (those before the resumed step), in order.
    pub kept: Vec<Record>,
}

impl MetricsLog {
    pub fn open(path: &Path, resume_from: usize) -> Result<Self> {
        let mut text = String::new();
        let mut kept = Vec::new();
        let (mut damaged, mut last_kept_line) = (vec![], 0);
        if let Ok(f) = std::fs::File::open(path) {
            for (n, line) in std::io::BufReader::new(f).split(b'\n').map_while(|l| l.ok()).enumerate() {
                // A line cut by a crash does not parse, and goes; said below when it held a kept step.
                let Ok(record) = serde_json::from_slice::<Record>(&line) else {
                    if !line.iter().all(u8::is_ascii_whitespace) {
                        damaged.push(n + 1);
                    }
                    continue;
                };
                let line = String::from_utf8_lossy(&line);
                let before = match &record {
                    Record::Step { m, .. } => m.it < resume_from,
                    Record::Epoch { steps, .. } => *steps <= resume_from,
                };
                if before {
                    text.push_str(&line);
                    text.push('\n');
                    kept.push(record);
                    last_kept_line = n + 1;
                }
            }
        }
        // The history must hold every step before the resumed one: a damaged line among them is a step
        // (or an epoch's summary) the rewrite below drops for good. A cut last line past the checkpoint is
        // the normal trace of a crash and goes silently.
        let steps: std::collections::BTreeSet<usize> = kept
            .iter()
            .filter_map(|r| match r {
                Record::Step { m, .. } => Some(m.it),
                _ => None,
            })
            .collect();
        let missing = (0..resume_from).filter(|s| !steps.contains(s)).count();
        let inside = damaged.iter().any(|&n| n < last_kept_line);
        if !damaged.is_empty() && (missing > 0 || inside) {
            eprintln!(
                "warning: {}: line(s) {} do not parse and are dropped ({missing} of the steps before {resume_from} \
                 are not in the history); the checkpoint, and so the run, is unaffected",
                path.display(),
                damaged.iter().map(|n| n.to_string()).collect::<Vec<_>>().join(", ")
            );
        }
        // The kept lines replace the file in one rename: a crash in between leaves the old history whole,
        // never a truncated one.
        shard::format::write_atomic(path, text.as_bytes())?;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        Ok(Self { file, kept })
    }

    pub fn write(&mut self, r: &Record) -> Result<()> {
        writeln!(self.file, "{}", serde_json::to_string(r)?)?;
        Ok(())
    }
}

pub fn read(path: &Path) -> Result<Vec<Record>> {
    let f = std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(std::io::BufReader::new(f)
        .lines()
        .map_while(|l| l.ok())
        .filter_map(|l| serde_json::from_str(&l).ok())
        .collect())
}

/// A font for the plots' text: ab_glyph draws from a TTF we hand it, so no system font library is linked.
fn register_font() -> bool {
    use std::sync::OnceLock;
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        let candidates = [
            "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
            "/usr/share/fonts/TTF/DejaVuSans.ttf",
            "/usr/share/fonts/dejavu/DejaVuSans.ttf",
            "/Library/Fonts/Arial.ttf",
            "C:\\Windows\\Fonts\\arial.ttf",
        ];
        for c in candidates {
            if let Ok(bytes) = std::fs::read(c) {
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                    return true;
                }
            }
        }
        false
    })
}

type Series = (&'static str, RGBColor, Vec<(f64, f64)>);

fn chart(path: &Path, title: &str, y_label: &str, series: &[Series]) -> Result<()> {
    let text = register_font();
    let root = BitMapBackend::new(path, (900, 500)).into_drawing_area();
    root.fill(&WHITE)?;
    let pts = series.iter().flat_map(|s| s.2.iter());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in pts {
        (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
    }
    if x0 > x1 {
        return Ok(()); // nothing to draw
    }
    let pad = ((y1 - y0) * 0.05).max(1e-9);
    let mut b = ChartBuilder::on(&root);
    b.margin(12);
    if text {
        b.caption(title, ("sans-serif", 22)).x_label_area_size(40).y_label_area_size(60);
    }
    let mut c = b.build_cartesian_2d(x0..x1.max(x0 + 1.0), (y0 - pad)..(y1 + pad))?;
    if text {
        c.configure_mesh().x_desc("step").y_desc(y_label).draw()?;
    } else {
        c.configure_mesh().disable_x_mesh().disable_y_mesh().draw()?;
    }
    for (name, color, data) in series {
        let s = c.draw_series(LineSeries::new(data.iter().copied(), color))?;
        if text {
            let color = *color;
            s.label(*name).legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        }
    }
    if text {
        c.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw()?;
    }
    root.present()?;
    Ok(())
}

/// Draws `loss.png` (total, CLS and reference loss), `schedules.png` (lr, weight decay, momentum and
/// teacher temperature, each over its own range) and `entropy.png` (collapse watch) into `run_dir`.
pub fn plot(run_dir: &Path) -> Result<Vec<PathBuf>> {
    let records = read(&run_dir.join("metrics.jsonl"))?;
    let steps: Vec<&StepMetrics> =
        records.iter().filter_map(|r| if let Record::Step { m, .. } = r { Some(m) } else { None }).collect();
    let xy = |f: &dyn Fn(&StepMetrics) -> Option<f64>| -> Vec<(f64, f64)> {
        steps.iter().filter_map(|m| f(m).map(|y| (m.it as f64, y))).collect()
    };
    let mut out = Vec::new();
    let p = run_dir.join("loss.png");
    chart(
        &p,
        "DenseDINO loss",
        "loss",
        &[
            ("total", BLUE, xy(&|m| Some(m.loss))),
            ("CLS", RED, xy(&|m| m.cls_loss)),
            ("reference", GREEN, xy(&|m| m.ref_loss)),
        ],
    )?;
    out.push(p);
    let norm = |v: Vec<(f64, f64)>| -> Vec<(f64, f64)> {
        let (lo, hi) = v.iter().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.1), b.max(p.1)));
        v.into_iter().map(|(x, y)| (x, if hi > lo { (y - lo) / (hi - lo) } else { 0.5 })).collect()
    };
    let p = run_dir.join("schedules.png");
    chart(
        &p,
        "Schedules (each scaled to its own min..max)",
        "fraction of range",
        &[
            ("lr", BLUE, norm(xy(&|m| Some(m.lr)))),
            ("weight decay", RED, norm(xy(&|m| Some(m.weight_decay)))),
            ("teacher momentum", GREEN, norm(xy(&|m| Some(m.momentum)))),
            ("teacher temp", MAGENTA, norm(xy(&|m| Some(m.teacher_temp)))),
        ],
    )?;
    out.push(p);
    let p = run_dir.join("entropy.png");
    chart(
        &p,
        "Teacher target entropy (nats; ln K = uniform collapse)",
        "entropy",
        &[
            ("per sample", BLUE, xy(&|m| Some(m.teacher_entropy))),
            ("of the batch mean", RED, xy(&|m| Some(m.teacher_batch_entropy))),
        ],
    )?;
    out.push(p);
    Ok(out)
}
