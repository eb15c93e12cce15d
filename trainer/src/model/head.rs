//! DINO's projection head (`DINOHead` in `vision_transformer.py`): a 3-layer MLP, L2 normalisation, and a
//! weight-normalised last layer without bias whose gain is fixed at 1 when `norm_last_layer`.

use burn::tensor::{Device, Tensor};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::model::params::{self, ParamMut, Params};
use crate::model::vit::{self, Linear, Precision};

/// `F.normalize`'s epsilon: the norm is clamped from below before dividing.
const L2_EPS: f64 = 1e-12;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeadConfig {
    /// K: prototypes. 65536 in DINO; smaller sets converge faster on small data (dino #279).
    pub out_dim: usize,
    /// MLP hidden width (2048).
    pub hidden_dim: usize,
    /// Bottleneck before the L2 normalisation (256).
    pub bottleneck_dim: usize,
    /// MLP layers (3).
    pub nlayers: usize,
    /// Freeze the weight-norm gain at 1 (cosine logits in [-1, 1]); DINO's README turns it off for ViT-S
    /// "boost" runs.
    pub norm_last_layer: bool,
    /// The paper's "shared projection head": one head for CLS and reference tokens. Off by default: the
    /// official code builds a separate `ref_head` (in its `main_dino.py`).
    pub shared_ref_head: bool,
}

impl Default for HeadConfig {
    fn default() -> Self {
        Self {
            out_dim: 65536,
            hidden_dim: 2048,
            bottleneck_dim: 256,
            nlayers: 3,
            norm_last_layer: true,
            shared_ref_head: false,
        }
    }
}

pub struct DinoHead {
    /// Linear(D, hidden), GELU, …, Linear(hidden, bottleneck).
    pub mlp: Vec<Linear>,
    /// `weight_v` in burn's layout `[bottleneck, K]`; each output column is normalised over the input dim.
    pub last_v: Tensor<2>,
    /// `weight_g` `[1, K]`: present (trainable) only without `norm_last_layer`; otherwise fixed at 1.
    pub last_g: Option<Tensor<2>>,
    /// The compute dtype of the MLP and the last matmul (the normalisations stay f32).
    pub precision: Precision,
}

impl DinoHead {
    pub fn new(in_dim: usize, cfg: &HeadConfig, rng: &mut ChaCha8Rng, device: &Device) -> Self {
        let mut dims = vec![in_dim];
        dims.extend(std::iter::repeat_n(cfg.hidden_dim, cfg.nlayers.saturating_sub(1)));
        dims.push(cfg.bottleneck_dim);
        let mlp = dims
            .windows(2)
            .map(|w| Linear {
                weight: params::param(params::trunc_normal(w[0] * w[1], 0.02, rng), [w[0], w[1]], device),
                bias: params::param(vec![0.0; w[1]], [w[1]], device),
            })
            .collect();
        // `v` keeps PyTorch's default Linear init: the head's trunc-normal init ran before it was created.
        let bound = 1.0 / (cfg.bottleneck_dim as f64).sqrt();
        let last_v = params::param(
            params::uniform(cfg.bottleneck_dim * cfg.out_dim, bound, rng),
            [cfg.bottleneck_dim, cfg.out_dim],
            device,
        );
        let last_g =
            (!cfg.norm_last_layer).then(|| params::param(vec![1.0; cfg.out_dim], [1, cfg.out_dim], device));
        Self { mlp, last_v, last_g, precision: Precision::F32 }
    }

    /// `[n, D]` → logits `[n, K]`.
    pub fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        let last = self.mlp.len() - 1;
        let p = self.precision;
        let mut h = x;
        for (i, layer) in self.mlp.iter().enumerate() {
            h = layer.forward(h, p);
            if i < last {
                h = crate::fused::gelu(h);
            }
        }
        let h = vit::f32(h); // [n, bottleneck]
        let norm = h.clone().square().sum_dim(1).sqrt().clamp_min(L2_EPS); // [n, 1]
        let h = h / norm; // [n, bottleneck]
        let v_norm = self.last_v.clone().square().sum_dim(0).sqrt(); // [1, K]
        let w = self.last_v.clone() / v_norm; // [bottleneck, K]
        let logits = vit::f32(p.compute(h).matmul(p.compute(w))); // [n, K]
        match &self.last_g {
            Some(g) => logits * g.clone(),
            None => logits,
        }
    }
}

impl Params for DinoHead {
    fn visit(&mut self, prefix: &str, f: &mut dyn FnMut(&str, ParamMut<'_>)) {
        // `mlp.0`, `mlp.2`, `mlp.4`: the indices of the official nn.Sequential (GELUs in between).
        for (i, layer) in self.mlp.iter_mut().enumerate() {
            f(&format!("{prefix}mlp.{}.weight", 2 * i), ParamMut::R2(&mut layer.weight));
            f(&format!("{prefix}mlp.{}.bias", 2 * i), ParamMut::R1(&mut layer.bias));
        }
        f(&format!("{prefix}last_layer.weight_v"), ParamMut::R2(&mut self.last_v));
        if let Some(g) = &mut self.last_g {
            f(&format!("{prefix}last_layer.weight_g"), ParamMut::R2(g));
        }
    }
}
