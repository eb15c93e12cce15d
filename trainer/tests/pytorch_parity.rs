//! Cross-check against PyTorch: `fixtures/make_reference.py` builds a tiny DenseDINO (student, teacher,
//! both heads, the loss) in the official code's formulation and saves weights, inputs, outputs and
//! gradients. Here the same weights go into our model and everything must match within 1e-4 (f32).

use burn::tensor::{Device, Tensor, TensorData};
use trainer::model::DenseDino;
use trainer::model::head::HeadConfig;
use trainer::model::params::{self, Params, host};
use trainer::model::vit::{self, MaskMode, VitConfig};
use trainer::recipe::loss::{DenseDinoLoss, Layout, LossConfig};

const B: usize = 2;
const M: usize = 3;
const V: usize = 4;
const K: usize = 64;

struct Fixture(trainer::model::params::Named);

impl Fixture {
    fn load() -> Self {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/reference.safetensors");
        let bytes = std::fs::read(path).expect("fixture (regenerate with make_reference.py)");
        let map = trainer::run::checkpoint::tensors(&bytes).expect("fixture tensors");
        Self(map)
    }
    fn get(&self, name: &str) -> &(Vec<usize>, Vec<f32>) {
        self.0.get(name).unwrap_or_else(|| panic!("fixture lacks {name}"))
    }
    fn values(&self, name: &str) -> Vec<f32> {
        self.get(name).1.clone()
    }
    fn tensor4(&self, name: &str, device: &Device) -> Tensor<4> {
        let (shape, values) = self.get(name);
        Tensor::from_data(TensorData::new(values.clone(), [shape[0], shape[1], shape[2], shape[3]]), device)
    }
}

fn assert_close(ours: &[f32], theirs: &[f32], what: &str) {
    assert_eq!(ours.len(), theirs.len(), "{what}: length");
    let scale = theirs.iter().fold(1.0f32, |m, v| m.max(v.abs()));
    let worst = ours.iter().zip(theirs).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    assert!(worst <= 1e-4 * scale, "{what}: max abs difference {worst} (scale {scale})");
}

fn configs() -> (VitConfig, HeadConfig) {
    let vit = VitConfig {
        embed_dim: 32,
        depth: 2,
        num_heads: 4,
        patch_size: 8,
        img_size: 32,
        mlp_ratio: 4,
        drop_path_rate: 0.0,
        mask_mode: MaskMode::All2posPos2clsEye,
        learnable_ref_token: false,
        detach_pos_embed: false,
        sincos_pos_embed: false,
    };
    let head = HeadConfig {
        out_dim: K,
        hidden_dim: 48,
        bottleneck_dim: 16,
        nlayers: 3,
        norm_last_layer: true,
        shared_ref_head: false,
    };
    (vit, head)
}

fn side(fx: &Fixture, prefix: &str, device: &Device) -> DenseDino {
    let (vit_cfg, head_cfg) = configs();
    let mut rng = common::seed::rng(0, common::seed::Purpose::Model, &[0]);
    let mut model = DenseDino::new(&vit_cfg, &head_cfg, true, &mut rng, device);
    let get = |name: &str| fx.0.get(name).cloned();
    params::load_official(&mut model, prefix, &get, device).expect("load fixture weights");
    model
}

#[test]
fn forward_loss_centers_and_gradients_match_pytorch() {
    check(Device::flex());
}

/// The same on LibTorch (CPU), when built with `--features tch`: the backend the GPU path uses.
#[cfg(feature = "tch")]
#[test]
#[allow(deprecated)] // burn-tch is deprecated upstream; it is the LibTorch path we ship
fn forward_loss_centers_and_gradients_match_pytorch_on_libtorch() {
    check(Device::libtorch());
}

fn check(plain: Device) {
    let fx = Fixture::load();
    let auto = plain.clone().autodiff();
    let teacher = side(&fx, "teacher.", &plain);
    let mut student = side(&fx, "student.", &auto);

    let views: Vec<Tensor<4>> = (0..V).map(|i| fx.tensor4(&format!("input.view{i}"), &plain)).collect();
    let t_points: Vec<Vec<f32>> = (0..2).map(|g| fx.values(&format!("input.teacher_points{g}"))).collect();
    let s_points: Vec<Vec<f32>> = (0..V).map(|v| fx.values(&format!("input.student_points{v}"))).collect();

    let t = teacher.forward(&views[..2], Some(&t_points), None);
    let s_views: Vec<Tensor<4>> = views.iter().cloned().map(Tensor::from_inner).collect();
    let s = student.forward(&s_views, Some(&s_points), None);
    assert_close(&host(t.cls.clone()), &fx.values("output.teacher_cls_logits"), "teacher CLS logits");
    assert_close(
        &host(t.refs.clone().unwrap()),
        &fx.values("output.teacher_ref_logits"),
        "teacher ref logits",
    );
    assert_close(&host(s.cls.clone()), &fx.values("output.student_cls_logits"), "student CLS logits");
    assert_close(
        &host(s.refs.clone().unwrap()),
        &fx.values("output.student_ref_logits"),
        "student ref logits",
    );

    // The backbone alone on a 16 px view (resized positional grid) with its reference tokens.
    let out = student.backbone.forward(
        s_views[2].clone(),
        Some(vit::ref_weights(&s_points[2], 4, &auto)),
        &[],
        false,
    );
    assert_close(&host(out.cls), &fx.values("output.student_view2_cls"), "backbone CLS (16 px)");
    assert_close(&host(out.refs.unwrap()), &fx.values("output.student_view2_refs"), "backbone refs (16 px)");
    assert_close(&host(out.patches), &fx.values("output.student_view2_patches"), "backbone patches (16 px)");

    let mut loss = DenseDinoLoss::new(&LossConfig::default(), K, &plain);
    loss.set_centers(fx.values("input.center"), fx.values("input.ref_center"), &plain);
    let l = loss.forward(
        t.cls.clone(),
        s.cls,
        t.refs.clone(),
        s.refs,
        Layout { batch: B, views: V, points: M },
        0.04,
    );
    assert_close(&host(l.total.clone()), &fx.values("output.loss"), "total loss");
    assert_close(&host(l.cls.unwrap()), &fx.values("output.cls_loss"), "CLS loss");
    assert_close(&host(l.refs.unwrap()), &fx.values("output.ref_loss"), "reference loss");
    loss.update_centers(t.cls, t.refs, Layout { batch: B, views: V, points: M });
    let (c, rc) = loss.centers_to_host();
    assert_close(&c, &fx.values("output.center"), "center after update");
    assert_close(&rc, &fx.values("output.ref_center"), "ref_center after update");

    let grads = l.total.backward();
    let mut checked = 0;
    student.visit("", &mut |name, p| {
        let key = format!("grad.{name}");
        if let Some((shape, theirs)) = fx.0.get(&key) {
            let ours = host(p.grad_flat(&grads).expect("gradient"));
            let ours = if shape.len() == 2 { params::transpose(&ours, shape[1], shape[0]) } else { ours };
            assert_close(&ours, theirs, &key);
            checked += 1;
        }
    });
    assert_eq!(checked, 6, "every gradient in the fixture was compared");
}
