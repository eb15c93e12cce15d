//! The shard format: WebDataset tar files (optionally zstd-compressed) whose members `{key}.{ext}` group
//! into samples by key, plus deterministic writing and a streaming reader.
//!
//! Written on the `tar` crate rather than the `webdataset` crate: we need byte-identical output for a seed
//! (fixed headers: mtime 0, uid/gid 0, mode 0644), an inline checksum, temporary names, and a reader that
//! ends a truncated shard cleanly after its last complete sample. `webdataset` is used in a test as an
//! independent reader of what we write.

use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// The largest member a shard may hold: what `pack` accepts as an image file. A bigger size in a header
/// is damage, not a reason to allocate.
pub const MAX_MEMBER_BYTES: u64 = common::files::MAX_IMAGE_BYTES;

/// The longest member name a GNU long-name or PAX header may carry (Linux's `PATH_MAX`, and PAX records
/// beside it): what such a header may make the reader hold.
pub const MAX_NAME_BYTES: u64 = 8192;

/// The most members, and bytes, one sample may hold: an image and its label files (or an image and its
/// mask) with room to spare, and never more than two images' worth of memory.
pub const MAX_SAMPLE_MEMBERS: usize = 64;
pub const MAX_SAMPLE_BYTES: u64 = 2 * MAX_MEMBER_BYTES;

/// Suffix of a shard (or index) while it is being written; renamed away only when complete.
pub const PARTIAL_SUFFIX: &str = ".partial";

/// The file name of shard `n`.
pub fn shard_name(prefix: &str, n: usize, zstd: bool) -> String {
    format!("{prefix}-{n:06}.tar{}", if zstd { ".zst" } else { "" })
}

/// Splits a member name into (key, extension) the WebDataset way: the extension starts at the first dot
/// of the file name, so keys must not contain dots in their last path component.
pub fn split_member(name: &str) -> Option<(&str, &str)> {
    let base_start = name.rfind('/').map_or(0, |i| i + 1);
    let dot = name[base_start..].find('.')? + base_start;
    Some((&name[..dot], &name[dot + 1..]))
}

/// Counts bytes and hashes them on their way to the file.
struct HashWriter<W> {
    inner: W,
    hasher: Sha256,
    bytes: u64,
}

impl<W: Write> Write for HashWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Hashes and counts the raw bytes that pass through: one read of a shard serves its checksum and its
/// samples (`verify`, and a remote shard's check as it streams).
pub(crate) struct HashingReader<R> {
    pub inner: R,
    pub hasher: Sha256,
    pub bytes: u64,
}

impl<R> HashingReader<R> {
    pub fn new(inner: R) -> Self {
        HashingReader { inner, hasher: Sha256::new(), bytes: 0 }
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
}

enum Sink {
    Plain(HashWriter<BufWriter<File>>),
    Zstd(zstd::Encoder<'static, HashWriter<BufWriter<File>>>),
}

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Sink::Plain(w) => w.write(buf),
            Sink::Zstd(w) => w.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Sink::Plain(w) => w.flush(),
            Sink::Zstd(w) => w.flush(),
        }
    }
}

/// What a finished shard is: the facts `index.json` records.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ShardInfo {
    pub name: String,
    pub samples: u64,
    pub bytes: u64,
    pub sha256: String,
}

/// Writes one shard under `{name}.partial` and renames it to `{name}` in [`ShardWriter::finish`]; a crash
/// before that leaves only the `.partial` file, which no reader looks at.
pub struct ShardWriter {
    builder: tar::Builder<Sink>,
    dir: PathBuf,
    name: String,
    samples: u64,
    /// Uncompressed tar bytes so far (headers and padding included).
    tar_bytes: u64,
}

