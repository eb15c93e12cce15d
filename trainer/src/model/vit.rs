//! The Vision Transformer of DINO with DenseDINO's reference tokens (the official `vision_transformer.py` of
//! DINO and DenseDINO; the paper's §3.2).
//!
//! Token layout of the official code: `[CLS, REF_1..REF_R, PATCH_1..PATCH_N]` with an additive mask in every
//! block. With the default mask `all2pos_pos2cls_eye` nothing attends to a reference token and a reference
//! token attends to itself and the patches only, so the CLS and patch path is exactly a plain ViT.
//! [`Vit::forward`] uses that: the sequence is `[CLS, PATCH.., REF..]` and each block's attention is one
//! fused op ([`fused::attention`]) in which the first 1 + N rows attend to each other only and each
//! reference row to the patches and itself; no `[S, S]` mask is ever built on flex. Every layer other than
//! the attention (LayerNorms, qkv, proj, MLP) runs once on the whole sequence.
//! [`Vit::forward_masked`] is the literal `(1+R+N)^2` masked formulation: the test oracle, and the path for
//! the other mask modes.
//!
//! Shapes: B batch, T = 1 + N tokens, R reference tokens, D width, H heads, dh = D / H.

use burn::tensor::activation::softmax;
use burn::tensor::module::conv2d;
use burn::tensor::ops::ConvOptions;
use burn::tensor::{DType, Device, Int, Tensor, TensorData};
use common::seed;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::fused;
use crate::model::bicubic;
use crate::model::params::{self, ParamMut, Params};

/// LayerNorm epsilon of DINO's ViT (`partial(nn.LayerNorm, eps=1e-6)`).
pub const LN_EPS: f64 = 1e-6;
/// ImageNet normalisation (the last step of `DataAugmentationDINO` in `main_dino.py`).
pub const MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const STD: [f32; 3] = [0.229, 0.224, 0.225];

/// Which tokens may attend to which (DenseDINO's `--mask_mode`, in its `vision_transformer.py`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MaskMode {
    /// `020` in the official code: full attention; reference tokens perturb CLS and patches.
    None,
    /// Nobody sees reference tokens; a reference token sees CLS and patches but not itself.
    All2pos,
    /// As `all2pos`, and a reference token does not see CLS either.
    All2posPos2cls,
    /// The official README's mode: a reference token sees itself and the patches; nothing sees it.
    All2posPos2clsEye,
    /// Every row loses CLS and reference columns, then the diagonal is restored (changes the plain path).
    AllQuery,
}

/// The backbone's hyperparameters. `vit_tiny`/`vit_small`/`vit_base` give DINO's sizes
/// (`vision_transformer.py`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VitConfig {
    /// D: 192 (Tiny), 384 (Small), 768 (Base).
    pub embed_dim: usize,
    /// Blocks: 12 for every size in the paper.
    pub depth: usize,
    /// Heads; head_dim = embed_dim / num_heads = 64 for every size in the paper.
    pub num_heads: usize,
    /// 16 (the code default; 8 is supported by the official code too).
    pub patch_size: usize,
    /// The size the positional grid is learned at (the official model always has 224: a 14x14 grid).
    /// Views of any other size get that grid bicubically resized (`interpolate_pos_encoding`), while
    /// reference tokens always sample the learned grid at their point. Setting it to the view size
    /// instead (our earlier CPU configs: 7x7 at 112 px) learns a coarser grid that needs no resize.
    pub img_size: usize,
    /// MLP hidden width = mlp_ratio * D (4 in DINO).
    pub mlp_ratio: usize,
    /// Stochastic depth: block i drops with `linspace(0, rate, depth)[i]`; the student uses 0.1, the
    /// teacher 0.
    pub drop_path_rate: f64,
    /// The attention mask of the reference tokens; `all2pos_pos2cls_eye` takes the efficient path.
    pub mask_mode: MaskMode,
    /// `--with_learnable_token`: one shared learnable content vector instead of zeros (off in the
    /// README's run).
    pub learnable_ref_token: bool,
    /// `--detach_pos_embed`: no gradient from reference tokens into the positional embedding.
    pub detach_pos_embed: bool,
    /// Not in the official code: a fixed 2-D sine-cosine positional embedding (MoCo v3's, MAE's) instead
    /// of the learned one, never trained. Reference tokens are made of the positional embedding alone,
    /// and a learned one that has not yet grown spatial structure (short runs: it stays at its 0.02
    /// initial scale, ~30x below the patch content) cannot tell them where they are; a fixed one can
    /// from the first step. An experiment on that cause, off by default.
    #[serde(default)]
    pub sincos_pos_embed: bool,
}

