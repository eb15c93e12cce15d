//! Input layouts: which files go into the shards, with which label, under which key.
//!
//! - class-per-folder (ImageNet train, Caltech-101): every file below `input/<class>/`; class index =
//!   position of the folder name in sorted order, as torchvision's `ImageFolder` assigns it;
//! - a split list (`--list train.txt`): lines `class/file` relative to the input; indices still come from
//!   all class folders, so a train and a test list of one set agree;
//! - ImageNet val: a flat folder plus a labels file (Kaggle `LOC_val_solution.csv`, or `file class` lines);
//! - segmentation pairs: a flat image folder plus a mask folder whose files share the image stems.
//!
//! Files are chosen by place, not by extension; what they contain is decided later, from their bytes.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// One class: its index, its folder name or WordNet id, and a human name when one is known.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ClassInfo {
    pub index: usize,
    pub id: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub name: Option<String>,
}

/// One input sample before cleaning.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Item {
    /// Path relative to the input root, '/'-separated: recorded in the sample's JSON.
    pub rel: String,
    pub key: String,
    pub class: Option<usize>,
    /// Segmentation mask, relative to the mask root.
    pub mask: Option<String>,
}

#[derive(Clone, Debug, Default)]
pub struct LayoutArgs {
    pub list: Option<PathBuf>,
    pub val_labels: Option<PathBuf>,
    pub masks: Option<PathBuf>,
    /// A class list to use verbatim: a packed set's `index.json`, or a text file of `id [name…]` lines.
    pub classes_from: Option<PathBuf>,
    /// A file of `id name…` lines giving human names; found automatically as `classes.txt`,
    /// `LOC_synset_mapping.txt` or `synset_words.txt` in the input folder or its parent.
    pub class_names: Option<PathBuf>,
    /// Follow symbolic links that lead out of the input folder (a subset made of links into a full
    /// copy elsewhere). Without it such links are skipped and recorded, so that a link cannot make
    /// `pack` read (and publish in a shard) what lies outside the folder it was given.
    pub follow_links_out: bool,
}

#[derive(Debug)]
pub struct Plan {
    pub layout: &'static str,
    pub items: Vec<Item>,
    pub classes: Vec<ClassInfo>,
    pub names_file: Option<PathBuf>,
    /// Inputs left out before reading: (path relative to the input, why): symbolic links out of the
    /// input, links to folders inside it (a loop such as `a/up -> ..` among them), and folders outside
    /// reached a second time.
    pub skipped: Vec<(String, String)>,
}

/// Where the walk of an input may go: inside `root` (canonical) unless links out are allowed; never
/// into a folder inside it through a link (it is walked under its own name); into a folder outside it
/// (links out allowed) once, so a loop out there ends.
struct Walk {
    root: PathBuf,
    follow_out: bool,
    visited: HashSet<PathBuf>,
    skipped: Vec<(String, String)>,
}

impl Walk {
    fn new(input: &Path, follow_out: bool) -> Result<Walk> {
        let root = input.canonicalize().map_err(|e| Error::io(input, "cannot resolve", e))?;
        Ok(Walk { root, follow_out, visited: HashSet::new(), skipped: vec![] })
    }

    /// Whether `path` (relative name `rel`) may be read: it resolves inside the input (or links out
    /// are allowed) and, with `once` (a folder to walk), it is not a link to a folder inside the input
    /// (that folder is walked under its own name, and a link to one of its parents is a loop) nor a
    /// folder outside walked before. Otherwise the reason is recorded.
    fn admit(&mut self, path: &Path, rel: &str, once: bool) -> bool {
        // A path that does not resolve (absent, a dangling link) is left to the reader, which records
        // why it cannot be read.
        let Ok(real) = path.canonicalize() else {
            return true;
        };
        if !self.follow_out && !real.starts_with(&self.root) {
            let why = format!(
                "a symbolic link out of the input folder (to {}); --follow-links-out packs it",
                real.display()
            );
            self.skipped.push((rel.to_string(), why));
            return false;
        }
        let is_link = std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink());
        if once && is_link && real.starts_with(&self.root) {
            let why = format!(
                "a symbolic link to a folder inside the input ({}), packed under its own name (or a loop)",
                real.display()
            );
            self.skipped.push((rel.to_string(), why));
            return false;
        }
        if once && !self.visited.insert(real.clone()) {
            let why = format!("a folder reached twice through a symbolic link ({}): a loop", real.display());
            self.skipped.push((rel.to_string(), why));
            return false;
        }
        true
    }
}

