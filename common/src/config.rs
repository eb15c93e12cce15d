//! Config types shared by the loader and the trainer, read from TOML with unknown keys rejected.
//!
//! Every default is the official code's value (DenseDINO's `main_dino.py` and its README command); the doc
//! comment of each field says where it comes from.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// How reference points are placed in the overlap box of a view pair (`sampling_reference_point` in
/// DenseDINO's `main_dino.py`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SamplingMode {
    /// M uniform points per ordered pair, drawn independently for (g, v) and (v, g): the official default.
    Random,
    /// The k×k cell centres of the overlap box (M must be a square).
    Grid,
}

/// The multi-view augmentation and reference-point geometry of one sample.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ViewsConfig {
    /// Number of global (teacher) views. The method and its loss are defined for 2.
    pub num_global: usize,
    /// Output side of the global views in pixels (224 in both repos).
    pub global_size: usize,
    /// RandomResizedCrop area range of the global views: DINO (0.4, 1), the DenseDINO README (0.25, 1).
    pub global_scale: [f64; 2],
    /// Number of other (student-only) views: DINO 8, the paper's main run 2, the README run 4.
    pub num_local: usize,
    /// Output side of the other views: DINO 96, DenseDINO 224 (`--local_crops_size 224`).
    pub local_size: usize,
    /// RandomResizedCrop area range of the other views: DINO (0.05, 0.4), DenseDINO (0.4 or 0.25, 1).
    pub local_scale: [f64; 2],
    /// RandomResizedCrop aspect-ratio range, sampled log-uniform (torchvision's default 3/4..4/3).
    pub ratio: [f64; 2],
    /// M: reference points per ordered pair (g, v): the paper's main run 4, the README run 2.
    pub num_points: usize,
    pub sampling_mode: SamplingMode,
    /// Overlap lower bound: a non-global view must overlap each global view by more than
    /// floor(min_overlap · W · H) pixels (Leopart's `min_intersection = 0.01`).
    pub min_overlap: f64,
    /// The second global view must overlap the first by more than this many times that bound (2 in the code).
    pub global_overlap_factor: f64,
    /// The official redraw loop has no cap; we stop after this many redraws and fall back to the view that
    /// overlapped best (documented in the loader), so a tiny or thin image cannot loop forever.
    pub max_redraws: usize,
    /// Horizontal flip probability.
    pub flip_p: f64,
    /// Probability of applying ColorJitter at all.
    pub jitter_p: f64,
    pub brightness: f64,
    pub contrast: f64,
    pub saturation: f64,
    pub hue: f64,
    /// RandomGrayscale probability (3-channel output, ITU-R 601-2 luma).
    pub grayscale_p: f64,
    /// Gaussian blur probability for [global view 0, global view 1, other views].
    pub blur_p: [f64; 3],
    /// Blur sigma range (PIL's radius is the sigma).
    pub blur_sigma: [f64; 2],
    /// Solarise probability for [global view 0, global view 1, other views].
    pub solarize_p: [f64; 3],
    /// Pixels at or above this value are inverted by solarise (PIL's default 128).
    pub solarize_threshold: u8,
}

impl Default for ViewsConfig {
    fn default() -> Self {
        Self::paper_main()
    }
}

/// The largest view side: 4096 px is ~50 MB of f32 per view, far past any ViT recipe (224 to 518).
pub const MAX_VIEW_SIZE: usize = 4096;
/// The most local views: DINO uses up to 10; each is a forward pass per sample.
pub const MAX_LOCAL_VIEWS: usize = 64;
/// The most reference points per view pair: the paper uses 4 and 9; each is a token in every block.
pub const MAX_POINTS: usize = 1024;

impl ViewsConfig {
    /// The paper's main run: 4 views at 224, scale 0.4 to 1, M = 4 (the paper's §4.1).
    pub fn paper_main() -> Self {
        ViewsConfig {
            num_global: 2,
            global_size: 224,
            global_scale: [0.4, 1.0],
            num_local: 2,
            local_size: 224,
            local_scale: [0.4, 1.0],
            ratio: [3.0 / 4.0, 4.0 / 3.0],
            num_points: 4,
            sampling_mode: SamplingMode::Random,
            min_overlap: 0.01,
            global_overlap_factor: 2.0,
            max_redraws: 1000,
            flip_p: 0.5,
            jitter_p: 0.8,
            brightness: 0.4,
            contrast: 0.4,
            saturation: 0.2,
            hue: 0.1,
            grayscale_p: 0.2,
            blur_p: [1.0, 0.1, 0.5],
            blur_sigma: [0.1, 2.0],
            solarize_p: [0.0, 0.2, 0.0],
            solarize_threshold: 128,
        }
    }

    /// The official README command: 6 views at 224, scale 0.25 to 1, M = 2.
    pub fn readme_ablation() -> Self {
        ViewsConfig {
            global_scale: [0.25, 1.0],
            num_local: 4,
            local_scale: [0.25, 1.0],
            num_points: 2,
            ..Self::paper_main()
        }
    }

    /// Plain DINO: 2 × 224 global views plus 8 × 96 local views, scale 0.05 to 0.4 (DINO's `main_dino.py`
    /// defaults).
    pub fn dino() -> Self {
        ViewsConfig { num_local: 8, local_size: 96, local_scale: [0.05, 0.4], ..Self::paper_main() }
    }

    /// A preset by name: `paper-main`, `readme-ablation` or `dino`.
    pub fn preset(name: &str) -> Result<Self> {
        match name {
            "paper-main" => Ok(Self::paper_main()),
            "readme-ablation" => Ok(Self::readme_ablation()),
            "dino" => Ok(Self::dino()),
            other => Err(Error::invalid(
                "views.preset",
                other,
                "no such preset (expected paper-main, readme-ablation or dino)",
            )),
        }
    }