impl VitConfig {
    fn sized(embed_dim: usize, num_heads: usize) -> Self {
        Self {
            embed_dim,
            depth: 12,
            num_heads,
            patch_size: 16,
            img_size: 224,
            mlp_ratio: 4,
            drop_path_rate: 0.1,
            mask_mode: MaskMode::All2posPos2clsEye,
            learnable_ref_token: false,
            detach_pos_embed: false,
            sincos_pos_embed: false,
        }
    }
    pub fn vit_tiny() -> Self {
        Self::sized(192, 3)
    }
    pub fn vit_small() -> Self {
        Self::sized(384, 6)
    }
    pub fn vit_base() -> Self {
        Self::sized(768, 12)
    }
    /// By name, as the official `--arch`.
    pub fn arch(name: &str) -> Option<Self> {
        match name {
            "vit_tiny" => Some(Self::vit_tiny()),
            "vit_small" => Some(Self::vit_small()),
            "vit_base" => Some(Self::vit_base()),
            _ => None,
        }
    }
    /// Side of the learned positional grid (14 for 224 / 16).
    pub fn grid(&self) -> usize {
        self.img_size / self.patch_size
    }
    /// Every value in its range; errors name the key (`model.…`).
    pub fn validate(&self) -> anyhow::Result<()> {
        for (key, v) in [
            ("model.embed_dim", self.embed_dim),
            ("model.depth", self.depth),
            ("model.num_heads", self.num_heads),
            ("model.patch_size", self.patch_size),
            ("model.img_size", self.img_size),
            ("model.mlp_ratio", self.mlp_ratio),
        ] {
            if v == 0 {
                anyhow::bail!("{key} = 0: must be at least 1");
            }
        }
        if self.sincos_pos_embed && !self.embed_dim.is_multiple_of(4) {
            anyhow::bail!(
                "model.sincos_pos_embed needs model.embed_dim a multiple of 4, got {}",
                self.embed_dim
            );
        }
        if !self.embed_dim.is_multiple_of(self.num_heads) {
            anyhow::bail!(
                "model.embed_dim = {}: must be a multiple of model.num_heads {}",
                self.embed_dim,
                self.num_heads
            );
        }
        if !self.img_size.is_multiple_of(self.patch_size) {
            anyhow::bail!(
                "model.img_size = {}: must be a multiple of model.patch_size {}",
                self.img_size,
                self.patch_size
            );
        }
        if !(0.0..1.0).contains(&self.drop_path_rate) {
            anyhow::bail!("model.drop_path_rate = {}: must be within [0, 1)", self.drop_path_rate);
        }
        Ok(())
    }
}

/// The dtype matmuls and convolutions compute in (`run.precision`), as `torch.autocast` splits it on CUDA:
/// with `Bf16` or `Fp16` the linear layers, the patch convolution, attention and the head's last matmul
/// run in that dtype on casts of the f32 master weights, while LayerNorm, the residual stream, the L2 and
/// weight normalisations, softmax, the loss and the centers stay f32. Gradients reach the f32 weights
/// through the casts. `Fp16` also scales the loss ([`crate::recipe::scaler`]). LibTorch only: flex would
/// emulate both in f32, slower than f32 itself.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    #[default]
    F32,
    Bf16,
    /// `"fp16"` (the official `--use_fp16`), or `"f16"`.
    #[serde(rename = "fp16", alias = "f16")]
    Fp16,
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
            Precision::Fp16 => "fp16",
        })
    }
}

impl Precision {
    /// `x` in the compute dtype.
    pub fn compute<const D: usize>(self, x: Tensor<D>) -> Tensor<D> {
        match self {
            Precision::F32 => x,
            Precision::Bf16 => x.cast(DType::BF16),
            Precision::Fp16 => x.cast(DType::F16),
        }
    }
}

/// `x` back in f32 (a no-op when it is).
pub fn f32<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    x.cast(DType::F32)
}

/// `y = x W + b`, W stored `[in, out]` (burn's layout; export transposes to PyTorch's `[out, in]`).
pub struct Linear {
    pub weight: Tensor<2>,
    pub bias: Tensor<1>,
}

