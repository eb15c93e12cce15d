//! The recipe against closed forms: the loss at initialisation, the teacher-temperature schedule, per-tensor
//! clipping, AdamW's first step, the frozen last layer, the exact EMA and the order of the center update.

use burn::tensor::{Device, Tensor, TensorData};
use common::seed::{self, Purpose};
use trainer::fused::multi_tensor::{self, AdamScalars, AdamSlot};
use trainer::model::DenseDino;
use trainer::model::head::HeadConfig;
use trainer::model::params::{self, ParamMut, Params, host};
use trainer::model::vit::{MaskMode, VitConfig};
use trainer::recipe::loss::{DenseDinoLoss, Layout, LossConfig};
use trainer::recipe::optim::OptimConfig;
use trainer::recipe::optim::{self, AdamW, StepOptions};
use trainer::recipe::schedule::Schedules;
use trainer::recipe::step::Trainer;

fn tiny_vit() -> VitConfig {
    VitConfig {
        embed_dim: 32,
        depth: 2,
        num_heads: 2,
        patch_size: 8,
        img_size: 32,
        mlp_ratio: 2,
        drop_path_rate: 0.1,
        mask_mode: MaskMode::All2posPos2clsEye,
        learnable_ref_token: false,
        detach_pos_embed: false,
        sincos_pos_embed: false,
    }
}

#[test]
fn loss_at_initialisation_is_about_ln_k() {
    // The full DINO head (2048 hidden, 256 bottleneck, K = 65536) on a small backbone: near-uniform
    // outputs give a cross-entropy of about ln K = 11.09 (dino #246 shows 11.0903 for a stuck run).
    let dev = Device::flex();
    let head = HeadConfig::default();
    let model = DenseDino::new(&tiny_vit(), &head, true, &mut seed::rng(3, Purpose::Model, &[0]), &dev);
    let batch = trainer::run::bench::random_batch(4, &[32, 32, 32, 32], 2, 1);
    let views: Vec<Tensor<4>> =
        batch.views.iter().map(|v| trainer::model::vit::normalize_pixels(&v.data, 4, v.size, &dev)).collect();
    let t = model.forward(&views[..2], Some(&batch.teacher_points), None);
    let s = model.forward(&views, Some(&batch.student_points), None);
    let loss = DenseDinoLoss::new(&LossConfig::default(), head.out_dim, &dev);
    let out = loss.forward(t.cls, s.cls, t.refs, s.refs, Layout { batch: 4, views: 4, points: 2 }, 0.04);
    let ln_k = (head.out_dim as f64).ln();
    for (what, v) in [("total", out.total), ("cls", out.cls.unwrap()), ("ref", out.refs.unwrap())] {
        let v = host(v)[0] as f64;
        // Teacher and student are the same network at the start, so the views' outputs correlate and the
        // cross-entropy sits a little below ln K; far from it means a wrong temperature, normalisation or K.
        assert!(v > 0.9 * ln_k && v < 1.05 * ln_k, "{what} loss {v} is not about ln K = {ln_k}");
    }
}

#[test]
fn teacher_temperature_warms_up_linearly_inclusive() {
    let cfg = LossConfig {
        warmup_teacher_temp: 0.04,
        teacher_temp: 0.07,
        warmup_teacher_temp_epochs: 30,
        ..Default::default()
    };
    assert_eq!(cfg.teacher_temp_at(0), 0.04);
    assert!((cfg.teacher_temp_at(15) - (0.04 + 0.03 * 15.0 / 29.0)).abs() < 1e-15);
    assert!((cfg.teacher_temp_at(29) - 0.07).abs() < 1e-15, "linspace is inclusive: epoch E_w - 1 reaches τ");
    assert_eq!(cfg.teacher_temp_at(30), 0.07);
    assert_eq!(LossConfig::default().teacher_temp_at(0), 0.04, "the code default is a constant 0.04");
}

