//! The exported weights in PyTorch: official-layout weights (every tensor perturbed away from its init, so
//! a swapped or transposed one shows) are imported into a run, that run's checkpoint is exported with its
//! heads, and `fixtures/load_export.py` loads the export into the official ViT and DINO head (as the
//! official `vision_transformer.py` defines them) with strict key matching and must reproduce our
//! features, attention and logits within 1e-4.
//!
//! The backbone export of each of DINO's ViT shapes (tiny, small, base; 16 and 8 px patches) also loads
//! strictly into timm's `vit_*_patch*_224` (`fixtures/load_timm.py`) and gives our features there.
//!
//! Needs PyTorch and timm, so it is ignored by default; `.ci/run` runs it with the venv of
//! `scripts/torch-venv.sh`:
//!
//!     DENSEDINO_PYTHON=$(scripts/torch-venv.sh) cargo test --workspace --release --test export_pytorch -- --ignored

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use burn::tensor::{Device, Tensor, TensorData};
use common::seed::{self, Purpose};
use trainer::model::DenseDino;
use trainer::model::params::{self, Params, host};
use trainer::recipe::config::TrainConfig;

#[test]
#[ignore = "needs PyTorch: DENSEDINO_PYTHON=$(scripts/torch-venv.sh) ... -- --ignored (run by .ci/run)"]
fn exported_weights_load_into_pytorch_and_give_our_features() {
    let python = std::env::var("DENSEDINO_PYTHON")
        .expect("DENSEDINO_PYTHON: a python with torch and safetensors (scripts/torch-venv.sh)");
    let sets: Vec<String> = [
        "model.embed_dim=48",
        "model.depth=2",
        "model.num_heads=3",
        "model.patch_size=8",
        "model.img_size=32",
        "views.global_size=32",
        "views.local_size=16",
        "head.out_dim=64",
        "head.hidden_dim=40",
        "head.bottleneck_dim=16",
    ]
    .map(String::from)
    .to_vec();
    let cfg = TrainConfig::load(None, &sets).unwrap();
    let dev = Device::flex();
    let tmp = tempfile::tempdir().unwrap();

    let mut rng = seed::rng(7, Purpose::Model, &[0]);
    let weights = perturbed_weights(&cfg, &mut rng, &tmp.path().join("weights.safetensors"), &dev);

    // Weights → run → checkpoint → export, the user's path.
    let ckpt = trainer::export::import_run(&cfg, &weights, &tmp.path().join("run"), false).unwrap();
    let exported = tmp.path().join("export.safetensors");
    trainer::export::export(&ckpt, &exported, true, false, &dev).unwrap();

    // Our features: the eval backbone from the checkpoint; the heads from the exported file.
    let (vit, ..) = trainer::eval::backbone(Some(&ckpt), None, trainer::eval::Side::Teacher, &dev).unwrap();
    let named = trainer::export::import(&exported).unwrap();
    let mut heads = DenseDino::new(&cfg.model, &cfg.head, true, &mut rng, &dev);
    params::load_official(&mut heads.head, "head.", &|n| named.get(n).cloned(), &dev).unwrap();
    let ref_head = heads.ref_head.as_mut().unwrap();
    params::load_official(ref_head, "ref_head.", &|n| named.get(n).cloned(), &dev).unwrap();

    let mut expected = Vec::new();
    // 32 px is the grid the positions were learned at; 48 px takes DINO's bicubic +0.1 resize.
    for size in [32usize, 48] {
        let b = 2;
        let pixels: Vec<f32> = (0..b * 3 * size * size).map(|_| params::normal(&mut rng) as f32).collect();
        let x = Tensor::<4>::from_data(TensorData::new(pixels.clone(), [b, 3, size, size]), &dev);
        let out = vit.forward(x, None, &[], true);
        let n = (size / 8) * (size / 8);
        let attn = out.attn.expect("asked for attention");
        let head = heads.head.forward(out.cls.clone());
        let ref_logits = heads.ref_head.as_ref().unwrap().forward(out.cls.clone());
        expected.push((format!("x{size}"), vec![b, 3, size, size], pixels));
        expected.push((format!("cls{size}"), vec![b, 48], host(out.cls)));
        expected.push((format!("patches{size}"), vec![b, n, 48], host(out.patches)));
        expected.push((format!("attn{size}"), vec![b, 3, n], host(attn)));
        expected.push((format!("head{size}"), vec![b, 64], host(head)));
        expected.push((format!("ref_head{size}"), vec![b, 64], host(ref_logits)));
    }
    let expected_path = tmp.path().join("expected.safetensors");
    std::fs::write(&expected_path, trainer::run::checkpoint::serialize(&expected, HashMap::new()).unwrap())
        .unwrap();

    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/load_export.py");
    let out = std::process::Command::new(&python)
        .arg(script)
        .arg(&exported)
        .arg(&expected_path)
        .output()
        .unwrap_or_else(|e| panic!("running {python}: {e}"));
    let report = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    println!("{report}");
    assert!(out.status.success(), "PyTorch disagrees:\n{report}");
    assert!(report.contains("strict load"), "{report}");
}