    pub fn num_views(&self) -> usize {
        self.num_global + self.num_local
    }

    /// Output side of view `v`.
    pub fn view_size(&self, v: usize) -> usize {
        if v < self.num_global { self.global_size } else { self.local_size }
    }

    /// Checks the ranges a run depends on, so a bad value stops at start-up with one clear line naming
    /// its key.
    pub fn validate(&self) -> Result<()> {
        let bad = |key: &str, value: &dyn std::fmt::Debug, problem: &str| {
            Err(Error::invalid(format!("views.{key}"), value, problem))
        };
        if self.num_global != 2 {
            return bad("num_global", &self.num_global, "the method is defined for 2 global views");
        }
        for (key, range) in [
            ("global_scale", self.global_scale),
            ("local_scale", self.local_scale),
            ("ratio", self.ratio),
            ("blur_sigma", self.blur_sigma),
        ] {
            let [lo, hi] = range;
            if !(lo > 0.0 && lo <= hi && hi.is_finite()) {
                return bad(key, &range, "need 0 < low <= high, both finite");
            }
        }
        // The blur kernel's radius grows with sigma (torchvision's kernel of 9 px at 224 holds sigma
        // 2); past 100 px it is an allocation, not a blur.
        if self.blur_sigma[1] > 100.0 {
            return bad("blur_sigma", &self.blur_sigma, "at most 100");
        }
        if self.ratio[0] < 1e-3 || self.ratio[1] > 1e3 {
            return bad("ratio", &self.ratio, "aspect ratios lie within [0.001, 1000]");
        }
        for (key, range) in [("global_scale", self.global_scale), ("local_scale", self.local_scale)] {
            if range[1] > 1.0 {
                return bad(key, &range, "the upper bound is an area fraction, at most 1");
            }
        }
        // Upper bounds: each sizes an allocation per sample (views, reference tokens, the masked
        // attention's rows), so a typo must be refused, not allocated.
        for (key, size) in [("global_size", self.global_size), ("local_size", self.local_size)] {
            if !(1..=MAX_VIEW_SIZE).contains(&size) {
                return bad(key, &size, &format!("must be within 1..={MAX_VIEW_SIZE} pixels"));
            }
        }
        if self.num_local > MAX_LOCAL_VIEWS {
            return bad("num_local", &self.num_local, &format!("at most {MAX_LOCAL_VIEWS}"));
        }
        if !(1..=MAX_POINTS).contains(&self.num_points) {
            return bad("num_points", &self.num_points, &format!("must be within 1..={MAX_POINTS}"));
        }
        if self.sampling_mode == SamplingMode::Grid {
            let k = (self.num_points as f64).sqrt().round() as usize;
            if k * k != self.num_points {
                return bad("num_points", &self.num_points, "must be a square in grid mode");
            }
        }
        for (key, probs) in [
            ("flip_p", std::slice::from_ref(&self.flip_p)),
            ("jitter_p", std::slice::from_ref(&self.jitter_p)),
            ("grayscale_p", std::slice::from_ref(&self.grayscale_p)),
            ("blur_p", &self.blur_p),
            ("solarize_p", &self.solarize_p),
        ] {
            if probs.iter().any(|p| !(0.0..=1.0).contains(p)) {
                return bad(key, &probs, "a probability must lie in [0, 1]");
            }
        }
        if !(0.0..1.0).contains(&self.min_overlap) {
            return bad("min_overlap", &self.min_overlap, "must lie in [0, 1)");
        }
        // A range test, so that NaN is refused too; infinity has no meaning as a jitter strength.
        for (key, value) in [
            ("global_overlap_factor", self.global_overlap_factor),
            ("brightness", self.brightness),
            ("contrast", self.contrast),
            ("saturation", self.saturation),
        ] {
            if !(0.0..=1e6).contains(&value) {
                return bad(key, &value, "must be a finite number >= 0");
            }
        }
        if !(0.0..=0.5).contains(&self.hue) {
            return bad("hue", &self.hue, "must lie in [0, 0.5]");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_match_the_spec() {
        let p = ViewsConfig::paper_main();
        assert_eq!((p.num_views(), p.view_size(3), p.num_points, p.global_scale), (4, 224, 4, [0.4, 1.0]));
        let r = ViewsConfig::readme_ablation();
        assert_eq!((r.num_views(), r.view_size(5), r.num_points, r.local_scale), (6, 224, 2, [0.25, 1.0]));
        let d = ViewsConfig::dino();
        assert_eq!(
            (d.num_views(), d.view_size(1), d.view_size(2), d.local_scale),
            (10, 224, 96, [0.05, 0.4])
        );
        for c in [p, r, d] {
            c.validate().unwrap();
        }
    }

    #[test]
    fn toml_rejects_unknown_keys_and_keeps_defaults() {
        let err = toml::from_str::<ViewsConfig>("num_pionts = 2").unwrap_err().to_string();
        assert!(err.contains("num_pionts"), "{err}");
        let c: ViewsConfig = toml::from_str("num_points = 9\nsampling_mode = \"grid\"").unwrap();
        assert_eq!((c.num_points, c.global_size), (9, 224));
        c.validate().unwrap();
        let bad: ViewsConfig = toml::from_str("num_points = 8\nsampling_mode = \"grid\"").unwrap();
        let err = bad.validate().unwrap_err().to_string();
        assert!(err.contains("views.num_points = 8") && err.contains("square"), "{err}");
        let err = ViewsConfig::preset("dinov2").unwrap_err().to_string();
        assert!(err.contains("views.preset = \"dinov2\""), "{err}");
    }
}
