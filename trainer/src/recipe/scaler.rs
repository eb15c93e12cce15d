//! fp16's dynamic loss scale: PyTorch's `GradScaler`, which the official code builds with its defaults
//! (`torch.cuda.amp.GradScaler()` in `main_dino.py`, on by default through `--use_fp16 true`).
//!
//! fp16 holds numbers down to 6e-8 (2^-24, subnormal), and the gradients of a ViT's activations often lie
//! below that: they would flush to zero. So the loss is multiplied by a large power of two before the
//! backward pass and the f32 gradients divided by it after, before the clip. When a scaled gradient
//! overflowed (an inf or NaN anywhere), the optimiser step is skipped: AdamW's moments, parameters and
//! step count stay as they were. Everything else of the step happens as usual, as in the official loop
//! where the teacher's EMA, the centers and the schedules' index live outside `scaler.step`. The scale
//! halves after a skipped step and doubles after `growth_interval` clean steps in a row.
//!
//! Scaling by a power of two and back is exact in f32 (short of overflow or subnormals), so with f32
//! compute a scaled step gives the unscaled step's numbers bit for bit: the tests use that as their
//! independent check.

use anyhow::{Result, bail};
use serde::{Deserialize, Serialize};

/// `run.grad_scaler`: the scaler's four constants, PyTorch's `GradScaler` defaults (the official code's).
/// Read only with `run.precision = "fp16"`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GradScalerConfig {
    /// The first scale, 2^16. A power of two keeps the scaling exact.
    pub init_scale: f64,
    /// The scale's factor after `growth_interval` clean steps.
    pub growth_factor: f64,
    /// The scale's factor after a step with a non-finite gradient.
    pub backoff_factor: f64,
    /// Clean steps in a row before the scale grows.
    pub growth_interval: u32,
}

impl Default for GradScalerConfig {
    fn default() -> Self {
        Self { init_scale: 65536.0, growth_factor: 2.0, backoff_factor: 0.5, growth_interval: 2000 }
    }
}

impl GradScalerConfig {
    pub fn validate(&self) -> Result<()> {
        let key = "run.grad_scaler";
        let f32_scale = self.init_scale as f32;
        if !(f32_scale.is_finite() && f32_scale >= f32::MIN_POSITIVE && self.init_scale <= f32::MAX as f64) {
            bail!("{key}.init_scale = {}: must be a positive, normal, finite f32", self.init_scale);
        }
        if !(self.growth_factor.is_finite() && self.growth_factor > 1.0) {
            bail!("{key}.growth_factor = {}: must be above 1", self.growth_factor);
        }
        if !(self.backoff_factor > 0.0 && self.backoff_factor < 1.0) {
            bail!("{key}.backoff_factor = {}: must be within (0, 1)", self.backoff_factor);
        }
        if self.growth_interval == 0 {
            bail!("{key}.growth_interval = 0: must be at least 1");
        }
        Ok(())
    }
}

/// The scaler: its constants (the run's config) and its state, which is what a checkpoint keeps so that a
/// resumed run scales as the uninterrupted one.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GradScaler {
    /// Not stored: a resumed run takes its constants from its config, which may have changed.
    #[serde(skip)]
    pub cfg: GradScalerConfig,
    /// The current scale, an f32 as PyTorch keeps it (`_scale`).
    pub scale: f32,
    /// Clean steps since the last growth or skip (`_growth_tracker`).
    pub growth_tracker: u32,
    /// Steps skipped since the run began (ours; PyTorch keeps no count).
    pub skipped: u64,
}

impl GradScaler {
    pub fn new(cfg: &GradScalerConfig) -> Self {
        Self { cfg: cfg.clone(), scale: cfg.init_scale as f32, growth_tracker: 0, skipped: 0 }
    }

    /// The factor that unscales the gradients: `1 / scale` computed in f64 and rounded to f32, as
    /// `unscale_` does (`scale.double().reciprocal().float()`).
    pub fn inv_scale(&self) -> f32 {
        (1.0 / self.scale as f64) as f32
    }

    /// After a step: `found_inf` when it was skipped. `torch._amp_update_scale_`: the products are
    /// taken in f64 and stored in f32; a growth that would overflow f32 is not taken.
    pub fn update(&mut self, found_inf: bool) {
        if found_inf {
            self.scale = (self.scale as f64 * self.cfg.backoff_factor) as f32;
            self.growth_tracker = 0;
            self.skipped += 1;
            return;
        }
        let successful = self.growth_tracker + 1;
        // PyTorch tests `==`; `>=` is the same there, and keeps growing when a resumed run lowered
        // `growth_interval` below the tracker it stored.
        if successful >= self.cfg.growth_interval {
            let grown = (self.scale as f64 * self.cfg.growth_factor) as f32;
            if grown.is_finite() {
                self.scale = grown;
            }
            self.growth_tracker = 0;
        } else {
            self.growth_tracker = successful;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The state machine against its closed form: from 2^16 with growth every 3 clean steps, the
    /// sequence of scales is written out by hand from PyTorch's rule.
    #[test]
    fn the_scale_halves_on_a_skip_and_doubles_after_the_interval() {
        let cfg = GradScalerConfig { growth_interval: 3, ..Default::default() };
        let mut s = GradScaler::new(&cfg);
        let skips = [true, true, false, false, false, false, true, false, false, false];
        let expected: [f32; 10] = [
            32768.0, 16384.0, // two skips
            16384.0, 16384.0, 32768.0, // three clean steps: grows on the third
            32768.0, // one clean step
            16384.0, // a skip resets the tracker
            16384.0, 16384.0, 32768.0,
        ];
        for (i, (&skip, &want)) in skips.iter().zip(&expected).enumerate() {
            s.update(skip);
            assert_eq!(s.scale, want, "after step {i}");
        }
        assert_eq!(s.skipped, 3);
        assert_eq!(s.growth_tracker, 0);
        assert_eq!(GradScaler::new(&Default::default()).inv_scale(), 1.0 / 65536.0);
    }

    #[test]
    fn a_growth_past_f32_is_not_taken() {
        let cfg = GradScalerConfig { init_scale: f32::MAX as f64, growth_interval: 1, ..Default::default() };
        let mut s = GradScaler::new(&cfg);
        s.update(false);
        assert_eq!(s.scale, f32::MAX);
        assert_eq!(s.growth_tracker, 0);
    }

    #[test]
    fn bad_constants_are_refused_by_name() {
        let bad = [
            GradScalerConfig { init_scale: 0.0, ..Default::default() },
            GradScalerConfig { init_scale: 1e39, ..Default::default() },
            GradScalerConfig { init_scale: 1e-46, ..Default::default() },
            GradScalerConfig { growth_factor: 1.0, ..Default::default() },
            GradScalerConfig { backoff_factor: 1.0, ..Default::default() },
            GradScalerConfig { growth_interval: 0, ..Default::default() },
        ];
        for cfg in bad {
            let e = cfg.validate().unwrap_err().to_string();
            assert!(e.starts_with("run.grad_scaler."), "{e}");
        }
        GradScalerConfig::default().validate().unwrap();
    }
}