/// A user-named text file (a list, a labels or names file), read whole but bounded.
fn read_text(path: &Path) -> std::io::Result<String> {
    common::files::read_text(path, common::files::MAX_TEXT_BYTES)
}

fn is_hidden(name: &str) -> bool {
    name.starts_with('.')
}

/// Sorted names of the regular files (or directories) directly in `dir`, hidden ones left out.
fn list_dir(dir: &Path, want_dirs: bool) -> Result<Vec<String>> {
    let mut out = vec![];
    let cannot_list = |e| Error::io(dir, "cannot list", e);
    for entry in std::fs::read_dir(dir).map_err(cannot_list)? {
        let entry = entry.map_err(cannot_list)?;
        let name = entry.file_name().to_string_lossy().into_owned();
        // Follow symlinks, as ImageFolder does.
        let meta = std::fs::metadata(entry.path());
        let is_dir = meta.as_ref().is_ok_and(|m| m.is_dir());
        if !is_hidden(&name) && is_dir == want_dirs && (is_dir || meta.is_ok_and(|m| m.is_file())) {
            out.push(name);
        }
    }
    out.sort();
    Ok(out)
}

/// All files below `dir`, recursively, as sorted '/'-joined paths relative to `dir`, following
/// symbolic links as ImageFolder does but only where `walk` admits them.
fn walk_files(dir: &Path, prefix: &str, out: &mut Vec<String>, walk: &mut Walk) -> Result<()> {
    for f in list_dir(dir, false)? {
        let rel = format!("{prefix}{f}");
        if walk.admit(&dir.join(&f), &rel, false) {
            out.push(rel);
        }
    }
    for d in list_dir(dir, true)? {
        let rel = format!("{prefix}{d}");
        if walk.admit(&dir.join(&d), &rel, true) {
            walk_files(&dir.join(&d), &format!("{rel}/"), out, walk)?;
        }
    }
    Ok(())
}

/// A key from a relative path: the extension dropped and dots replaced (WebDataset splits the key from
/// the extension at the first dot of the file name).
pub fn key_of(rel: &str) -> String {
    let stem = match rel.rfind('.') {
        Some(dot) if dot > rel.rfind('/').map_or(0, |s| s + 1) => &rel[..dot],
        _ => rel,
    };
    stem.replace('.', "_")
}

/// Makes keys unique in input order by suffixing `_1`, `_2`… (e.g. `a.jpg` and `a.png` in one folder).
fn dedupe_keys(items: &mut [Item]) {
    let mut seen: HashMap<String, usize> = HashMap::new();
    let taken: BTreeSet<String> = items.iter().map(|i| i.key.clone()).collect();
    for item in items.iter_mut() {
        let n = seen.entry(item.key.clone()).or_insert(0);
        if *n > 0 {
            let mut k = *n;
            while taken.contains(&format!("{}_{k}", item.key)) {
                k += 1;
            }
            *n = k;
            item.key = format!("{}_{k}", item.key);
        }
        *n += 1;
    }
}

/// Reads `id name…` lines (e.g. `n01440764 tench, Tinca tinca`); the name is optional.
fn read_names_file(path: &Path) -> Result<Vec<(String, Option<String>)>> {
    let text = read_text(path).map_err(|e| Error::io(path, "cannot read", e))?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| match l.split_once(char::is_whitespace) {
            Some((id, name)) => (id.to_string(), Some(name.trim().to_string())),
            None => (l.to_string(), None),
        })
        .collect())
}