impl Linear {
    /// DINO's `_init_weights`: weight trunc_normal(std 0.02), bias 0.
    fn init_trunc(d_in: usize, d_out: usize, rng: &mut ChaCha8Rng, device: &Device) -> Self {
        Self {
            weight: params::param(params::trunc_normal(d_in * d_out, 0.02, rng), [d_in, d_out], device),
            bias: params::param(vec![0.0; d_out], [d_out], device),
        }
    }
    /// In the compute dtype `p` (the output stays in it).
    pub fn forward<const D: usize>(&self, x: Tensor<D>, p: Precision) -> Tensor<D> {
        fused::linear(p.compute(x), p.compute(self.weight.clone()), p.compute(self.bias.clone()))
    }
    fn visit(&mut self, prefix: &str, f: &mut dyn FnMut(&str, ParamMut<'_>)) {
        f(&format!("{prefix}.weight"), ParamMut::R2(&mut self.weight));
        f(&format!("{prefix}.bias"), ParamMut::R1(&mut self.bias));
    }
}

pub struct LayerNorm {
    pub weight: Tensor<1>,
    pub bias: Tensor<1>,
}

impl LayerNorm {
    fn init(d: usize, device: &Device) -> Self {
        Self {
            weight: params::param(vec![1.0; d], [d], device),
            bias: params::param(vec![0.0; d], [d], device),
        }
    }
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        fused::layer_norm(x, self.weight.clone(), self.bias.clone(), LN_EPS)
    }
    fn visit(&mut self, prefix: &str, f: &mut dyn FnMut(&str, ParamMut<'_>)) {
        f(&format!("{prefix}.weight"), ParamMut::R1(&mut self.weight));
        f(&format!("{prefix}.bias"), ParamMut::R1(&mut self.bias));
    }
}

/// One pre-norm block: `x + DropPath(Attn(LN1 x))`, then `x + DropPath(MLP(LN2 x))`.
pub struct Block {
    pub norm1: LayerNorm,
    pub qkv: Linear,
    pub proj: Linear,
    pub norm2: LayerNorm,
    pub fc1: Linear,
    pub fc2: Linear,
}

/// `[B, S, 3D]` → q, k, v each `[B, H, S, dh]` (PyTorch's `reshape(B, S, 3, H, dh)` order).
fn split_heads(qkv: Tensor<3>, heads: usize) -> [Tensor<4>; 3] {
    let [b, s, d3] = qkv.dims();
    let d = d3 / 3;
    let part = |i: usize| qkv.clone().narrow(2, i * d, d).reshape([b, s, heads, d / heads]).swap_dims(1, 2);
    [part(0), part(1), part(2)]
}

/// The CLS row of the attention over the patches, `[B, H, N]` (for attention maps; no reference rows
/// take part, so only the first `main` tokens are read).
fn cls_attention(qkv: Tensor<3>, heads: usize, main: usize) -> Tensor<3> {
    let [b, _, d3] = qkv.dims();
    let scale = ((d3 / 3 / heads) as f64).powf(-0.5);
    let [q, k, _] = split_heads(qkv.narrow(1, 0, main), heads); // [B, H, T, dh]
    // [B,H,1,dh] @ [B,H,dh,T] → [B,H,1,T]
    let logits = q.narrow(2, 0, 1).matmul(k.swap_dims(2, 3)).mul_scalar(scale);
    softmax(logits, 3).narrow(3, 1, main - 1).reshape([b, heads, main - 1])
}

/// `[B, H, S, dh]` → `[B, S, D]`.
fn merge_heads(x: Tensor<4>) -> Tensor<3> {
    let [b, h, s, dh] = x.dims();
    x.swap_dims(1, 2).reshape([b, s, h * dh])
}

/// Per-sample residual scale `[B, 1, 1]` (0 or 1/keep_prob), or none when the block never drops.
fn drop_residual(x: Tensor<3>, branch: Tensor<3>, drop: Option<&Tensor<3>>) -> Tensor<3> {
    match drop {
        Some(scale) => x + branch * scale.clone(),
        None => x + branch,
    }
}

impl Block {
    fn init(cfg: &VitConfig, rng: &mut ChaCha8Rng, device: &Device) -> Self {
        let d = cfg.embed_dim;
        let hidden = d * cfg.mlp_ratio;
        Self {
            norm1: LayerNorm::init(d, device),
            qkv: Linear::init_trunc(d, 3 * d, rng, device),
            proj: Linear::init_trunc(d, d, rng, device),
            norm2: LayerNorm::init(d, device),
            fc1: Linear::init_trunc(d, hidden, rng, device),
            fc2: Linear::init_trunc(hidden, d, rng, device),
        }
    }

