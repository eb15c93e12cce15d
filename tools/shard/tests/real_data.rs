//! `shard pack` on the real data in `../shared/data`: the ImageNet layout, Caltech-101's split lists and
//! CamVid's segmentation pairs. Expectations come from the folders themselves, read here independently.

mod util;

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use shard::format::{open_shard, read_samples};
use shard::index::Index;
use util::*;

/// (key, class, json member, mask bytes) of one sample.
type Row = (String, Option<usize>, serde_json::Value, Option<Vec<u8>>);

struct Packed {
    index: Index,
    samples: Vec<Row>,
}

fn read_packed(dir: &Path) -> Packed {
    let index = Index::load(dir).unwrap();
    let mut samples = vec![];
    for s in &index.shards {
        read_samples(open_shard(&dir.join(&s.name)).unwrap(), |x| {
            let cls = x.get("cls").map(|c| std::str::from_utf8(c).unwrap().parse().unwrap());
            let json = serde_json::from_slice(x.get("json").unwrap()).unwrap();
            samples.push((x.key.clone(), cls, json, x.get("seg.png").map(<[u8]>::to_vec)));
            true
        })
        .unwrap();
    }
    Packed { index, samples }
}

fn sorted_folders(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn a_missing_data_set_fails_naming_the_path_it_expected() {
    let panic = std::panic::catch_unwind(|| shared_data("no-such-set")).unwrap_err();
    let message = panic.downcast_ref::<String>().cloned().unwrap_or_default();
    let data = std::env::var("DENSEDINO_SHARED_DATA").unwrap_or_else(|_| "shared/data".into());
    let expected = Path::new(&data).join("no-such-set");
    assert!(message.contains(&format!("{} not found", expected.display())), "{message}");
    assert!(
        (message.contains("exists but holds no no-such-set") || message.contains("does not exist either"))
            && message.contains("DENSEDINO_SHARED_DATA"),
        "{message}"
    );
}

#[test]
fn imagenet_layout_counts_labels_keys_index_and_determinism() {
    let data = shared_data("imagenet-sample");
    let tmp = tempfile::tempdir().unwrap();
    let (a, b, c) = (tmp.path().join("a"), tmp.path().join("b"), tmp.path().join("c"));
    let input = data.join("train");
    let args = |out: &Path, seed: &str| {
        run_shard(
            &[
                "pack",
                "--input",
                input.to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
                "--per-shard",
                "128",
                "--seed",
                seed,
                "-q",
            ],
            &[],
        )
    };
    ok(&args(&a, "1"));
    ok(&args(&b, "1"));
    ok(&args(&c, "2"));

    let folders = sorted_folders(&input);
    assert_eq!(folders.len(), 500);
    let p = read_packed(&a);
    assert_eq!((p.index.total_samples, p.samples.len(), p.index.shards.len()), (500, 500, 4));
    assert!(p.index.skipped.is_empty(), "{:?}", p.index.skipped);
    assert_eq!(p.index.shards.iter().map(|s| s.samples).collect::<Vec<_>>(), [128, 128, 128, 116]);
    // Class list: sorted folders, human names from classes.txt.
    let names: BTreeMap<String, String> = std::fs::read_to_string(data.join("classes.txt"))
        .unwrap()
        .lines()
        .filter_map(|l| l.split_once(' ').map(|(a, b)| (a.to_string(), b.to_string())))
        .collect();
    for (i, c) in p.index.classes.iter().enumerate() {
        assert_eq!((c.index, &c.id), (i, &folders[i]));
        assert_eq!(c.name.as_ref(), names.get(&c.id), "{}", c.id);
    }
    assert_eq!(p.index.classes[0].name.as_deref(), Some("tench"));
    let mut keys = HashSet::new();
    let mut gray = 0;
    for (key, cls, json, _) in &p.samples {
        let src = json["source"].as_str().unwrap();
        let folder = src.split('/').next().unwrap();
        assert_eq!(*cls, folders.iter().position(|f| f == folder), "{key}");
        assert_eq!(key, &src[..src.rfind('.').unwrap()].replace('.', "_"));
        assert!(input.join(src).is_file(), "{src}");
        assert_eq!(json["class_id"], folder);
        assert!(keys.insert(key.clone()), "duplicate key {key}");
        gray += (json["channels"] == 1) as usize;
        let (w, h) = image::image_dimensions(input.join(src)).unwrap();
        assert_eq!(
            (json["width"].as_u64(), json["height"].as_u64()),
            (Some(w as u64), Some(h as u64)),
            "{src}"
        );
    }
    assert!(gray > 0, "the sample holds grayscale JPEGs; they must stay grayscale");
    // Every shard mixes classes.
    for chunk in p.samples.chunks(128) {
        let classes: HashSet<_> = chunk.iter().map(|s| s.1).collect();
        assert!(classes.len() > 100, "{}", classes.len());
    }
    // GNU tar reads every shard and lists three members per sample.
    let mut members = 0;
    for s in &p.index.shards {
        let out = std::process::Command::new("tar").arg("-tf").arg(a.join(&s.name)).output().unwrap();
        assert!(out.status.success(), "tar -tf {}", s.name);
        members += String::from_utf8_lossy(&out.stdout).lines().count();
    }
    assert_eq!(members, 1500);
    // Same seed: the same bytes; another seed: another order of the same samples.
    assert_eq!(files(&a), files(&b));
    let other = read_packed(&c);
    let order = |p: &Packed| p.samples.iter().map(|s| s.0.clone()).collect::<Vec<_>>();
    assert_ne!(order(&p), order(&other));
    let (mut x, mut y) = (order(&p), order(&other));
    x.sort();
    y.sort();
    assert_eq!(x, y);
    assert!(ok(&run_shard(&["verify", a.to_str().unwrap(), "--decode"], &[])).contains("500 images decoded"));
}

#[test]
fn caltech101_split_lists_agree_on_classes_and_cover_the_set() {
    let data = shared_data("caltech101");
    let tmp = tempfile::tempdir().unwrap();
    let mut seen = vec![];
    for split in ["train", "test"] {
        let out = tmp.path().join(split);
        let list = data.join(format!("{split}.txt"));
        let stdout = ok(&run_shard(
            &[
                "pack",
                "--input",
                data.to_str().unwrap(),
                "--list",
                list.to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
                "--prefix",
                split,
                "--shard-bytes",
                "32M",
                "-q",
            ],
            &[],
        ));
        println!("{split}: {stdout}");
        let lines: Vec<String> = std::fs::read_to_string(&list)
            .unwrap()
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(String::from)
            .collect();
        let p = read_packed(&out);
        assert_eq!(p.samples.len() + p.index.skipped.len(), lines.len(), "{split}");
        assert_eq!(p.index.total_samples as usize, p.samples.len());
        assert!(p.index.skipped.is_empty(), "{split}: {:?}", p.index.skipped);
        let folders = sorted_folders(&data);
        // Caltech-101 here: 102 categories less BACKGROUND_Google and Faces_easy.
        assert_eq!(folders.len(), 100);
        assert_eq!(p.index.classes.iter().map(|c| c.id.clone()).collect::<Vec<_>>(), folders);
        let listed: HashSet<&str> = lines.iter().map(String::as_str).collect();
        for (key, cls, json, _) in &p.samples {
            let src = json["source"].as_str().unwrap();
            assert!(listed.contains(src), "{src} is not in {split}.txt");
            let folder = src.split('/').next().unwrap();
            assert_eq!(*cls, folders.iter().position(|f| f == folder), "{key}");
        }
        assert!(p.index.shards.len() > 1 && p.index.shards.iter().all(|s| s.bytes <= (32 << 20) + 1024));
        seen.push(p.samples.into_iter().map(|s| s.0).collect::<HashSet<_>>());
    }
    assert!(seen[0].is_disjoint(&seen[1]));
    assert_eq!(seen[0].len() + seen[1].len(), 8242);
}

#[test]
fn camvid_segmentation_pairs_keep_their_masks() {
    let data = shared_data("camvid");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("seg");
    ok(&run_shard(
        &[
            "pack",
            "--input",
            data.join("val").to_str().unwrap(),
            "--masks",
            data.join("valannot").to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--prefix",
            "val",
            "-q",
        ],
        &[],
    ));
    let p = read_packed(&out);
    assert_eq!(p.samples.len(), 101);
    assert_eq!(p.index.members, ["jpg", "json", "seg.png"]);
    for (key, cls, json, mask) in &p.samples {
        assert_eq!(*cls, None);
        let mask = mask.as_ref().expect("mask member");
        assert_eq!(mask, &std::fs::read(data.join("valannot").join(format!("{key}.png"))).unwrap(), "{key}");
        let m = image::load_from_memory(mask).unwrap().to_luma8();
        assert_eq!(
            (m.width() as u64, m.height() as u64),
            (json["width"].as_u64().unwrap(), json["height"].as_u64().unwrap())
        );
        assert!(m.as_raw().iter().all(|&v| v <= 11));
    }
}