fn find_names_file(input: &Path, given: Option<&Path>) -> Option<PathBuf> {
    if let Some(p) = given {
        return Some(p.to_path_buf());
    }
    let parent = input.parent().map(Path::to_path_buf);
    [Some(input.to_path_buf()), parent]
        .into_iter()
        .flatten()
        .flat_map(|d| ["classes.txt", "LOC_synset_mapping.txt", "synset_words.txt"].map(|f| d.join(f)))
        .find(|p| p.is_file())
}

/// A class list taken verbatim from a packed set's `index.json` or from `id [name]` lines.
fn read_class_list(path: &Path) -> Result<Vec<ClassInfo>> {
    if path.extension().is_some_and(|e| e == "json") {
        let index = crate::index::Index::load(path)?;
        return Ok(index.classes);
    }
    Ok(read_names_file(path)?
        .into_iter()
        .enumerate()
        .map(|(index, (id, name))| ClassInfo { index, id, name })
        .collect())
}

fn classes_from_ids(ids: Vec<String>, names: &HashMap<String, String>) -> Vec<ClassInfo> {
    ids.into_iter()
        .enumerate()
        .map(|(index, id)| ClassInfo { index, name: names.get(&id).cloned(), id })
        .collect()
}

pub fn plan(input: &Path, args: &LayoutArgs) -> Result<Plan> {
    if !input.is_dir() {
        return Err(Error::layout(input, "input is not a directory"));
    }
    let names_file = find_names_file(input, args.class_names.as_deref());
    let names: HashMap<String, String> = match &names_file {
        Some(p) => read_names_file(p)?.into_iter().filter_map(|(id, n)| n.map(|n| (id, n))).collect(),
        None => HashMap::new(),
    };
    let mut plan = if let Some(masks) = &args.masks {
        let mut plan = plan_segmentation(input, masks, args.list.as_deref())?;
        let (mut walk, mut mask_walk) =
            (Walk::new(input, args.follow_links_out)?, Walk::new(masks, args.follow_links_out)?);
        plan.items.retain(|it| {
            walk.admit(&input.join(&it.rel), &it.rel, false)
                && it.mask.as_ref().is_none_or(|m| mask_walk.admit(&masks.join(m), m, false))
        });
        plan.skipped = walk.skipped;
        plan.skipped.extend(mask_walk.skipped);
        plan
    } else if let Some(labels) = &args.val_labels {
        let mut plan = plan_val(input, labels, args.classes_from.as_deref(), &names)?;
        let mut walk = Walk::new(input, args.follow_links_out)?;
        plan.items.retain(|it| walk.admit(&input.join(&it.rel), &it.rel, false));
        plan.skipped = walk.skipped;
        plan
    } else {
        let mut walk = Walk::new(input, args.follow_links_out)?;
        let mut plan =
            plan_folders(input, args.list.as_deref(), args.classes_from.as_deref(), &names, &mut walk)?;
        plan.skipped = walk.skipped;
        plan
    };
    if plan.items.is_empty() {
        let links = match plan.skipped.len() {
            0 => String::new(),
            n => format!(
                "; {n} symbolic links were skipped (e.g. {}: {}); --follow-links-out follows links out of it",
                plan.skipped[0].0, plan.skipped[0].1
            ),
        };
        return Err(Error::layout(input, format!("no input files found ({} layout){links}", plan.layout)));
    }
    dedupe_keys(&mut plan.items);
    plan.names_file = names_file;
    Ok(plan)
}

