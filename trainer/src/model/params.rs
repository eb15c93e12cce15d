//! Named parameters: one walk over a model gives every trainable tensor with its official DINO name.
//!
//! The optimiser, the EMA teacher, gradient clipping, the frozen last layer, checkpoints and export all need
//! "every parameter, by name". burn's `Module` derive offers visitors, but its names are burn's and its
//! mapper cannot zip two models (student and teacher). A plain walk with the names of the official
//! `vision_transformer.py` (`blocks.3.attn.qkv.weight`, `head.last_layer.weight_v`, …) serves all of them
//! and makes export a rename-free dump. Weight matrices are stored in burn's `[in, out]` layout; export
//! transposes them to PyTorch's `[out, in]`.

use burn::tensor::{Device, Gradients, Tensor, TensorData};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

/// A mutable view of one parameter, whatever its rank.
pub enum ParamMut<'a> {
    R1(&'a mut Tensor<1>),
    R2(&'a mut Tensor<2>),
    R3(&'a mut Tensor<3>),
    R4(&'a mut Tensor<4>),
}

impl ParamMut<'_> {
    pub fn dims(&self) -> Vec<usize> {
        match self {
            ParamMut::R1(t) => t.dims().to_vec(),
            ParamMut::R2(t) => t.dims().to_vec(),
            ParamMut::R3(t) => t.dims().to_vec(),
            ParamMut::R4(t) => t.dims().to_vec(),
        }
    }

    pub fn rank(&self) -> usize {
        self.dims().len()
    }

    /// The parameter flattened to 1-D (a view, no copy on burn's backends).
    pub fn flat(&self) -> Tensor<1> {
        match self {
            ParamMut::R1(t) => (*t).clone(),
            ParamMut::R2(t) => (**t).clone().flatten::<1>(0, 1),
            ParamMut::R3(t) => (**t).clone().flatten::<1>(0, 2),
            ParamMut::R4(t) => (**t).clone().flatten::<1>(0, 3),
        }
    }

    /// This parameter's gradient, flattened, if the backward pass reached it.
    pub fn grad_flat(&self, grads: &Gradients) -> Option<Tensor<1>> {
        match self {
            ParamMut::R1(t) => t.grad(grads),
            ParamMut::R2(t) => t.grad(grads).map(|g| g.flatten::<1>(0, 1)),
            ParamMut::R3(t) => t.grad(grads).map(|g| g.flatten::<1>(0, 2)),
            ParamMut::R4(t) => t.grad(grads).map(|g| g.flatten::<1>(0, 3)),
        }
    }

    /// Replaces the parameter with plain (non-autodiff) values `v`, restoring its shape; with `trainable` it
    /// becomes a fresh autodiff leaf. The reshape must come first: a reshaped leaf is no leaf, and its
    /// gradient would never be retained.
    pub fn set_leaf(&mut self, v: Tensor<1>, trainable: bool) {
        fn leaf<const D: usize>(t: Tensor<D>, trainable: bool) -> Tensor<D> {
            if trainable { Tensor::from_inner(t).require_grad() } else { t }
        }
        match self {
            ParamMut::R1(t) => **t = leaf(v, trainable),
            ParamMut::R2(t) => **t = leaf(v.reshape(t.dims()), trainable),
            ParamMut::R3(t) => **t = leaf(v.reshape(t.dims()), trainable),
            ParamMut::R4(t) => **t = leaf(v.reshape(t.dims()), trainable),
        }
    }

    /// Replaces the parameter with `v` (1-D, same element count), restoring its shape.
    pub fn set_flat(&mut self, v: Tensor<1>) {
        match self {
            ParamMut::R1(t) => **t = v,
            ParamMut::R2(t) => **t = v.reshape(t.dims()),
            ParamMut::R3(t) => **t = v.reshape(t.dims()),
            ParamMut::R4(t) => **t = v.reshape(t.dims()),
        }
    }
}

/// Everything that owns parameters walks them in a fixed order with stable names.
pub trait Params {
    fn visit(&mut self, prefix: &str, f: &mut dyn FnMut(&str, ParamMut<'_>));
}

/// Every parameter as (name, shape, host values): for checkpoints, export and tests.
pub fn to_host(model: &mut dyn Params) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let mut out = Vec::new();
    model.visit("", &mut |name, p| {
        out.push((name.to_string(), p.dims(), host(p.flat())));
    });
    out
}

/// A tensor's values on the host as f32.
pub fn host<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_into_vec::<f32>().expect("f32 tensor data")
}

/// The number of scalar parameters.
pub fn count(model: &mut dyn Params) -> usize {
    let mut n = 0;
    model.visit("", &mut |_, p| n += p.dims().iter().product::<usize>());
    n
}

/// A host tensor made on `device`; a leaf that requires a gradient when the device does autodiff.
pub fn param<const D: usize>(values: Vec<f32>, shape: [usize; D], device: &Device) -> Tensor<D> {
    let t = Tensor::<D>::from_data(TensorData::new(values, shape), device);
    if device.is_autodiff() { t.require_grad() } else { t }
}

/// A standard normal draw (Box–Muller); the initialisations only need a few million, so simplicity wins.
pub fn normal(rng: &mut ChaCha8Rng) -> f64 {
    let u1: f64 = 1.0 - rng.random::<f64>(); // (0, 1]: ln is finite
    let u2: f64 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// `trunc_normal_(std, a=-2, b=2)` as timm and DINO call it: the cut is absolute (about ±100σ at std 0.02),
/// so in practice an untruncated normal; redraw outside the cut anyway.
pub fn trunc_normal(n: usize, std: f64, rng: &mut ChaCha8Rng) -> Vec<f32> {
    (0..n)
        .map(|_| {
            loop {
                let x = normal(rng) * std;
                if (-2.0..=2.0).contains(&x) {
                    break x as f32;
                }
            }
        })
        .collect()
}

/// `U(-bound, bound)`: PyTorch's default Linear/Conv init (kaiming-uniform with a=√5 gives
/// `bound = 1/sqrt(fan_in)` for the weight, and the bias uses the same bound).
pub fn uniform(n: usize, bound: f64, rng: &mut ChaCha8Rng) -> Vec<f32> {
    (0..n).map(|_| ((rng.random::<f64>() * 2.0 - 1.0) * bound) as f32).collect()
}

/// A tensor on the host: its shape and f32 values.
pub type HostTensor = (Vec<usize>, Vec<f32>);
/// Host tensors by name.
pub type Named = std::collections::HashMap<String, HostTensor>;
/// Finds a tensor by name.
pub type Lookup<'a> = &'a dyn Fn(&str) -> Option<HostTensor>;

/// Sets every parameter of `model` from tensors in the official PyTorch layout, found by `get(prefix +
/// name)`: rank-2 tensors (Linear weights, `weight_v`, `weight_g`) arrive `[out, in]` and are transposed
/// to burn's `[in, out]`; everything else keeps its shape. A missing tensor or a wrong shape is an error
/// naming it.
pub fn load_official(
    model: &mut dyn Params,
    prefix: &str,
    get: Lookup<'_>,
    device: &Device,
) -> anyhow::Result<()> {
    load(model, prefix, get, device, true)
}

/// Sets every parameter from tensors in our own layout (`official: false`, checkpoints) or PyTorch's.
pub fn load(
    model: &mut dyn Params,
    prefix: &str,
    get: Lookup<'_>,
    device: &Device,
    official: bool,
) -> anyhow::Result<()> {
    let mut errors = Vec::new();
    model.visit("", &mut |name, mut p| {
        let key = format!("{prefix}{name}");
        let dims = p.dims();
        // Official files name the learnable reference token as the official code does; our own earlier
        // exports used our name.
        let found = match official_name(name) {
            Some(theirs) if official => get(&format!("{prefix}{theirs}")).or_else(|| get(&key)),
            _ => get(&key),
        };
        let Some((shape, values)) = found else {
            errors.push(format!("{key}: missing"));
            return;
        };
        let transposed = official && dims.len() == 2;
        let want: Vec<usize> = if transposed { vec![dims[1], dims[0]] } else { dims.clone() };
        if shape != want {
            errors.push(format!("{key}: shape {shape:?}, expected {want:?}"));
            return;
        }
        let values = if transposed { transpose(&values, want[0], want[1]) } else { values };
        let n = values.len();
        let plain_device = device.clone().without_autodiff();
        p.set_leaf(Tensor::<1>::from_data(TensorData::new(values, [n]), &plain_device), device.is_autodiff());
    });
    if errors.is_empty() { Ok(()) } else { Err(anyhow::anyhow!(errors.join("; "))) }
}

/// The official code's name where it differs from ours: the learnable reference token is the official
/// `VisionTransformer.ref_learn_token` (`--with_learnable_token`), `ref_token` here.
pub fn official_name(name: &str) -> Option<String> {
    name.strip_suffix("ref_token")
        .filter(|head| head.is_empty() || head.ends_with('.'))
        .map(|head| format!("{head}ref_learn_token"))
}

/// Every parameter in the official PyTorch layout (rank-2 tensors transposed to `[out, in]`) under the
/// official names.
pub fn to_official(model: &mut dyn Params) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    to_host(model)
        .into_iter()
        .map(|(name, dims, values)| {
            let name = official_name(&name).unwrap_or(name);
            if dims.len() == 2 {
                (name, vec![dims[1], dims[0]], transpose(&values, dims[0], dims[1]))
            } else {
                (name, dims, values)
            }
        })
        .collect()
}

/// Row-major `[rows, cols]` → `[cols, rows]`.
pub fn transpose(values: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; values.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = values[r * cols + c];
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::vit::{Vit, VitConfig};

    #[test]
    fn the_learnable_reference_token_goes_out_and_comes_back_under_the_official_name() {
        let cfg = VitConfig { depth: 1, learnable_ref_token: true, ..VitConfig::vit_tiny() };
        let dev = Device::flex();
        let mut rng = common::seed::rng(1, common::seed::Purpose::Model, &[0]);
        let mut a = Vit::new(&cfg, &mut rng, &dev);
        let official: Named = to_official(&mut a).into_iter().map(|(n, d, v)| (n, (d, v))).collect();
        assert!(official.contains_key("ref_learn_token") && !official.contains_key("ref_token"));
        let token = official["ref_learn_token"].1.clone();
        for name in ["ref_learn_token", "ref_token"] {
            // Our earlier exports wrote `ref_token`: both names load.
            let mut map = official.clone();
            let t = map.remove("ref_learn_token").unwrap();
            map.insert(name.to_string(), t);
            let mut b = Vit::new(&cfg, &mut rng, &dev);
            load_official(&mut b, "", &|n| map.get(n).cloned(), &dev).unwrap();
            let back: Named = to_official(&mut b).into_iter().map(|(n, d, v)| (n, (d, v))).collect();
            assert_eq!(back["ref_learn_token"].1, token, "loaded from {name}");
        }
    }
}