/// `trainer export` (backbone only) of every ViT shape timm names for DINO's backbones, at 224 px, and of
/// a 64 px and a narrowed model: timm loads each strictly and gives our CLS feature and final patch tokens
/// within 1e-4. Real sizes (vit_base/8
/// is 86M parameters over 785 tokens), so it takes a minute or two.
#[test]
#[ignore = "needs PyTorch and timm: DENSEDINO_PYTHON=$(scripts/torch-venv.sh) ... -- --ignored (run by .ci/run)"]
fn exported_backbones_load_into_timm_and_give_our_features() {
    let python = std::env::var("DENSEDINO_PYTHON")
        .expect("DENSEDINO_PYTHON: a python with torch, timm and safetensors (scripts/torch-venv.sh)");
    let dev = Device::flex();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/load_timm.py");
    let mut failed = Vec::new();
    // (timm's name, our arch, patch, image size); the last two as the README tells a user to make them:
    // a model learned at 64 px by name with `img_size`, and the embedded default's narrowed ViT (96 wide, 6
    // deep) from timm's class.
    let cases = [
        ("vit_tiny_patch16_224", "vit_tiny", 16, 224),
        ("vit_small_patch16_224", "vit_small", 16, 224),
        ("vit_base_patch16_224", "vit_base", 16, 224),
        ("vit_small_patch8_224", "vit_small", 8, 224),
        ("vit_base_patch8_224", "vit_base", 8, 224),
        ("vit_small_patch8_224@64", "vit_small", 8, 64),
        ("VisionTransformer", "", 8, 64),
    ];
    for (timm_name, arch, patch, size) in cases {
        // Small heads: the export leaves them out, and they would only make the checkpoint larger.
        let mut sets = vec![
            format!("model.patch_size={patch}"),
            format!("model.img_size={size}"),
            "head.out_dim=64".into(),
            "head.hidden_dim=40".into(),
            "head.bottleneck_dim=16".into(),
        ];
        if !arch.is_empty() {
            sets.push(format!("model.arch={arch}"));
        }
        let cfg = TrainConfig::load(None, &sets).unwrap();
        assert_eq!((cfg.model.img_size, cfg.model.patch_size), (size, patch), "{timm_name}");
        let tmp = tempfile::tempdir().unwrap();
        let mut rng = seed::rng(11, Purpose::Model, &[patch as u64]);
        let weights = perturbed_weights(&cfg, &mut rng, &tmp.path().join("weights.safetensors"), &dev);
        let ckpt = trainer::export::import_run(&cfg, &weights, &tmp.path().join("run"), false).unwrap();
        let exported = tmp.path().join("export.safetensors");
        trainer::export::export(&ckpt, &exported, false, false, &dev).unwrap();

        let (vit, ..) =
            trainer::eval::backbone(Some(&ckpt), None, trainer::eval::Side::Teacher, &dev).unwrap();
        let (b, d) = (2, cfg.model.embed_dim);
        let n = (size / patch) * (size / patch);
        let pixels: Vec<f32> = (0..b * 3 * size * size).map(|_| params::normal(&mut rng) as f32).collect();
        let x = Tensor::<4>::from_data(TensorData::new(pixels.clone(), [b, 3, size, size]), &dev);
        let out = vit.forward(x, None, &[], false);
        let expected = vec![
            ("x".to_string(), vec![b, 3, size, size], pixels),
            ("cls".to_string(), vec![b, d], host(out.cls)),
            ("patches".to_string(), vec![b, n, d], host(out.patches)),
        ];
        let expected_path = tmp.path().join("expected.safetensors");
        let bytes = trainer::run::checkpoint::serialize(&expected, HashMap::new()).unwrap();
        std::fs::write(&expected_path, bytes).unwrap();

        let out = std::process::Command::new(&python)
            .arg(script)
            .arg(timm_name)
            .arg(&exported)
            .arg(&expected_path)
            .output()
            .unwrap_or_else(|e| panic!("running {python}: {e}"));
        let report =
            format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        println!("{report}");
        if !out.status.success() || !report.contains("strict load into timm") {
            failed.push(timm_name.to_string());
        }
    }
    assert!(failed.is_empty(), "timm disagrees on {failed:?} (reports above)");
}

/// Official-layout weights of `cfg`'s model (backbone and both heads) at `path`, every tensor moved away
/// from its initialisation (norm weights around 1, biases around 0, the rest perturbed), so that a swapped,
/// transposed or dropped tensor changes the features.
fn perturbed_weights(
    cfg: &TrainConfig,
    rng: &mut rand_chacha::ChaCha8Rng,
    path: &Path,
    dev: &Device,
) -> PathBuf {
    let mut model = DenseDino::new(&cfg.model, &cfg.head, true, rng, dev);
    let mut tensors = Vec::new();
    let parts: [(&str, &mut dyn Params); 3] = [
        ("", &mut model.backbone),
        ("head.", &mut model.head),
        ("ref_head.", model.ref_head.as_mut().unwrap()),
    ];
    for (prefix, part) in parts {
        for (name, dims, values) in params::to_official(part) {
            let values: Vec<f32> = if name.contains("norm") && name.ends_with(".weight") {
                values.iter().map(|_| 1.0 + 0.3 * params::normal(rng) as f32).collect()
            } else if name.ends_with(".bias") {
                values.iter().map(|_| 0.2 * params::normal(rng) as f32).collect()
            } else {
                values.iter().map(|v| v + 0.05 * params::normal(rng) as f32).collect()
            };
            tensors.push((format!("{prefix}{name}"), dims, values));
        }
    }
    std::fs::write(path, trainer::run::checkpoint::serialize(&tensors, HashMap::new()).unwrap()).unwrap();
    path.to_path_buf()
}
