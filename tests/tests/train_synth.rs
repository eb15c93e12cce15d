//! shard → loader → trainer: a few dozen DenseDINO steps on the synthetic shapes make the loss fall below
//! its starting value without collapse (the teacher's targets neither uniform nor all on one prototype).

use burn::tensor::Device;
use common::config::ViewsConfig;
use loader::{LoaderOptions, start};
use shard::synth::{SynthOptions, synth};
use trainer::model::head::HeadConfig;
use trainer::model::vit::{MaskMode, VitConfig};
use trainer::recipe::loss::LossConfig;
use trainer::recipe::optim::OptimConfig;
use trainer::recipe::schedule::Schedules;
use trainer::recipe::step::Trainer;

#[test]
fn a_short_cpu_run_lowers_the_loss_without_collapse() {
    let tmp = tempfile::tempdir().unwrap();
    let opts = SynthOptions {
        count: 256,
        size: 64,
        seed: 5,
        per_shard: 64,
        quality: 90,
        force: true,
        quiet: true,
        ..Default::default()
    };
    synth(tmp.path(), &opts).unwrap();
    let views = ViewsConfig {
        global_size: 32,
        local_size: 32,
        num_local: 2,
        num_points: 2,
        ..ViewsConfig::paper_main()
    };
    let (batch, steps) = (16, 150);

    let vit = VitConfig {
        embed_dim: 64,
        depth: 4,
        num_heads: 4,
        patch_size: 8,
        img_size: 32,
        mlp_ratio: 4,
        drop_path_rate: 0.1,
        mask_mode: MaskMode::All2posPos2clsEye,
        learnable_ref_token: false,
        detach_pos_embed: false,
        sincos_pos_embed: false,
    };
    let head = HeadConfig { out_dim: 256, hidden_dim: 256, bottleneck_dim: 64, ..Default::default() };
    // lr 0.016 at batch 256 scales to 1e-3 at batch 16.
    let ocfg = OptimConfig { lr: 0.016, warmup_epochs: 1, freeze_last_layer: 1, ..Default::default() };
    // Teacher temperature 0.02: the maintainers' advice for small data (facebookresearch/dino issue #43). At
    // 0.04 this 150-step run on 256 images spends its steps with the centering flattening the targets (the
    // CLS loss climbs from its teacher = student start while the reference loss falls); sharper targets
    // learn.
    let loss = LossConfig { teacher_temp: 0.02, warmup_teacher_temp: 0.02, ..Default::default() };
    let ipe = 256 / batch;
    let sched = Schedules::new(&ocfg, 10, ipe, batch);
    let mut tr = Trainer::new(&vit, &head, &loss, &ocfg, sched, 1, &Device::flex());

    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let metrics = rt.block_on(async {
        let mut o = LoaderOptions::new(tmp.path(), views, batch);
        o.seed = 3;
        let l = start(o).unwrap();
        let mut out = Vec::new();
        for _ in 0..steps {
            let b = l.batches.recv().await.unwrap();
            out.push(tr.step(&b).expect("finite loss"));
        }
        out
    });
    let ln_k = (head.out_dim as f64).ln();
    for m in metrics.iter().step_by(10) {
        eprintln!(
            "it {:>2} loss {:.4} (cls {:.4} ref {:.4}) lr {:.2e} H(t) {:.3} H(mean t) {:.3}",
            m.it,
            m.loss,
            m.cls_loss.unwrap(),
            m.ref_loss.unwrap(),
            m.lr,
            m.teacher_entropy,
            m.teacher_batch_entropy
        );
    }
    let first = metrics[0].loss;
    let last: f64 = metrics[steps - 5..].iter().map(|m| m.loss).sum::<f64>() / 5.0;
    assert!(last < first - 0.05, "loss did not fall: first {first:.4}, mean of the last five {last:.4}");
    let end = &metrics[steps - 1];
    assert!(
        end.teacher_entropy < 0.95 * ln_k,
        "teacher targets went uniform: {} vs ln K {ln_k}",
        end.teacher_entropy
    );
    assert!(
        end.teacher_batch_entropy > 0.2 * ln_k,
        "teacher targets collapsed onto few prototypes: {}",
        end.teacher_batch_entropy
    );
}
