//! The `shard` command: `pack` an image folder into WebDataset shards, `verify` a packed set, or `synth`
//! a synthetic one. See `shard <command> --help`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Result, bail};
use clap::{Parser, Subcommand};

use shard::input::LayoutArgs;
use shard::pack::{PackOptions, pack};
use shard::synth::{SynthKind, SynthOptions, synth};

#[derive(Parser)]
#[command(name = "shard", version, about = "Pack image sets into WebDataset tar shards for densedino")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Pack a class-per-folder set (ImageNet train, Caltech-101), a split list, ImageNet val, or
    /// segmentation pairs into shuffled shards plus index.json.
    Pack {
        /// The input folder (class folders, or a flat folder with --val-labels / --masks).
        #[arg(long)]
        input: PathBuf,
        /// Where the shards and index.json go: a folder, or a store's URL (s3://bucket/set, gs://…,
        /// az://…), which gets each shard as soon as it is complete in --stage, then index.json last.
        #[arg(long)]
        out: PathBuf,
        /// With a store URL as --out: the local folder the set is packed in before its upload, kept for
        /// --resume (default: a folder under the system's temporary folder named after the URL).
        #[arg(long)]
        stage: Option<PathBuf>,
        /// Pack only the `class/file` lines of this list (e.g. Caltech-101's train.txt); with --masks,
        /// only the image stems it lists (Pascal VOC's ImageSets/Segmentation/train.txt).
        #[arg(long)]
        list: Option<PathBuf>,
        /// ImageNet val labels: Kaggle LOC_val_solution.csv or `file class` lines.
        #[arg(long)]
        val_labels: Option<PathBuf>,
        /// Mask folder for segmentation pairs (same stems as the images), packed as {key}.seg.png.
        #[arg(long)]
        masks: Option<PathBuf>,
        /// Use this class list verbatim (a train set's index.json, or `id [name]` lines), so that val
        /// indices match train.
        #[arg(long)]
        classes_from: Option<PathBuf>,
        /// `id name` lines with human class names (default: classes.txt, LOC_synset_mapping.txt or
        /// synset_words.txt beside the input).
        #[arg(long)]
        class_names: Option<PathBuf>,
        /// Follow symbolic links that lead out of --input (a subset made of links into a full copy);
        /// without it they are skipped and recorded in index.json.
        #[arg(long)]
        follow_links_out: bool,
        /// Seed of the shuffle that spreads samples over shards.
        #[arg(long, default_value_t = PackOptions::default().seed)]
        seed: u64,
        /// Shard names are {prefix}-000000.tar, ….
        #[arg(long, default_value_t = PackOptions::default().prefix)]
        prefix: String,
        /// Target shard size (uncompressed tar bytes), with K/M/G suffixes (the default is
        /// `PackOptions::default().shard_bytes`, spelled readably).
        #[arg(long, default_value = "1G", value_parser = shard::remote::parse_size)]
        shard_bytes: u64,
        /// Samples per shard instead of a size target.
        #[arg(long)]
        per_shard: Option<u64>,
        /// JPEG quality for images that must be re-encoded.
        #[arg(long, default_value_t = PackOptions::default().quality, value_parser = clap::value_parser!(u8).range(1..=100))]
        quality: u8,
        /// Cap the long side at this many pixels (resized and re-encoded), as FFCV does with 500.
        #[arg(long)]
        max_side: Option<u32>,
        /// Write .tar.zst at this zstd level (1..=22).
        #[arg(long, value_parser = clap::value_parser!(i32).range(1..=22))]
        zstd: Option<i32>,
        /// Decode/clean threads (default: all cores).
        #[arg(long)]
        workers: Option<usize>,
        /// Stop on the first unreadable input instead of skipping and recording it.
        #[arg(long)]
        strict: bool,
        /// Finish an interrupted run in --out (same options), producing the bytes of an uninterrupted run.
        #[arg(long)]
        resume: bool,
        /// Replace an existing set in --out.
        #[arg(long)]
        force: bool,
        /// No progress output.
        #[arg(long, short)]
        quiet: bool,
    },
    /// Re-read every shard against index.json; exits 1 with a report on any mismatch.
    Verify {
        /// The shard folder (or its index.json), or a remote set's URL (s3://, gs://, az://, http(s)://, pipe:).
        dir: PathBuf,
        /// Also decode every image.
        #[arg(long)]
        decode: bool,
    },
    /// Write a deterministic synthetic set of 4 classes with masks: shapes on textured backgrounds, or
    /// scenes whose class is their colour palette.
    Synth {
        #[arg(long)]
        out: PathBuf,
        /// shapes (the demo's scenes) or palettes (the class is which hues an image holds; see
        /// `shard::synth`).
        #[arg(long, value_enum, default_value_t = SynthOptions::default().kind)]
        kind: SynthKind,
        #[arg(long, default_value_t = SynthOptions::default().count)]
        count: usize,
        /// Image side in pixels.
        #[arg(long, default_value_t = SynthOptions::default().size)]
        size: u32,
        /// Shapes per scene: 1 to this many (the label is the one covering the most pixels).
        #[arg(long, default_value_t = SynthOptions::default().max_shapes)]
        max_shapes: usize,
        #[arg(long, default_value_t = SynthOptions::default().seed)]
        seed: u64,
        #[arg(long, default_value_t = SynthOptions::default().prefix)]
        prefix: String,
        #[arg(long, default_value_t = SynthOptions::default().per_shard)]
        per_shard: u64,
        #[arg(long, value_parser = clap::value_parser!(i32).range(1..=22))]
        zstd: Option<i32>,
        #[arg(long, default_value_t = SynthOptions::default().quality, value_parser = clap::value_parser!(u8).range(1..=100))]
        quality: u8,
        #[arg(long)]
        force: bool,
        #[arg(long, short)]
        quiet: bool,
    },
}