#[test]
fn clipping_is_per_tensor_not_global() {
    // Two tensors, ‖g1‖ = 5 > 3 and ‖g2‖ = 1, through one multi-tensor AdamW step. After it the first
    // moment is (1 − β1)·g·coef, so it shows each tensor's clip coefficient.
    let (g1, g2) = ([3.0f32, 4.0, 0.0, 0.0], [1.0f32, 0.0, 0.0, 0.0]);
    let zeros = [0.0f32; 4];
    let (mut m1, mut v1, mut o1) = ([0.0f32; 4], [0.0f32; 4], [0.0f32; 4]);
    let (mut m2, mut v2, mut o2) = ([0.0f32; 4], [0.0f32; 4], [0.0f32; 4]);
    let mut slots = [
        AdamSlot {
            param: &zeros,
            grad: &g1,
            m: &mut m1,
            v: &mut v1,
            out: &mut o1,
            decay: 1.0,
            step_size: 0.1,
            bc2_sqrt: 0.1,
        },
        AdamSlot {
            param: &zeros,
            grad: &g2,
            m: &mut m2,
            v: &mut v2,
            out: &mut o2,
            decay: 1.0,
            step_size: 0.1,
            bc2_sqrt: 0.1,
        },
    ];
    multi_tensor::adamw(&mut slots, AdamScalars { beta1: 0.9, beta2: 0.999, eps: 1e-8, clip: 3.0 });
    let k = 3.0 / (5.0 + 1e-6);
    let c = 1.0 - 0.9f64;
    assert!((m1[0] as f64 - c * 3.0 * k).abs() < 1e-6 && (m1[1] as f64 - c * 4.0 * k).abs() < 1e-6, "{m1:?}");
    // A global-norm clip (‖(g1, g2)‖ = √26) would have scaled the small tensor too.
    assert!((m2[0] as f64 - c).abs() < 1e-7 && m2[1..] == [0.0; 3], "{m2:?}");
}