impl ShardWriter {
    pub fn create(dir: &Path, name: &str, zstd_level: Option<i32>) -> Result<Self> {
        let partial = dir.join(format!("{name}{PARTIAL_SUFFIX}"));
        let cannot_create = |e| Error::io(&partial, "cannot create", e);
        let file = File::create(&partial).map_err(cannot_create)?;
        let hw =
            HashWriter { inner: BufWriter::with_capacity(1 << 20, file), hasher: Sha256::new(), bytes: 0 };
        let sink = match zstd_level {
            // Single-threaded zstd: its output is a pure function of input and level.
            Some(level) => Sink::Zstd(zstd::Encoder::new(hw, level).map_err(cannot_create)?),
            None => Sink::Plain(hw),
        };
        let mut builder = tar::Builder::new(sink);
        builder.mode(tar::HeaderMode::Deterministic);
        Ok(ShardWriter { builder, dir: dir.to_path_buf(), name: name.to_string(), samples: 0, tar_bytes: 0 })
    }

    /// The tar size a sample with these member sizes adds (512-byte header per member, data padded to 512;
    /// long names add a GNU long-name block pair).
    pub fn sample_tar_bytes(key: &str, members: &[(&str, &[u8])]) -> u64 {
        members
            .iter()
            .map(|(ext, data)| {
                let name_len = key.len() + 1 + ext.len();
                let long = if name_len > 100 { 512 + (name_len as u64 + 1).div_ceil(512) * 512 } else { 0 };
                512 + long + (data.len() as u64).div_ceil(512) * 512
            })
            .sum()
    }

    /// The file being written.
    fn partial(&self) -> PathBuf {
        self.dir.join(format!("{}{PARTIAL_SUFFIX}", self.name))
    }

    pub fn append(&mut self, key: &str, members: &[(&str, &[u8])]) -> Result<()> {
        for (ext, data) in members {
            let mut header = tar::Header::new_gnu();
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            header.set_mtime(0);
            header.set_uid(0);
            header.set_gid(0);
            header.set_entry_type(tar::EntryType::Regular);
            self.builder
                .append_data(&mut header, format!("{key}.{ext}"), *data)
                .map_err(|e| Error::io(self.partial(), "cannot write", e))?;
        }
        self.tar_bytes += Self::sample_tar_bytes(key, members);
        self.samples += 1;
        Ok(())
    }

    pub fn samples(&self) -> u64 {
        self.samples
    }

    /// The shard's final name (it is written as `{name}.partial` until [`ShardWriter::finish`]).
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn tar_bytes(&self) -> u64 {
        self.tar_bytes
    }

    /// Ends the archive, syncs it to disk, and renames it to its final name.
    pub fn finish(self) -> Result<ShardInfo> {
        let partial = self.partial();
        let cannot_write = |e| Error::io(&partial, "cannot write", e);
        let sink = self.builder.into_inner().map_err(cannot_write)?;
        let mut hw = match sink {
            Sink::Plain(hw) => hw,
            Sink::Zstd(enc) => enc.finish().map_err(cannot_write)?,
        };
        hw.flush().map_err(cannot_write)?;
        let file = hw.inner.into_inner().map_err(|e| cannot_write(e.into_error()))?;
        file.sync_all().map_err(cannot_write)?;
        std::fs::rename(&partial, self.dir.join(&self.name))
            .map_err(|e| Error::io(&partial, "cannot rename to its final name", e))?;
        Ok(ShardInfo {
            name: self.name,
            samples: self.samples,
            bytes: hw.bytes,
            sha256: hex::encode(hw.hasher.finalize()),
        })
    }
}