fn run() -> Result<ExitCode> {
    let workers_default = std::thread::available_parallelism().map_or(1, |n| n.get());
    match Cli::parse().command {
        Command::Pack {
            input,
            out,
            stage,
            list,
            val_labels,
            masks,
            classes_from,
            class_names,
            follow_links_out,
            seed,
            prefix,
            shard_bytes,
            per_shard,
            quality,
            max_side,
            zstd,
            workers,
            strict,
            resume,
            force,
            quiet,
        } => {
            if val_labels.is_some() && (list.is_some() || masks.is_some()) {
                bail!("--val-labels (ImageNet val) cannot be combined with --list or --masks");
            }
            let remote = shard::remote::remote_url(&out).map(str::to_string);
            if remote.as_deref().is_some_and(|u| u.starts_with("http") || u.starts_with("pipe:")) {
                bail!(
                    "--out {}: a set can be written to a folder or an object store, not to HTTP or a pipe",
                    out.display()
                );
            }
            let out = match (&remote, stage) {
                (None, Some(_)) => {
                    bail!("--stage is for a store URL as --out; {} is a folder", out.display())
                }
                (None, None) => out,
                (Some(_), Some(stage)) => stage,
                (Some(url), None) => {
                    use sha2::Digest;
                    let key = hex::encode(&sha2::Sha256::digest(url.as_bytes())[..8]);
                    std::env::temp_dir().join(format!("densedino-stage-{key}"))
                }
            };
            let opts = PackOptions {
                input,
                out,
                layout: LayoutArgs { list, val_labels, masks, classes_from, class_names, follow_links_out },
                seed,
                prefix,
                shard_bytes,
                per_shard,
                quality,
                max_side,
                zstd_level: zstd,
                workers: workers.unwrap_or(workers_default),
                strict,
                resume,
                force,
                quiet,
                upload_to: remote.clone(),
            };
            // A store's set whose packing finished and whose upload did not: --resume goes on uploading.
            let staged =
                remote.is_some() && opts.resume && !opts.out.join(shard::pack::JOURNAL_FILE).exists();
            let index = match staged.then(|| shard::Index::load(&opts.out)).and_then(Result::ok) {
                Some(index) => {
                    let o = &index.options;
                    let same = o.input == opts.input.display().to_string()
                        && (
                            o.seed,
                            o.prefix.as_str(),
                            o.shard_bytes,
                            o.per_shard,
                            o.quality,
                            o.max_side,
                            o.zstd_level,
                        ) == (
                            opts.seed,
                            opts.prefix.as_str(),
                            opts.shard_bytes,
                            opts.per_shard,
                            opts.quality,
                            opts.max_side,
                            opts.zstd_level,
                        );
                    if !same {
                        bail!(
                            "{}: the staged set was packed with other options than these; pack again with --force",
                            opts.out.display()
                        );
                    }
                    println!(
                        "the staged set in {} is complete; uploading what the store lacks",
                        opts.out.display()
                    );
                    index
                }
                None => {
                    let (index, summary) = pack(&opts)?;
                    println!("{}", summary.line("packed"));
                    index
                }
            };
            let index_at = match &remote {
                Some(url) => {
                    let pushed = shard::remote::push(&opts.out, url, quiet)?;
                    println!(
                        "{url}: index.json written last; {} shards were there (uploaded as each was packed, or \
                         by an earlier run), {} uploaded now ({:.1} MB); the local copy stays in {}",
                        pushed.kept,
                        pushed.uploaded,
                        pushed.bytes as f64 / 1e6,
                        opts.out.display()
                    );
                    format!("{}/{}", url.trim_end_matches('/'), shard::index::INDEX_FILE)
                }
                None => opts.out.join(shard::index::INDEX_FILE).display().to_string(),
            };
            println!(
                "{} classes, {} samples in total; index: {index_at}",
                index.classes.len(),
                index.total_samples
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Verify { dir, decode } => {
            let report = shard::verify::verify(&dir, decode)?;
            for p in &report.problems {
                eprintln!("error: {p}");
            }
            let decoded = if decode { format!(", {} images decoded", report.decoded) } else { String::new() };
            if report.problems.is_empty() {
                println!("ok: {} shards, {} samples{decoded}", report.shards, report.samples);
                Ok(ExitCode::SUCCESS)
            } else {
                println!(
                    "FAILED: {} problems in {} shards ({} samples read{decoded})",
                    report.problems.len(),
                    report.shards,
                    report.samples
                );
                Ok(ExitCode::from(1))
            }
        }
        Command::Synth {
            out,
            kind,
            count,
            size,
            max_shapes,
            seed,
            prefix,
            per_shard,
            zstd,
            quality,
            force,
            quiet,
        } => {
            let opts = SynthOptions {
                kind,
                count,
                size,
                max_shapes,
                seed,
                prefix,
                per_shard,
                zstd_level: zstd,
                quality,
                force,
                quiet,
            };
            let (_, summary) = synth(&out, &opts)?;
            println!("{}", summary.line("synthesised"));
            println!("index: {}", out.join(shard::index::INDEX_FILE).display());
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn main() -> ExitCode {
    match run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