    /// `drop`: the MLP branch's residual scales ([`BlockDrop::mlp`]).
    fn mlp(&self, x: Tensor<3>, p: Precision, drop: Option<&Tensor<3>>) -> Tensor<3> {
        let h = self.fc1.forward(self.norm2.forward(x.clone()), p); // [B, S, 4D]
        let h = f32(self.fc2.forward(fused::gelu(h), p)); // [B, S, D]
        drop_residual(x, h, drop)
    }

    /// The efficient path. `x`: `[B, S, D]`, the `main` = 1 + N tokens (CLS, patches) followed by the
    /// reference tokens. Returns the new `x` and, with `want_attn`, the CLS attention over the patches
    /// `[B, H, N]`.
    fn forward(
        &self,
        x: Tensor<3>,
        heads: usize,
        main: usize,
        p: Precision,
        drop: Option<&BlockDrop>,
        want_attn: bool,
    ) -> (Tensor<3>, Option<Tensor<3>>) {
        let qkv = self.qkv.forward(self.norm1.forward(x.clone()), p); // [B, S, 3D]
        let attn_map = want_attn.then(|| cls_attention(f32(qkv.clone()), heads, main));
        let o = fused::attention(qkv, heads, main); // [B, S, D]
        let x = drop_residual(x, f32(self.proj.forward(o, p)), drop.and_then(|d| d.attn.as_ref()));
        (self.mlp(x, p, drop.and_then(|d| d.mlp.as_ref())), attn_map)
    }

    /// The literal formulation: softmax(q kᵀ·scale + bias) v over the whole sequence; `bias` is `[T, T]`.
    fn forward_masked(
        &self,
        x: Tensor<3>,
        heads: usize,
        bias: &Tensor<4>,
        p: Precision,
        drop: Option<&BlockDrop>,
    ) -> Tensor<3> {
        let (probs, v) = self.attention_probs(x.clone(), heads, bias, p);
        let o = p.compute(probs).matmul(v);
        let x =
            drop_residual(x, f32(self.proj.forward(merge_heads(o), p)), drop.and_then(|d| d.attn.as_ref()));
        self.mlp(x, p, drop.and_then(|d| d.mlp.as_ref()))
    }

    /// The attention probabilities of [`Block::forward_masked`], `[B, H, S, S]`, and its values.
    fn attention_probs(
        &self,
        x: Tensor<3>,
        heads: usize,
        bias: &Tensor<4>,
        p: Precision,
    ) -> (Tensor<4>, Tensor<4>) {
        let d = x.dims()[2];
        let scale = ((d / heads) as f64).powf(-0.5);
        let [q, k, v] = split_heads(self.qkv.forward(self.norm1.forward(x), p), heads);
        // The scores' matmul in the compute dtype, the mask and softmax in f32 (as autocast).
        let logits = f32(q.matmul(k.swap_dims(2, 3))).mul_scalar(scale) + bias.clone(); // [B,H,S,S]
        (softmax(logits, 3), v)
    }