/// Writes `bytes` to `path` through a temporary name and a rename, so `path` is either absent, the old
/// file, or the whole new one. A `path` that exists as anything but a regular file (a folder, a device
/// such as `/dev/full`) is refused before anything is written; a failed write leaves no temporary file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    common::files::check_replaceable(path).map_err(|e| Error::io(path, "cannot replace", e))?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(PARTIAL_SUFFIX);
    let tmp = PathBuf::from(tmp);
    // A stale temporary (a crash's, or a link planted under its name) is removed, never written through:
    // the new one is created exclusively, so a link made in between fails the create.
    if std::fs::symlink_metadata(&tmp).is_ok_and(|m| !m.is_dir()) {
        std::fs::remove_file(&tmp).map_err(|e| Error::io(&tmp, "cannot remove a stale temporary", e))?;
    }
    let written = (|| {
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()
    })();
    let result = written.map_err(|e| Error::io(&tmp, "cannot write", e)).and_then(|()| {
        std::fs::rename(&tmp, path).map_err(|e| Error::io(&tmp, "cannot rename to its final name", e))
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// One sample of a shard: its key and its members (extension, bytes) in archive order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sample {
    pub key: String,
    pub members: Vec<(String, Vec<u8>)>,
}

impl Sample {
    pub fn get(&self, ext: &str) -> Option<&[u8]> {
        self.members.iter().find(|(e, _)| e == ext).map(|(_, d)| d.as_slice())
    }
}

/// Opens a shard for reading, decompressing `.zst` by name.
pub fn open_shard(path: &Path) -> Result<Box<dyn Read + Send>> {
    let file = open_regular(path)?;
    tar_stream(path, io::BufReader::with_capacity(1 << 20, file))
}

/// Opens a file that must be a regular one (after symlinks): a shard named by an index could otherwise
/// be a device (`/dev/zero` reads forever) or a FIFO.
pub fn open_regular(path: &Path) -> Result<File> {
    common::files::open_regular(path).map_err(|e| Error::io(path, "cannot open", e))
}

/// The tar stream of a shard's raw bytes: `raw` itself, or `raw` decompressed for a `.zst` name. The
/// one place that decides compression (the reader and `verify`, which hashes the raw bytes, share it).
pub fn tar_stream<'a, R: io::BufRead + Send + 'a>(path: &Path, raw: R) -> Result<Box<dyn Read + Send + 'a>> {
    if path.extension().is_some_and(|e| e == "zst") {
        let decoder = zstd::Decoder::with_buffer(raw).map_err(|e| Error::io(path, "cannot open", e))?;
        Ok(Box::new(decoder))
    } else {
        Ok(Box::new(raw))
    }
}