/// The positional embedding alone, under the backbone's name.
struct PosEmbed(Tensor<3>);
impl Params for PosEmbed {
    fn visit(&mut self, prefix: &str, f: &mut dyn FnMut(&str, ParamMut<'_>)) {
        f(&format!("{prefix}backbone.pos_embed"), ParamMut::R3(&mut self.0));
    }
}

#[test]
fn the_positional_embeddings_cls_row_is_clipped_apart_from_its_patch_rows() {
    // [1, 1 + 2, 2]: the CLS row's gradient (3, 4) has norm 5 > 3, the patch rows' (1, 0, 0, 0) norm 1.
    // As the official cls_pos_embed and patch_pos_embed, each part gets its own coefficient, read in
    // the first moment (1 − β1)·g·coef after one step: 3/5 for the CLS row, 1 for the patch rows (the
    // joined tensor, norm √26, would have scaled the patch rows by 3/√26 too).
    let dev = Device::flex().autodiff();
    let mut p = PosEmbed(params::param(vec![0.0; 6], [1, 3, 2], &dev));
    let g = [3.0f32, 4.0, 1.0, 0.0, 0.0, 0.0];
    let loss = (p.0.clone() * Tensor::<3>::from_data(TensorData::new(g.to_vec(), [1, 3, 2]), &dev)).sum();
    let grads = loss.backward();
    let mut opt = AdamW::default();
    opt.step(
        &mut p,
        &grads,
        StepOptions { lr: 0.01, weight_decay: 0.0, clip_grad: 3.0, freeze_last_layer: false, unscale: None },
    );
    let m = host(opt.state["backbone.pos_embed"].m.clone());
    let k = 3.0 / (5.0 + 1e-6);
    let want = [0.3 * k, 0.4 * k, 0.1, 0.0, 0.0, 0.0];
    for (i, (&got, want)) in m.iter().zip(want).enumerate() {
        assert!((got as f64 - want).abs() < 1e-6, "m[{i}] = {got}, want {want}: {m:?}");
    }
}

/// One weight matrix and one bias: enough to see both parameter groups.
struct Pair {
    w: Tensor<2>,
    b: Tensor<1>,
}
impl Params for Pair {
    fn visit(&mut self, prefix: &str, f: &mut dyn FnMut(&str, ParamMut<'_>)) {
        f(&format!("{prefix}fc.weight"), ParamMut::R2(&mut self.w));
        f(&format!("{prefix}fc.bias"), ParamMut::R1(&mut self.b));
    }
}

#[test]
fn adamw_first_step_matches_its_closed_form_and_decays_only_group_0() {
    let dev = Device::flex().autodiff();
    let w0 = vec![0.5f32, -1.0, 2.0, 0.25];
    let b0 = vec![1.0f32, -2.0];
    let mut p = Pair { w: params::param(w0.clone(), [2, 2], &dev), b: params::param(b0.clone(), [2], &dev) };
    // loss = Σ c ⊙ w + Σ d ⊙ b: gradients c and d.
    let c = [0.3f32, -0.7, 0.01, 2.0];
    let d = [-0.5f32, 0.2];
    let loss = (p.w.clone() * Tensor::<2>::from_data(TensorData::new(c.to_vec(), [2, 2]), &dev)).sum()
        + (p.b.clone() * Tensor::<1>::from_data(TensorData::new(d.to_vec(), [2]), &dev)).sum();
    let grads = loss.backward();
    let (lr, wd) = (0.01, 0.1);
    let mut opt = AdamW::default();
    opt.step(
        &mut p,
        &grads,
        StepOptions { lr, weight_decay: wd, clip_grad: 0.0, freeze_last_layer: false, unscale: None },
    );
    // Step 1: m̂ = g, v̂ = g², so θ ← θ(1 − lr·wd) − lr·g/(|g| + ε).
    let first =
        |t: f32, g: f32, wd: f64| t as f64 * (1.0 - lr * wd) - lr * g as f64 / (g.abs() as f64 + 1e-8);
    let w1 = host(p.w.clone());
    let b1 = host(p.b.clone());
    for i in 0..4 {
        assert!((w1[i] as f64 - first(w0[i], c[i], wd)).abs() < 1e-6, "weight {i}: {}", w1[i]);
    }
    for i in 0..2 {
        assert!((b1[i] as f64 - first(b0[i], d[i], 0.0)).abs() < 1e-6, "bias {i} must not decay: {}", b1[i]);
    }
    assert!(p.w.is_require_grad() && p.b.is_require_grad(), "updated parameters are trainable leaves again");
}

fn named(model: &mut dyn Params, name: &str) -> Vec<f32> {
    params::to_host(model).into_iter().find(|(n, _, _)| n == name).unwrap_or_else(|| panic!("no {name}")).2
}

#[test]
fn last_layer_is_frozen_in_epoch_0_and_moves_after() {
    let dev = Device::flex();
    let head = HeadConfig { out_dim: 128, hidden_dim: 64, bottleneck_dim: 16, ..Default::default() };
    let ocfg = OptimConfig { warmup_epochs: 0, ..Default::default() };
    let sched = Schedules::new(&ocfg, 3, 2, 256); // 2 iterations per epoch
    let mut tr = Trainer::new(&tiny_vit(), &head, &LossConfig::default(), &ocfg, sched, 5, &dev);
    let names = [
        "head.last_layer.weight_v",
        "ref_head.last_layer.weight_v",
        "head.mlp.0.weight",
        "backbone.pos_embed",
    ];
    let before: Vec<Vec<f32>> = names.iter().map(|n| named(&mut tr.student, n)).collect();
    for i in 0..2 {
        tr.step(&trainer::run::bench::random_batch(4, &[32, 32, 32], 2, i)).expect("finite loss");
    }
    let after0: Vec<Vec<f32>> = names.iter().map(|n| named(&mut tr.student, n)).collect();
    assert_eq!(after0[0], before[0], "CLS last layer moved in epoch 0 (no update, no weight decay)");
    assert_eq!(after0[1], before[1], "reference last layer moved in epoch 0");
    assert_ne!(after0[2], before[2], "the MLP trains in epoch 0");
    assert_ne!(after0[3], before[3], "the positional embedding trains in epoch 0");
    assert!(!tr.optim.state.contains_key("head.last_layer.weight_v"), "a frozen tensor has no AdamW state");
    let mut next = trainer::run::bench::random_batch(4, &[32, 32, 32], 2, 9);
    next.epoch = 1; // the loader's epoch drives the freeze, as the official loop variable does
    tr.step(&next).expect("finite loss");
    assert_ne!(named(&mut tr.student, names[0]), before[0], "the last layer moves from epoch 1");
    assert_eq!(tr.optim.state["head.last_layer.weight_v"].step, 1);
    assert_eq!(tr.optim.state["head.mlp.0.weight"].step, 3);
}

#[test]
fn ema_update_is_exact() {
    let dev = Device::flex();
    let head = HeadConfig { out_dim: 32, hidden_dim: 16, bottleneck_dim: 8, ..Default::default() };
    let mut teacher = DenseDino::new(&tiny_vit(), &head, true, &mut seed::rng(1, Purpose::Model, &[0]), &dev);
    let mut student = DenseDino::new(
        &tiny_vit(),
        &head,
        true,
        &mut seed::rng(2, Purpose::Model, &[0]),
        &dev.clone().autodiff(),
    );
    let t0 = params::to_host(&mut teacher);
    let s0 = params::to_host(&mut student);
    let m = 0.996;
    optim::ema_update(&mut teacher, &mut student, m);
    let t1 = params::to_host(&mut teacher);
    let mut n = 0;
    for ((a, b), c) in t0.iter().zip(&s0).zip(&t1) {
        assert_eq!(a.0, c.0);
        for i in 0..a.2.len() {
            let want = a.2[i] as f64 * m + b.2[i] as f64 * (1.0 - m);
            // Exact up to f32 rounding of the two products and the sum (a few ulps).
            let scale = (a.2[i] as f64 * m).abs() + (b.2[i] as f64 * (1.0 - m)).abs();
            assert!(
                (c.2[i] as f64 - want).abs() <= 3e-7 * scale + 1e-12,
                "{} [{i}]: {} vs {want}",
                a.0,
                c.2[i]
            );
            n += 1;
        }
    }
    assert_eq!(n, params::count(&mut teacher));
}

#[test]
fn centers_move_only_after_the_loss_and_by_the_momentum_rule() {
    let dev = Device::flex();
    let (b, v, m, k) = (2, 3, 2, 8);
    let mut rng = seed::rng(4, Purpose::Model, &[0]);
    let mut rand = |n: usize| params::trunc_normal(n, 1.0, &mut rng);
    let t_cls_v = rand(2 * b * k);
    let t_ref_v = rand(2 * b * v * m * k);
    let t =
        |vals: &Vec<f32>, rows: usize| Tensor::<2>::from_data(TensorData::new(vals.clone(), [rows, k]), &dev);
    let mut loss = DenseDinoLoss::new(&LossConfig::default(), k, &dev);
    let c0 = rand(k);
    let r0 = rand(k);
    loss.set_centers(c0.clone(), r0.clone(), &dev);
    let s_cls = t(&rand(v * b * k), v * b);
    let s_ref = t(&rand(v * b * 2 * m * k), v * b * 2 * m);
    let _ = loss.forward(
        t(&t_cls_v, 2 * b),
        s_cls,
        Some(t(&t_ref_v, 2 * b * v * m)),
        Some(s_ref),
        Layout { batch: b, views: v, points: m },
        0.04,
    );
    assert_eq!(
        loss.centers_to_host(),
        (c0.clone(), r0.clone()),
        "the loss must use and keep the old centers"
    );
    loss.update_centers(
        t(&t_cls_v, 2 * b),
        Some(t(&t_ref_v, 2 * b * v * m)),
        Layout { batch: b, views: v, points: m },
    );
    let (c1, r1) = loss.centers_to_host();
    for j in 0..k {
        let mean: f64 = (0..2 * b).map(|i| t_cls_v[i * k + j] as f64).sum::<f64>() / (2 * b) as f64;
        assert!((c1[j] as f64 - (0.9 * c0[j] as f64 + 0.1 * mean)).abs() < 1e-6);
        // ref_center: teacher groups v ∈ {0, 1} of both global views, all B and M.
        let mut sum = 0.0;
        let mut cnt = 0;
        for g in 0..2 {
            for bi in 0..b {
                for vv in 0..2 {
                    for mi in 0..m {
                        let row = ((g * b + bi) * v + vv) * m + mi;
                        sum += t_ref_v[row * k + j] as f64;
                        cnt += 1;
                    }
                }
            }
        }
        assert!((r1[j] as f64 - (0.9 * r0[j] as f64 + 0.1 * sum / cnt as f64)).abs() < 1e-6);
    }
}

#[test]
fn the_two_losses_gradients_add_up_to_the_total_losss_gradient() {
    // `eval grads` splits the step's gradient by loss; the parts must sum to the gradient of the total,
    // here taken through the public forward and loss as a second formulation (alpha 0.3: the weights show).
    let dev = Device::flex();
    let head = HeadConfig { out_dim: 128, hidden_dim: 64, bottleneck_dim: 16, ..Default::default() };
    let ocfg = OptimConfig::default();
    let loss_cfg = LossConfig { alpha: 0.3, ..Default::default() };
    let vit_cfg = VitConfig { drop_path_rate: 0.0, ..tiny_vit() };
    let mut tr = Trainer::new(&vit_cfg, &head, &loss_cfg, &ocfg, Schedules::new(&ocfg, 3, 2, 256), 5, &dev);
    let batch = trainer::run::bench::random_batch(4, &[32, 32, 32], 2, 3);
    let parts = tr.loss_gradients(&batch).expect("a run with both losses");

    let views: Vec<Tensor<4>> =
        batch.views.iter().map(|v| trainer::model::vit::normalize_pixels(&v.data, 4, v.size, &dev)).collect();
    let t = tr.teacher.forward(&views[..2], Some(&batch.teacher_points), None);
    let sv: Vec<Tensor<4>> = views.into_iter().map(Tensor::from_inner).collect();
    let s = tr.student.forward(&sv, Some(&batch.student_points), None);
    let layout = Layout { batch: 4, views: 3, points: batch.num_points };
    let out = tr.loss.forward(t.cls, s.cls, t.refs, s.refs, layout, loss_cfg.teacher_temp_at(0));
    let grads = out.total.backward();
    let mut total = std::collections::HashMap::new();
    tr.student.visit("", &mut |name, p| {
        if let Some(g) = p.grad_flat(&grads) {
            total.insert(name.to_string(), host(optim::plain(g)));
        }
    });

    assert_eq!(parts.len(), total.len(), "every parameter the total reaches, and no other");
    let norm = |v: &[f32]| v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    for trainer::recipe::step::LossGradients { name, cls: c, refs: r } in &parts {
        let want = &total[name];
        let sum: Vec<f32> = c.iter().zip(r).map(|(a, b)| a + b).collect();
        let diff: Vec<f32> = sum.iter().zip(want).map(|(a, b)| a - b).collect();
        assert!(norm(&diff) <= 1e-4 * norm(want) + 1e-9, "{name}: parts sum off by {}", norm(&diff));
        if name.starts_with("ref_head.") {
            assert_eq!(norm(c), 0.0, "{name}: the CLS loss reaches the reference head");
        }
        if name.starts_with("head.") {
            assert_eq!(norm(r), 0.0, "{name}: the reference loss reaches the CLS head");
        }
    }
    let pos = parts.iter().find(|g| g.name == "backbone.pos_embed").expect("pos_embed");
    assert!(norm(&pos.cls) > 0.0 && norm(&pos.refs) > 0.0, "both losses reach the positional embedding");
}

/// A weight and a head's last layer.
struct WithLastLayer {
    w: Tensor<1>,
    last: Tensor<1>,
}
impl Params for WithLastLayer {
    fn visit(&mut self, prefix: &str, f: &mut dyn FnMut(&str, ParamMut<'_>)) {
        f(&format!("{prefix}fc.bias"), ParamMut::R1(&mut self.w));
        f(&format!("{prefix}head.last_layer.weight_v"), ParamMut::R1(&mut self.last));
    }
}

/// fp16's overflow check sees the frozen last layer exactly where the official loop's `scaler.unscale_`
/// does: with a clip it runs before `cancel_gradients_last_layer`, so an overflow in the frozen layer
/// alone skips the step; without a clip `scaler.step` unscales after the cancel, and the step goes on.
#[test]
fn an_overflow_in_the_frozen_last_layer_skips_the_step_only_with_a_clip() {
    let dev = Device::flex().autodiff();
    for (clip, steps) in [(3.0, false), (0.0, true)] {
        let mut p = WithLastLayer {
            w: params::param(vec![1.0; 2], [2], &dev),
            last: params::param(vec![1.0; 2], [2], &dev),
        };
        // The scaled gradients: finite for the weight, past f32 for the last layer.
        let g = |v: f32| Tensor::<1>::from_data(TensorData::new(vec![v, v], [2]), &dev);
        let loss = (p.w.clone() * g(1024.0)).sum() + (p.last.clone() * g(3e38)).sum().mul_scalar(4.0);
        let grads = loss.backward();
        let mut opt = AdamW::default();
        let o = StepOptions {
            lr: 0.01,
            weight_decay: 0.0,
            clip_grad: clip,
            freeze_last_layer: true,
            unscale: Some(1.0 / 1024.0),
        };
        assert_eq!(opt.step(&mut p, &grads, o), steps, "clip {clip}");
        assert_eq!(host(p.last.clone()), [1.0, 1.0], "clip {clip}: the frozen layer moved");
        let w = host(p.w.clone());
        if steps {
            // The unscaled gradient is 1: AdamW's first step moves by lr.
            assert!(w.iter().all(|&x| (x as f64 - 0.99).abs() < 1e-6), "clip {clip}: {w:?}");
            assert_eq!(opt.state.keys().collect::<Vec<_>>(), ["fc.bias"]);
        } else {
            assert_eq!(w, [1.0, 1.0], "a skipped step moved the weight");
            assert!(opt.state.is_empty(), "a skipped step made AdamW state");
        }
    }
}