    fn visit(&mut self, prefix: &str, f: &mut dyn FnMut(&str, ParamMut<'_>)) {
        self.norm1.visit(&format!("{prefix}.norm1"), f);
        self.qkv.visit(&format!("{prefix}.attn.qkv"), f);
        self.proj.visit(&format!("{prefix}.attn.proj"), f);
        self.norm2.visit(&format!("{prefix}.norm2"), f);
        self.fc1.visit(&format!("{prefix}.mlp.fc1"), f);
        self.fc2.visit(&format!("{prefix}.mlp.fc2"), f);
    }
}

/// What a forward pass gives back.
pub struct VitOutput {
    /// CLS after the final norm: `[B, D]`.
    pub cls: Tensor<2>,
    /// Reference tokens after the final norm: `[B, R, D]`.
    pub refs: Option<Tensor<3>>,
    /// Patch tokens after the final norm (dense features): `[B, N, D]`.
    pub patches: Tensor<3>,
    /// The last block's CLS attention over the patches: `[B, H, N]` (when asked for).
    pub attn: Option<Tensor<3>>,
}

pub struct Vit {
    pub cfg: VitConfig,
    /// `[1, 1, D]`.
    pub cls_token: Tensor<3>,
    /// `[1, 1 + N0, D]`, DINO's layout (index 0 is the CLS position, N0 = grid²).
    pub pos_embed: Tensor<3>,
    /// `[D, 3, p, p]` and `[D]`: the patch-embedding convolution (kernel = stride = p).
    pub patch_weight: Tensor<4>,
    pub patch_bias: Tensor<1>,
    pub blocks: Vec<Block>,
    pub norm: LayerNorm,
    /// `[1, 1, D]`, only with `learnable_ref_token`.
    pub ref_token: Option<Tensor<3>>,
    /// The compute dtype of the forward passes (f32 unless set).
    pub precision: Precision,
}

impl Vit {
    pub fn new(cfg: &VitConfig, rng: &mut ChaCha8Rng, device: &Device) -> Self {
        let d = cfg.embed_dim;
        let n0 = cfg.grid() * cfg.grid();
        let fan_in = 3 * cfg.patch_size * cfg.patch_size;
        let bound = 1.0 / (fan_in as f64).sqrt(); // PyTorch's Conv2d default init (kaiming-uniform, a=√5)
        let mut pos_values = params::trunc_normal((1 + n0) * d, 0.02, rng);
        if cfg.sincos_pos_embed {
            pos_values = sincos_2d(cfg.grid(), d); // drawn anyway: the other weights stay as they were
        }
        let pos_embed = params::param(pos_values, [1, 1 + n0, d], device);
        let cls_token = params::param(params::trunc_normal(d, 0.02, rng), [1, 1, d], device);
        let patch_weight = params::param(
            params::uniform(d * fan_in, bound, rng),
            [d, 3, cfg.patch_size, cfg.patch_size],
            device,
        );
        let patch_bias = params::param(params::uniform(d, bound, rng), [d], device);
        let blocks = (0..cfg.depth).map(|_| Block::init(cfg, rng, device)).collect();
        // `--with_learnable_token`: zeros, then trunc_normal_(std 0.02), as the official model does. Drawn
        // after everything else, so that turning it on leaves the other initial weights as they were.
        let ref_token = cfg
            .learnable_ref_token
            .then(|| params::param(params::trunc_normal(d, 0.02, rng), [1, 1, d], device));
        Self {
            cfg: cfg.clone(),
            cls_token,
            pos_embed,
            patch_weight,
            patch_bias,
            blocks,
            norm: LayerNorm::init(d, device),
            ref_token,
            precision: Precision::F32,
        }
    }

    /// The positional embedding `[1, 1+N0, D]` as the forward uses it: detached when it is the fixed
    /// sine-cosine one, so it gets no gradient and the optimiser (no gradient, no update, no decay)
    /// leaves it as it is.
    fn pos(&self) -> Tensor<3> {
        if self.cfg.sincos_pos_embed { self.pos_embed.clone().detach() } else { self.pos_embed.clone() }
    }

    /// `[N0, D]`: the learned patch positions (no CLS).
    fn patch_pos(&self) -> Tensor<2> {
        let [_, t0, d] = self.pos_embed.dims();
        self.pos().narrow(1, 1, t0 - 1).reshape([t0 - 1, d])
    }

    /// `[h*w, D]`: the patch positions for an `h x w` patch grid; bicubically resized when it differs from
    /// the learned grid (DINO's `interpolate_pos_encoding`, +0.1 included, CLS position untouched).
    fn patch_pos_for(&self, h: usize, w: usize) -> Tensor<2> {
        let g = self.cfg.grid();
        let pos = self.patch_pos();
        if h == g && w == g {
            return pos;
        }
        let m = bicubic::pos_resize_matrix(g, h, w);
        let m = Tensor::<2>::from_data(TensorData::new(m, [h * w, g * g]), &pos.device());
        m.matmul(pos)
    }

    /// Patch embedding plus positions: `[B, 3, H, W]` → `[B, 1+N, D]` (CLS first).
    fn embed(&self, x: Tensor<4>) -> Tensor<3> {
        let [b, _, hh, ww] = x.dims();
        let p = self.cfg.patch_size;
        let d = self.cfg.embed_dim;
        let (h, w) = (hh / p, ww / p);
        let opts = ConvOptions::new([p, p], [0, 0], [1, 1], 1);
        let pr = self.precision;
        let (weight, bias) = (pr.compute(self.patch_weight.clone()), pr.compute(self.patch_bias.clone()));
        let patches = f32(conv2d(pr.compute(x), weight, Some(bias), opts)); // [B,D,h,w]
        let patches = patches.reshape([b, d, h * w]).swap_dims(1, 2); // [B, N, D]
        let patches = patches + self.patch_pos_for(h, w).unsqueeze::<3>(); // [B, N, D]
        let cls_pos = self.pos().narrow(1, 0, 1); // [1,1,D]
        let cls = (self.cls_token.clone() + cls_pos).expand([b, 1, d]); // [B,1,D]
        Tensor::cat(vec![cls, patches], 1)
    }