fn plan_folders(
    input: &Path,
    list: Option<&Path>,
    classes_from: Option<&Path>,
    names: &HashMap<String, String>,
    walk: &mut Walk,
) -> Result<Plan> {
    let folders = list_dir(input, true)?;
    if folders.is_empty() {
        return Err(Error::layout(
            input,
            "no class folders; for a flat folder give --val-labels (ImageNet val) or --masks (segmentation)",
        ));
    }
    let classes = match classes_from {
        Some(p) => read_class_list(p)?,
        None => classes_from_ids(folders.clone(), names),
    };
    let index_of: HashMap<&str, usize> = classes.iter().map(|c| (c.id.as_str(), c.index)).collect();
    let rels: Vec<String> = match list {
        Some(list) => {
            let text = read_text(list).map_err(|e| Error::io(list, "cannot read", e))?;
            let mut rels = vec![];
            for (n, line) in text.lines().enumerate() {
                let rel = line.trim();
                if rel.is_empty() {
                    continue;
                }
                if !rel.contains('/') {
                    return Err(Error::layout(
                        list,
                        format!("line {}: expected `class/file`, got {rel:?}", n + 1),
                    ));
                }
                if !common::files::stays_inside(rel) {
                    return Err(Error::layout(
                        list,
                        format!(
                            "line {}: {rel:?} is not a path inside the input (no `..`, `.`, empty or \
                             absolute parts)",
                            n + 1
                        ),
                    ));
                }
                rels.push(rel.to_string());
            }
            // A listed file is read only where the walk would read it.
            rels.retain(|rel| walk.admit(&input.join(rel), rel, false));
            rels
        }
        None => {
            let mut rels = vec![];
            for folder in &folders {
                // A class folder may itself be a link (inside the input: a second label for the same
                // files, as ImageFolder gives it); only the rule on leaving the input applies to it.
                if walk.admit(&input.join(folder), folder, false) {
                    walk_files(&input.join(folder), &format!("{folder}/"), &mut rels, walk)?;
                }
            }
            rels
        }
    };
    let mut items = Vec::with_capacity(rels.len());
    for rel in rels {
        let class_id = rel.split('/').next().unwrap_or_default();
        let Some(&class) = index_of.get(class_id) else {
            return Err(Error::layout(
                input.join(&rel),
                format!("class folder {class_id:?} is not in the class list"),
            ));
        };
        items.push(Item { key: key_of(&rel), rel, class: Some(class), mask: None });
    }
    let layout = if list.is_some() { "split-list" } else { "class-folders" };
    Ok(Plan { layout, items, classes, names_file: None, skipped: vec![] })
}

/// Parses an ImageNet val labels file: Kaggle's `ImageId,PredictionString` CSV (the first word of the
/// prediction is the WordNet id) or `file class` lines.
fn read_val_labels(path: &Path) -> Result<BTreeMap<String, String>> {
    let text = read_text(path).map_err(|e| Error::io(path, "cannot read", e))?;
    let mut out = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || (n == 0 && line.starts_with("ImageId")) {
            continue;
        }
        let (file, class) = match line.split_once(',') {
            Some((id, pred)) => (id.trim(), pred.split_whitespace().next().unwrap_or_default()),
            None => {
                let mut it = line.split_whitespace();
                (it.next().unwrap_or_default(), it.next().unwrap_or_default())
            }
        };
        if file.is_empty() || class.is_empty() {
            return Err(Error::layout(
                path,
                format!("line {}: expected `file class` or `ImageId,PredictionString`, got {line:?}", n + 1),
            ));
        }
        // Kaggle ids have no extension; plain lists usually do. Match on the stem.
        out.insert(key_of(file), class.to_string());
    }
    Ok(out)
}