/// Streams the samples of a shard to `f` in archive order. Members sharing a key are consecutive
/// (WebDataset's rule). Returns the number of samples delivered; an [`Error::Shard`] says the shard is
/// damaged after its `samples` complete samples; it names no file, the caller adds it with
/// [`Error::in_file`]. `f` returning `false` stops early.
///
/// A cut shard is always reported, wherever the cut is: a member shorter than its header says, or a
/// stream that ends before the end-of-archive block (the tar crate takes either for a normal end). A
/// sample is delivered only once the next sample's header (or the end block) shows it complete, so the
/// sample in progress at a cut is never delivered, even when the cut falls between two of its members.
pub fn read_samples(reader: impl Read, mut f: impl FnMut(Sample) -> bool) -> Result<u64> {
    let mut spy = EndSpy { inner: reader, ran_dry: false };
    let mut archive = tar::Archive::new(&mut spy);
    let mut delivered = 0u64;
    let mut pending: Option<Sample> = None;
    let mut pending_bytes = 0u64;
    let damaged = |samples: u64, problem: String| Error::Shard { path: None, samples, problem };
    // Raw: the tar crate would read a GNU long name or a PAX header whole, whatever size it declares (a
    // zstd stream can make gigabytes of one); here each is read only up to MAX_NAME_BYTES.
    let entries = archive.entries().map_err(|e| damaged(0, e.to_string()))?.raw(true);
    // The next member's name from a GNU long-name ('L') or PAX ('x') header before it.
    let mut long_name: Option<Vec<u8>> = None;
    for entry in entries {
        let mut entry = entry.map_err(|e| damaged(delivered, format!("damaged tar: {e}")))?;
        let kind = entry.header().entry_type();
        if kind.is_gnu_longname() || kind.is_pax_local_extensions() {
            let size = entry.size();
            if size > MAX_NAME_BYTES {
                let problem = format!(
                    "a member name header of {size} bytes, over the {MAX_NAME_BYTES} a name may take"
                );
                return Err(damaged(delivered, problem));
            }
            let mut data = Vec::with_capacity(size as usize);
            entry
                .read_to_end(&mut data)
                .map_err(|e| damaged(delivered, format!("truncated member name header: {e}")))?;
            if data.len() as u64 != size {
                return Err(damaged(delivered, "truncated member name header".into()));
            }
            long_name = if kind.is_gnu_longname() {
                let end = data.iter().position(|&b| b == 0).unwrap_or(data.len());
                data.truncate(end);
                Some(data)
            } else {
                tar::PaxExtensions::new(&data)
                    .filter_map(|e| e.ok())
                    .find(|e| e.key() == Ok("path"))
                    .map(|e| e.value_bytes().to_vec())
                    .or(long_name)
            };
            continue;
        }
        let long_name = long_name.take();
        if kind != tar::EntryType::Regular {
            continue;
        }
        let name = match long_name {
            Some(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
            None => {
                let path = entry.path().map_err(|e| damaged(delivered, format!("bad member name: {e}")))?;
                path.to_string_lossy().into_owned()
            }
        };
        let Some((key, ext)) = split_member(&name) else {
            continue;
        };
        let (key, ext) = (key.to_string(), ext.to_string());
        // A new key: the sample before it is complete.
        if let Some(done) = pending.take_if(|s| s.key != key) {
            delivered += 1;
            pending_bytes = 0;
            if !f(done) {
                return Ok(delivered);
            }
        }
        let size = entry.size();
        // The header's size is input: it decides neither the allocation (a header may say 1 TiB in a
        // 2 KB file) nor, past the limit, whether the member is read at all.
        if size > MAX_MEMBER_BYTES {
            let problem =
                format!("member {name} declares {size} bytes, over the {MAX_MEMBER_BYTES} a member may hold");
            return Err(damaged(delivered, problem));
        }
        // Nor do a sample's members add up without bound: members of one key are held until the sample
        // is complete.
        let members = pending.as_ref().map_or(0, |s| s.members.len());
        if members >= MAX_SAMPLE_MEMBERS || pending_bytes + size > MAX_SAMPLE_BYTES {
            let problem = format!(
                "sample {key} grows past {MAX_SAMPLE_MEMBERS} members or {MAX_SAMPLE_BYTES} bytes at member {name}"
            );
            return Err(damaged(delivered, problem));
        }
        pending_bytes += size;
        let mut data = Vec::with_capacity(size.min(1 << 20) as usize);
        entry
            .read_to_end(&mut data)
            .map_err(|e| damaged(delivered, format!("truncated member {name}: {e}")))?;
        if data.len() as u64 != size {
            let problem = format!("truncated member {name}: {} of its {size} bytes", data.len());
            return Err(damaged(delivered, problem));
        }
        match &mut pending {
            Some(s) => s.members.push((ext, data)),
            None => pending = Some(Sample { key, members: vec![(ext, data)] }),
        }
    }
    if spy.ran_dry {
        return Err(damaged(delivered, "cut short: the file ends before the end-of-archive block".into()));
    }
    if let Some(done) = pending {
        delivered += 1;
        f(done);
    }
    Ok(delivered)
}

/// Notes whether the stream ran dry. An intact tar ends with zero blocks after which the tar reader
/// stops reading, so running dry means the file was cut.
struct EndSpy<R> {
    inner: R,
    ran_dry: bool,
}

impl<R: Read> Read for EndSpy<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 && !buf.is_empty() {
            self.ran_dry = true;
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn member_names_split_at_the_first_dot_of_the_basename() {
        assert_eq!(split_member("a/b.c/key.seg.png"), Some(("a/b.c/key", "seg.png")));
        assert_eq!(split_member("key.jpg"), Some(("key", "jpg")));
        assert_eq!(split_member("nodot"), None);
    }

    #[test]
    fn predicted_tar_size_matches_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = ShardWriter::create(dir.path(), "s.tar", None).unwrap();
        let long_key = "k".repeat(120);
        w.append("a", &[("jpg", &[1u8; 1000][..]), ("cls", b"7")]).unwrap();
        w.append(&long_key, &[("json", &[2u8; 512][..])]).unwrap();
        let predicted = w.tar_bytes();
        let info = w.finish().unwrap();
        // The archive ends with two zero blocks; GNU tar pads to a 10 KiB record, the tar crate does not.
        assert_eq!(info.bytes, predicted + 1024);
        let mut keys = vec![];
        read_samples(File::open(dir.path().join("s.tar")).unwrap(), |s| {
            keys.push((s.key.clone(), s.members.len()));
            true
        })
        .unwrap();
        assert_eq!(keys, vec![("a".to_string(), 2), (long_key, 1)]);
    }

    /// A temporary name planted as a link to another file is removed, not written through, and the
    /// target is replaced whole.
    #[test]
    fn write_atomic_never_writes_through_a_planted_link() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"keep me").unwrap();
        let out = dir.path().join("out.json");
        std::os::unix::fs::symlink(&victim, dir.path().join("out.json.partial")).unwrap();
        write_atomic(&out, b"new").unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep me");
        assert_eq!(std::fs::read(&out).unwrap(), b"new");
        assert!(!dir.path().join("out.json.partial").exists());
    }

    /// A header that declares a huge member (1 TiB in a file of a few KB) is damage, reported without
    /// allocating what it declares (which aborted the process before); one just over the limit too.
    #[test]
    fn a_member_size_is_not_an_allocation() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = ShardWriter::create(dir.path(), "s.tar", None).unwrap();
        w.append("a", &[("jpg", &[1u8; 700][..]), ("cls", b"1")]).unwrap();
        w.append("b", &[("jpg", &[2u8; 700][..]), ("cls", b"2")]).unwrap();
        w.finish().unwrap();
        let whole = std::fs::read(dir.path().join("s.tar")).unwrap();
        // Sample b's jpg header starts after a's two members (512 + 1024, 512 + 512).
        let at = 2560;
        assert_eq!(&whole[at..at + 5], b"b.jpg");
        for size in [1u64 << 40, MAX_MEMBER_BYTES + 1] {
            let mut bad = whole.clone();
            let mut header = tar::Header::new_gnu();
            header.as_mut_bytes().copy_from_slice(&bad[at..at + 512]);
            header.set_size(size);
            header.set_cksum();
            bad[at..at + 512].copy_from_slice(header.as_bytes());
            let mut keys = vec![];
            match read_samples(&bad[..], |s| {
                keys.push(s.key);
                true
            }) {
                Err(Error::Shard { samples: 1, problem, .. }) => {
                    assert!(problem.contains(&format!("b.jpg declares {size} bytes")), "{problem}")
                }
                other => panic!("size {size}: {other:?}"),
            }
            assert_eq!(keys, ["a"]);
        }
    }

    /// Long member names come in GNU long-name or PAX headers (our writer makes the first for keys over
    /// 100 bytes, Python's tarfile the second); both are read, and neither may declare or hold more than
    /// MAX_NAME_BYTES.
    #[test]
    fn long_names_are_read_and_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let long = "k".repeat(300);
        let mut w = ShardWriter::create(dir.path(), "s.tar", None).unwrap();
        w.append(&long, &[("jpg", &[1u8; 10][..]), ("cls", b"1")]).unwrap();
        w.finish().unwrap();
        let whole = std::fs::read(dir.path().join("s.tar")).unwrap();
        let mut keys = vec![];
        read_samples(&whole[..], |s| {
            keys.push((s.key, s.members.len()));
            true
        })
        .unwrap();
        assert_eq!(keys, [(long.clone(), 2)]);

        let mut b = tar::Builder::new(Vec::new());
        let pax_name = format!("{}.jpg", "p".repeat(250));
        b.append_pax_extensions([("path", pax_name.as_bytes())]).unwrap();
        let mut h = tar::Header::new_ustar();
        h.set_size(3);
        h.set_mode(0o644);
        b.append_data(&mut h, "short.jpg", &b"abc"[..]).unwrap();
        let tar = b.into_inner().unwrap();
        let mut keys = vec![];
        read_samples(&tar[..], |s| {
            keys.push(s.key);
            true
        })
        .unwrap();
        assert_eq!(keys, ["p".repeat(250)]);

        // The long-name header (the first block) declaring 1 TiB, or holding MAX_NAME_BYTES + 1 bytes.
        let mut bad = whole.clone();
        let mut header = tar::Header::new_gnu();
        header.as_mut_bytes().copy_from_slice(&bad[..512]);
        assert!(header.entry_type().is_gnu_longname());
        header.set_size(1 << 40);
        header.set_cksum();
        bad[..512].copy_from_slice(header.as_bytes());
        let err = read_samples(&bad[..], |_| true).unwrap_err().to_string();
        assert!(err.contains("name header of 1099511627776 bytes"), "{err}");
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::GNULongName);
        h.set_size(MAX_NAME_BYTES + 1);
        b.append_data(&mut h, "././@LongLink", &vec![b'n'; MAX_NAME_BYTES as usize + 1][..]).unwrap();
        let err = read_samples(&b.into_inner().unwrap()[..], |_| true).unwrap_err().to_string();
        assert!(err.contains(&format!("name header of {} bytes", MAX_NAME_BYTES + 1)), "{err}");
    }

    #[test]
    fn a_sample_cannot_grow_without_bound() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = ShardWriter::create(dir.path(), "s.tar", None).unwrap();
        w.append("a", &[("jpg", &[1u8; 10][..])]).unwrap();
        let exts: Vec<String> = (0..=MAX_SAMPLE_MEMBERS).map(|i| format!("m{i}")).collect();
        let members: Vec<(&str, &[u8])> = exts.iter().map(|e| (e.as_str(), &b"x"[..])).collect();
        w.append("b", &members).unwrap();
        w.finish().unwrap();
        let mut keys = vec![];
        match read_samples(std::fs::File::open(dir.path().join("s.tar")).unwrap(), |s| {
            keys.push(s.key);
            true
        }) {
            Err(Error::Shard { samples: 1, problem, .. }) => {
                assert!(
                    problem.contains(&format!("sample b grows past {MAX_SAMPLE_MEMBERS} members")),
                    "{problem}"
                )
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(keys, ["a"]);
    }

    /// A shard cut anywhere (inside a header, inside a member's data, between members, between samples)
    /// reads as damaged with the samples before the cut, never as a shorter intact shard: a cut member
    /// would otherwise come out short, and a cut between samples would lose samples silently.
    #[test]
    fn every_cut_of_a_shard_reads_as_damaged() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = ShardWriter::create(dir.path(), "s.tar", None).unwrap();
        for k in 0..3u8 {
            w.append(&format!("k{k}"), &[("jpg", &[k; 1300][..]), ("cls", b"1")]).unwrap();
        }
        w.finish().unwrap();
        let whole = std::fs::read(dir.path().join("s.tar")).unwrap();
        // Each sample is 512 + 1536 (jpg) + 512 + 512 (cls) bytes; then two zero blocks.
        let sample = 3072;
        assert_eq!(whole.len(), 3 * sample + 1024);
        for cut in (0..3 * sample + 1024).step_by(256).chain([1, 700, 2500, 3 * sample + 1023]) {
            let mut seen = vec![];
            let result = read_samples(&whole[..cut], |s| {
                seen.push((s.key.clone(), s.members.iter().map(|(_, d)| d.len()).collect::<Vec<_>>()));
                true
            });
            // A sample is known complete once the next one's header (or the end-of-archive block) is
            // read; whatever follows the first end-of-archive block carries nothing, so a cut there loses
            // nothing and the tar reader stops before it.
            let complete = (1..=3).filter(|k| cut >= k * sample + 512).count() as u64;
            match result {
                Err(Error::Shard { samples, .. }) if cut < 3 * sample + 512 => {
                    assert_eq!(samples, complete, "cut at {cut}")
                }
                Ok(3) if cut >= 3 * sample + 512 => {}
                other => panic!("cut at {cut} of {}: {other:?}, samples {seen:?}", whole.len()),
            }
            assert_eq!(seen.len() as u64, complete, "cut at {cut}: {seen:?}");
            assert!(seen.iter().all(|(_, lens)| lens == &[1300, 1]), "cut at {cut}: {seen:?}");
        }
        assert_eq!(read_samples(&whole[..], |_| true).unwrap(), 3);
    }
}