    /// Reference-token inputs `[B, R, D]` from bicubic weights `[B*R, N0]` (see [`ref_weights`]).
    fn ref_tokens(&self, weights: Tensor<2>, batch: usize) -> Tensor<3> {
        let d = self.cfg.embed_dim;
        let pos = if self.cfg.detach_pos_embed { self.patch_pos().detach() } else { self.patch_pos() };
        let r = weights.dims()[0] / batch;
        let tokens = weights.matmul(pos).reshape([batch, r, d]); // [B, R, D]
        match &self.ref_token {
            Some(content) => tokens + content.clone(),
            None => tokens,
        }
    }

    /// The training/inference forward. `refs`: bicubic weights `[B*R, N0]` of the reference points.
    /// `drop`: per-block residual scales from [`drop_path_scales`].
    pub fn forward(
        &self,
        x: Tensor<4>,
        refs: Option<Tensor<2>>,
        drop: &[BlockDrop],
        want_attn: bool,
    ) -> VitOutput {
        if refs.is_some() && self.cfg.mask_mode != MaskMode::All2posPos2clsEye {
            return self.forward_masked(x, refs, self.cfg.mask_mode, drop);
        }
        let b = x.dims()[0];
        let heads = self.cfg.num_heads;
        let tokens = self.embed(x); // [B, T, D]
        let t = tokens.dims()[1];
        // The reference tokens ride at the end of the sequence through every block ([`fused::attention`]).
        let mut h = match refs.map(|w| self.ref_tokens(w, b)) {
            Some(r) => Tensor::cat(vec![tokens, r], 1), // [B, T+R, D]
            None => tokens,
        };
        let s = h.dims()[1];
        let mut attn = None;
        let last = self.blocks.len().saturating_sub(1);
        for (i, block) in self.blocks.iter().enumerate() {
            let drop = drop.get(i);
            (h, attn) = block.forward(h, heads, t, self.precision, drop, want_attn && i == last);
        }
        let h = self.norm.forward(h);
        VitOutput {
            cls: h.clone().narrow(1, 0, 1).squeeze_dim(1),
            refs: (s > t).then(|| h.clone().narrow(1, t, s - t)),
            patches: h.narrow(1, 1, t - 1),
            attn,
        }
    }

    /// The official formulation: tokens `[CLS, REF.., PATCH..]` and an additive mask in every block.
    pub fn forward_masked(
        &self,
        x: Tensor<4>,
        refs: Option<Tensor<2>>,
        mode: MaskMode,
        drop: &[BlockDrop],
    ) -> VitOutput {
        let heads = self.cfg.num_heads;
        let (mut h, bias, t, nr) = self.masked_sequence(x, refs, mode);
        for (i, block) in self.blocks.iter().enumerate() {
            let drop = drop.get(i);
            h = block.forward_masked(h, heads, &bias, self.precision, drop);
        }
        let h = self.norm.forward(h);
        VitOutput {
            cls: h.clone().narrow(1, 0, 1).squeeze_dim(1),
            refs: (nr > 0).then(|| h.clone().narrow(1, 1, nr)),
            patches: h.narrow(1, 1 + nr, t - 1),
            attn: None,
        }
    }

    /// The official formulation's input: tokens `[CLS, REF.., PATCH..]` `[B, 1+R+N, D]`, the additive
    /// mask `[1, 1, S, S]` of `mode`, the token count without references `T = 1+N`, and `R`.
    fn masked_sequence(
        &self,
        x: Tensor<4>,
        refs: Option<Tensor<2>>,
        mode: MaskMode,
    ) -> (Tensor<3>, Tensor<4>, usize, usize) {
        let b = x.dims()[0];
        let tokens = self.embed(x);
        let t = tokens.dims()[1];
        let r = refs.map(|w| self.ref_tokens(w, b));
        let nr = r.as_ref().map_or(0, |r| r.dims()[1]);
        let seq = match r {
            Some(r) => Tensor::cat(vec![tokens.clone().narrow(1, 0, 1), r, tokens.narrow(1, 1, t - 1)], 1),
            None => tokens,
        }; // [B, 1+R+N, D]
        let s = t + nr;
        let bias = Tensor::<2>::from_data(TensorData::new(mask_bias(mode, nr, t - 1), [s, s]), &seq.device())
            .reshape([1, 1, s, s]);
        (seq, bias, t, nr)
    }

