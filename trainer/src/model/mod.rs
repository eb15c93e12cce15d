//! The network one side of the distillation owns: backbone, CLS head and reference head
//! (the official `utils.MultiCropWrapper`, with DenseDINO's separate `ref_head`), and its forward over a
//! batch's views.

pub mod bicubic;
pub mod head;
pub mod params;
pub mod vit;

use burn::tensor::{Device, Tensor};
use rand_chacha::ChaCha8Rng;

use crate::model::head::{DinoHead, HeadConfig};
use crate::model::params::{ParamMut, Params};
use crate::model::vit::{Precision, Vit, VitConfig};

pub struct DenseDino {
    pub backbone: Vit,
    pub head: DinoHead,
    /// The separate reference head of the official code; `None` when the head is shared.
    pub ref_head: Option<DinoHead>,
}

/// One forward's logits. Views are in batch order `[view0 batch, view1 batch, …]`.
pub struct Logits {
    /// `[V' * B, K]` for the V' views this side saw.
    pub cls: Tensor<2>,
    /// `[V' * B * R, K]` (R reference tokens per view, group-major as the points), when points were given.
    pub refs: Option<Tensor<2>>,
}

impl DenseDino {
    /// `with_ref_head`: the reference loss is on and the head is not shared.
    pub fn new(
        vit_cfg: &VitConfig,
        head_cfg: &HeadConfig,
        with_ref_head: bool,
        rng: &mut ChaCha8Rng,
        device: &Device,
    ) -> Self {
        let backbone = Vit::new(vit_cfg, rng, device);
        let head = DinoHead::new(vit_cfg.embed_dim, head_cfg, rng, device);
        let ref_head = with_ref_head.then(|| DinoHead::new(vit_cfg.embed_dim, head_cfg, rng, device));
        Self { backbone, head, ref_head }
    }

    /// Sets the compute dtype of the backbone and the heads (`run.precision`).
    pub fn set_precision(&mut self, p: Precision) {
        self.backbone.precision = p;
        self.head.precision = p;
        if let Some(h) = &mut self.ref_head {
            h.precision = p;
        }
    }

    fn ref_head(&self) -> &DinoHead {
        self.ref_head.as_ref().unwrap_or(&self.head)
    }

    /// Runs the backbone once per run of same-size views (DINO's multi-crop wrapper), then each head once
    /// on the concatenation. `views[i]`: `[B, 3, S_i, S_i]` normalised pixels; `points[i]`: that view's
    /// reference points `[B * R * 2]` (x, y interleaved) or nothing; `drop`: whose stochastic depth to draw
    /// (the student), `None` for no drop (the teacher).
    pub fn forward(
        &self,
        views: &[Tensor<4>],
        points: Option<&[Vec<f32>]>,
        drop: Option<vit::DropKey>,
    ) -> Logits {
        let grid = self.backbone.cfg.grid();
        let mut cls = Vec::new();
        let mut refs = Vec::new();
        let mut start = 0;
        while start < views.len() {
            let size = views[start].dims()[2];
            let end = (start..views.len()).find(|&i| views[i].dims()[2] != size).unwrap_or(views.len());
            let x = Tensor::cat(views[start..end].to_vec(), 0); // [(end-start) * B, 3, S, S]
            let weights = points.map(|p| {
                let pts: Vec<f32> = p[start..end].concat();
                vit::ref_weights(&pts, grid, &x.device())
            });
            let batch = views[start].dims()[0];
            let drop = match drop {
                Some(key) => vit::drop_path_scales(&self.backbone.cfg, key, start..end, batch, &x.device()),
                None => Vec::new(),
            };
            let out = self.backbone.forward(x, weights, &drop, false);
            cls.push(out.cls);
            if let Some(r) = out.refs {
                let [n, r_count, d] = r.dims();
                refs.push(r.reshape([n * r_count, d]));
            }
            start = end;
        }
        let cls = self.head.forward(Tensor::cat(cls, 0));
        let refs = (!refs.is_empty()).then(|| self.ref_head().forward(Tensor::cat(refs, 0)));
        Logits { cls, refs }
    }
}

impl Params for DenseDino {
    fn visit(&mut self, prefix: &str, f: &mut dyn FnMut(&str, ParamMut<'_>)) {
        self.backbone.visit(&format!("{prefix}backbone."), f);
        self.head.visit(&format!("{prefix}head."), f);
        if let Some(h) = &mut self.ref_head {
            h.visit(&format!("{prefix}ref_head."), f);
        }
    }
}