fn plan_val(
    input: &Path,
    labels: &Path,
    classes_from: Option<&Path>,
    names: &HashMap<String, String>,
) -> Result<Plan> {
    let labels_by_stem = read_val_labels(labels)?;
    let classes = match classes_from {
        Some(p) => read_class_list(p)?,
        None => {
            let ids: BTreeSet<&String> = labels_by_stem.values().collect();
            if ids.iter().all(|id| id.parse::<usize>().is_ok()) {
                // Integer labels with no class list: the integers are the indices.
                let max = ids.iter().filter_map(|i| i.parse::<usize>().ok()).max().unwrap_or(0);
                (0..=max).map(|i| ClassInfo { index: i, id: i.to_string(), name: None }).collect()
            } else {
                classes_from_ids(ids.into_iter().cloned().collect(), names)
            }
        }
    };
    let index_of: HashMap<&str, usize> = classes.iter().map(|c| (c.id.as_str(), c.index)).collect();
    let mut items = vec![];
    for rel in list_dir(input, false)? {
        let key = key_of(&rel);
        let Some(class_id) = labels_by_stem.get(&key) else {
            if rel.ends_with(".txt") || rel.ends_with(".csv") {
                continue;
            }
            return Err(Error::layout(input.join(&rel), format!("no label in {}", labels.display())));
        };
        let Some(&class) = index_of.get(class_id.as_str()) else {
            return Err(Error::layout(
                input.join(&rel),
                format!("label {class_id:?} is not in the class list"),
            ));
        };
        items.push(Item { rel, key, class: Some(class), mask: None });
    }
    Ok(Plan { layout: "imagenet-val", items, classes, names_file: None, skipped: vec![] })
}

/// Image/mask pairs by stem. With a `list` (Pascal VOC's `ImageSets/Segmentation/train.txt`: one stem
/// per line), only the listed images, which must each have an image and a mask; without one, every image
/// in `input`, which must each have a mask.
fn plan_segmentation(input: &Path, masks: &Path, list: Option<&Path>) -> Result<Plan> {
    let mask_by_stem: HashMap<String, String> =
        list_dir(masks, false)?.into_iter().map(|m| (key_of(&m), m)).collect();
    let images = list_dir(input, false)?;
    let rels: Vec<String> = match list {
        None => images,
        Some(list_path) => {
            let image_by_stem: HashMap<String, &String> = images.iter().map(|r| (key_of(r), r)).collect();
            let text = read_text(list_path).map_err(|e| Error::io(list_path, "cannot read", e))?;
            let mut rels = vec![];
            for (n, line) in text.lines().enumerate() {
                // VOC lists hold bare stems; a `stem.jpg` or a trailing column is accepted too.
                let Some(first) = line.split_whitespace().next() else {
                    continue;
                };
                let Some(rel) = image_by_stem.get(&key_of(first)) else {
                    return Err(Error::layout(
                        list_path,
                        format!("line {}: no image with the stem {first:?} in {}", n + 1, input.display()),
                    ));
                };
                rels.push((*rel).clone());
            }
            rels
        }
    };
    let mut items = vec![];
    for rel in rels {
        let key = key_of(&rel);
        let Some(mask) = mask_by_stem.get(&key) else {
            return Err(Error::layout(
                input.join(&rel),
                format!("no mask with its stem in {}", masks.display()),
            ));
        };
        items.push(Item { rel, key, class: None, mask: Some(mask.clone()) });
    }
    Ok(Plan { layout: "segmentation", items, classes: vec![], names_file: None, skipped: vec![] })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_drop_the_extension_and_dots() {
        assert_eq!(key_of("n01440764/n01440764_10026.JPEG"), "n01440764/n01440764_10026");
        assert_eq!(key_of("Faces.easy/a.b.jpg"), "Faces_easy/a_b");
        assert_eq!(key_of("noext"), "noext");
        let mut items: Vec<Item> = ["c/a.jpg", "c/a.png", "c/a_1.jpg"]
            .iter()
            .map(|r| Item { rel: r.to_string(), key: key_of(r), class: None, mask: None })
            .collect();
        dedupe_keys(&mut items);
        let keys: Vec<_> = items.iter().map(|i| i.key.as_str()).collect();
        assert_eq!(keys, ["c/a", "c/a_2", "c/a_1"]);
    }
}