    /// Where the tokens look: in every block, each reference token's attention over the patches `[B, R,
    /// N]` (row sums are 1 minus what the token gives itself) and each patch's attention over the patches
    /// `[B, N, N]` (1 minus what it gives the CLS token), averaged over the heads. It runs the literal
    /// masked formulation with the model's mask mode, whose outputs equal the fused path's.
    pub fn ref_attention(&self, x: Tensor<4>, refs: Tensor<2>) -> Vec<(Tensor<3>, Tensor<3>)> {
        let heads = self.cfg.num_heads;
        let (mut h, bias, t, nr) = self.masked_sequence(x, Some(refs), self.cfg.mask_mode);
        let mut out = Vec::with_capacity(self.blocks.len());
        for block in &self.blocks {
            let (probs, _) = block.attention_probs(h.clone(), heads, &bias, self.precision); // [B,H,S,S]
            let patches = probs.clone().narrow(3, 1 + nr, t - 1); // [B,H,S,N]
            let refs = patches.clone().narrow(2, 1, nr).mean_dim(1).squeeze_dim(1); // [B,R,N]
            let own = patches.narrow(2, 1 + nr, t - 1).mean_dim(1).squeeze_dim(1); // [B,N,N]
            out.push((refs, own));
            h = block.forward_masked(h, heads, &bias, self.precision, None);
        }
        out
    }
}

impl Params for Vit {
    fn visit(&mut self, prefix: &str, f: &mut dyn FnMut(&str, ParamMut<'_>)) {
        f(&format!("{prefix}cls_token"), ParamMut::R3(&mut self.cls_token));
        f(&format!("{prefix}pos_embed"), ParamMut::R3(&mut self.pos_embed));
        f(&format!("{prefix}patch_embed.proj.weight"), ParamMut::R4(&mut self.patch_weight));
        f(&format!("{prefix}patch_embed.proj.bias"), ParamMut::R1(&mut self.patch_bias));
        for (i, block) in self.blocks.iter_mut().enumerate() {
            block.visit(&format!("{prefix}blocks.{i}"), f);
        }
        self.norm.visit(&format!("{prefix}norm"), f);
        if let Some(t) = &mut self.ref_token {
            f(&format!("{prefix}ref_token"), ParamMut::R3(t));
        }
    }
}

/// The `[S, S]` additive mask (0 or -inf) of the official code for `R` reference and `N` patch tokens,
/// token order `[CLS, REF.., PATCH..]`.
pub fn mask_bias(mode: MaskMode, r: usize, n: usize) -> Vec<f32> {
    let s = 1 + r + n;
    let mut m = vec![0.0f32; s * s];
    let is_ref = |j: usize| (1..1 + r).contains(&j);
    for i in 0..s {
        for j in 0..s {
            let masked = match mode {
                MaskMode::None => false,
                MaskMode::All2pos => is_ref(j),
                MaskMode::All2posPos2cls | MaskMode::All2posPos2clsEye => is_ref(j) || (is_ref(i) && j == 0),
                MaskMode::AllQuery => is_ref(j) || j == 0,
            };
            let diagonal_reset = matches!(mode, MaskMode::All2posPos2clsEye | MaskMode::AllQuery) && i == j;
            if masked && !diagonal_reset {
                m[i * s + j] = f32::NEG_INFINITY;
            }
        }
    }
    m
}

/// MoCo v3's fixed 2-D sine-cosine positional embedding `[1 + g², D]` (the CLS position zero): for the
/// patch at (row, col), `[sin(col·ω), cos(col·ω), sin(row·ω), cos(row·ω)]` with `ω_k = 10000^(−k/(D/4))`.
pub fn sincos_2d(grid: usize, d: usize) -> Vec<f32> {
    let q = d / 4;
    let mut out = vec![0f32; (1 + grid * grid) * d];
    for r in 0..grid {
        for c in 0..grid {
            let row = &mut out[(1 + r * grid + c) * d..(2 + r * grid + c) * d];
            for k in 0..q {
                let omega = 1.0 / 10000f64.powf(k as f64 / q as f64);
                let (x, y) = (c as f64 * omega, r as f64 * omega);
                row[k] = x.sin() as f32;
                row[q + k] = x.cos() as f32;
                row[2 * q + k] = y.sin() as f32;
                row[3 * q + k] = y.cos() as f32;
            }
        }
    }
    out
}

/// `[P, N0]` bicubic weights for points `(x, y)` interleaved (`P = points.len() / 2`) over the learned grid.
pub fn ref_weights(points: &[f32], grid: usize, device: &Device) -> Tensor<2> {
    let w = bicubic::grid_sample_matrix(points, grid, grid);
    Tensor::<2>::from_data(TensorData::new(w, [points.len() / 2, grid * grid]), device)
}

/// One block's stochastic depth: residual scales `[B, 1, 1]` (0 or 1/keep) for its attention branch and
/// for its MLP branch, drawn independently, as the official `Block` calls its `DropPath` once per branch.
/// `None` where nothing can drop.
#[derive(Clone, Debug, Default)]
pub struct BlockDrop {
    pub attn: Option<Tensor<3>>,
    pub mlp: Option<Tensor<3>>,
}

/// Whose stochastic depth a forward draws: the step and where its samples sit in the global batch.
///
/// Every (sample, view) draws from its own RNG, keyed by the seed, the step, the sample's position in the
/// global batch and the view, so that data-parallel ranks, each holding a slice of the global batch, drop
/// exactly the paths that one process holding the whole batch drops, and a replayed step draws the same.
#[derive(Clone, Copy, Debug)]
pub struct DropKey {
    pub seed: u64,
    pub it: u64,
    /// The global-batch position of this process's first sample (`rank * per-rank batch`).
    pub first: u64,
}

/// Per-block stochastic depth for the rows of `views` (view-major: `views.len() * batch` rows, as
/// [`crate::model::DenseDino::forward`] concatenates same-size views): block i drops each branch of a
/// whole row with probability `linspace(0, rate, depth)[i]`, kept rows are scaled by `1/keep`. Drawn on
/// the host, block by block (the attention branch before the MLP branch), one draw per row from that row's
/// [`DropKey`] RNG, so every backend and every rank split sees the same.
pub fn drop_path_scales(
    cfg: &VitConfig,
    key: DropKey,
    views: std::ops::Range<usize>,
    batch: usize,
    device: &Device,
) -> Vec<BlockDrop> {
    let mut rngs: Vec<ChaCha8Rng> = views
        .flat_map(|v| {
            (0..batch).map(move |j| {
                seed::rng(key.seed, seed::Purpose::Model, &[1, key.it, key.first + j as u64, v as u64])
            })
        })
        .collect();
    let rows = rngs.len();
    (0..cfg.depth)
        .map(|i| {
            let rate =
                if cfg.depth > 1 { cfg.drop_path_rate * i as f64 / (cfg.depth - 1) as f64 } else { 0.0 };
            let mut branch = || {
                (rate > 0.0).then(|| {
                    let keep = 1.0 - rate;
                    let s: Vec<f32> = rngs
                        .iter_mut()
                        .map(|rng| if rng.random::<f64>() < keep { (1.0 / keep) as f32 } else { 0.0 })
                        .collect();
                    Tensor::<3>::from_data(TensorData::new(s, [rows, 1, 1]), device)
                })
            };
            let attn = branch();
            BlockDrop { attn, mlp: branch() }
        })
        .collect()
}

/// `u8` planar pixels `[B, 3, S, S]` → normalised f32 on the device (the loader hands over bytes: a quarter
/// of the bandwidth of f32).
pub fn normalize_pixels(data: &[u8], batch: usize, size: usize, device: &Device) -> Tensor<4> {
    let x =
        Tensor::<4, Int>::from_data(TensorData::new(data.to_vec(), [batch, 3, size, size]), device).float();
    let mean = Tensor::<4>::from_data(
        TensorData::new(MEAN.iter().map(|m| m * 255.0).collect::<Vec<_>>(), [1, 3, 1, 1]),
        device,
    );
    let inv_std = Tensor::<4>::from_data(
        TensorData::new(STD.iter().map(|s| 1.0 / (s * 255.0)).collect::<Vec<_>>(), [1, 3, 1, 1]),
        device,
    );
    (x - mean) * inv_std
}
