//! DINO's per-iteration schedules (`utils.cosine_scheduler`), as closed forms indexed by
//! the global iteration `it = epoch * iters_per_epoch + i` instead of materialised arrays.

use serde::{Deserialize, Serialize};

use crate::recipe::optim::OptimConfig;

/// The three per-iteration schedules of a run.
#[derive(Clone, Debug)]
pub struct Schedules {
    pub iters_per_epoch: usize,
    pub lr: Cosine,
    pub wd: Cosine,
    pub momentum: Cosine,
}

impl Schedules {
    pub fn new(cfg: &OptimConfig, epochs: usize, iters_per_epoch: usize, total_batch: usize) -> Self {
        let base_lr = cfg.lr * total_batch as f64 / 256.0;
        Self {
            iters_per_epoch,
            lr: Cosine::new(base_lr, cfg.min_lr, epochs, iters_per_epoch, cfg.warmup_epochs, 0.0),
            wd: Cosine::new(cfg.weight_decay, cfg.weight_decay_end, epochs, iters_per_epoch, 0, 0.0),
            momentum: Cosine::new(cfg.momentum_teacher, 1.0, epochs, iters_per_epoch, 0, 0.0),
        }
    }
}

/// Linear warmup from `start_warmup` to `base` over `warmup_iters` (numpy's inclusive `linspace`), then a
/// half cosine from `base` to `final_value` over the remaining `total - warmup_iters` iterations:
/// `final + ½(base − final)(1 + cos(π·j/(T−W)))`, so the last value sits slightly above `final_value`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Cosine {
    pub base: f64,
    pub final_value: f64,
    pub total_iters: usize,
    pub warmup_iters: usize,
    pub start_warmup: f64,
}

impl Cosine {
    pub fn new(
        base: f64,
        final_value: f64,
        epochs: usize,
        iters_per_epoch: usize,
        warmup_epochs: usize,
        start_warmup: f64,
    ) -> Self {
        Self {
            base,
            final_value,
            total_iters: epochs * iters_per_epoch,
            warmup_iters: warmup_epochs * iters_per_epoch,
            start_warmup,
        }
    }

    /// The value at iteration `it` (clamped to the last iteration, as an array index past the end would
    /// be an error in the reference but a resumed run may step once more).
    pub fn at(&self, it: usize) -> f64 {
        let w = self.warmup_iters;
        if it < w {
            // numpy.linspace(start, stop, w): start + i * (stop - start) / (w - 1); the last one is stop.
            if w == 1 || it == w - 1 {
                return self.base;
            }
            return self.start_warmup + it as f64 * (self.base - self.start_warmup) / (w - 1) as f64;
        }
        let span = self.total_iters.saturating_sub(w).max(1);
        let j = (it - w).min(span - 1);
        self.final_value
            + 0.5
                * (self.base - self.final_value)
                * (1.0 + (std::f64::consts::PI * j as f64 / span as f64).cos())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closed_forms_at_first_warmup_boundary_and_last() {
        // DINO defaults at batch 512: lr 5e-4 * 512/256, 100 epochs, 10 warmup, min 1e-6, 2502 iters/epoch.
        let ipe = 2502;
        let lr = Cosine::new(5e-4 * 512.0 / 256.0, 1e-6, 100, ipe, 10, 0.0);
        let (w, t) = (10 * ipe, 100 * ipe);
        assert_eq!(lr.at(0), 0.0);
        assert!((lr.at(1) - 1e-3 / (w - 1) as f64).abs() < 1e-18);
        assert_eq!(lr.at(w - 1), 1e-3, "inclusive linspace reaches the base at the last warmup step");
        assert_eq!(lr.at(w), 1e-3, "cosine starts at base with j = 0");
        let last = 1e-6
            + 0.5
                * (1e-3 - 1e-6)
                * (1.0 + (std::f64::consts::PI * (t - w - 1) as f64 / (t - w) as f64).cos());
        assert!((lr.at(t - 1) - last).abs() < 1e-18);
        assert!(lr.at(t - 1) > 1e-6 && lr.at(t - 1) < 1.01e-6);

        let wd = Cosine::new(0.04, 0.4, 100, ipe, 0, 0.0);
        assert!((wd.at(0) - 0.04).abs() < 1e-15);
        assert!((wd.at(t / 2) - 0.22).abs() < 1e-12, "half way is the mean");
        let mom = Cosine::new(0.996, 1.0, 100, ipe, 0, 0.0);
        assert!((mom.at(0) - 0.996).abs() < 1e-15);
        assert!(mom.at(t - 1) < 1.0 && mom.at(t - 1) > 0.99999999);
    }
}
