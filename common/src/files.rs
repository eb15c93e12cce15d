//! Reading and replacing the files a user names, so that no name can make a tool read forever, allocate
//! what a file's size alone demands, or turn a device node or a folder into a regular file. The tools
//! run as root on shared machines: `--image /dev/zero`, `--out /dev/full` or an index that names a FIFO
//! must be refused with a message, not followed.
//!
//! Errors are `std::io::Error`s of kind `InvalidInput` whose text says what is wrong; callers add the
//! file name and what they were doing, as they do for every other I/O error.

use std::io::{self, Read};
use std::path::Path;

/// The most a user-named text file (a config, a class or split list, a shard index) may hold: far
/// above any real one (ImageNet's train list is 40 MB) and far below what a machine can hold.
pub const MAX_TEXT_BYTES: u64 = 256 << 20;

/// The most an image file may hold: ImageNet's largest JPEG is ~15 MB, a 100 Mpixel PNG ~300 MB.
pub const MAX_IMAGE_BYTES: u64 = 512 << 20;

/// The most pixels an image may have: 8192 x 8192, above the largest photos of ImageNet or COCO. A
/// JPEG of a few KB can declare 30000 x 30000 (2.7 GB decoded), so `pack` refuses such inputs from their
/// header and the loader refuses them again before it allocates.
pub const MAX_IMAGE_PIXELS: u64 = 1 << 26;

/// Refuses image dimensions over [`MAX_IMAGE_PIXELS`]; the message says both.
pub fn check_pixels(width: u64, height: u64) -> Result<(), String> {
    let n = width.saturating_mul(height);
    if n > MAX_IMAGE_PIXELS {
        return Err(format!("{width}x{height} is {n} pixels, over the limit of {MAX_IMAGE_PIXELS}"));
    }
    Ok(())
}

/// The most a weights file (a checkpoint, an exported or official `.safetensors`) may hold: a ViT-g
/// with its optimiser state is ~20 GB.
pub const MAX_WEIGHTS_BYTES: u64 = 64 << 30;

/// Whether a relative name read from input (a list line, a shard name in an index, `run.name`) stays
/// inside the folder it is joined to: not absolute, and no `..`, `.` or empty part (the rule of GNU tar's
/// and Python's `tarfile` `data` filter for member paths). `/` separates parts; `\` and NUL are refused.
pub fn stays_inside(rel: &str) -> bool {
    !rel.starts_with('/')
        && !rel.contains(['\\', '\0'])
        && rel.split('/').all(|c| !c.is_empty() && c != "." && c != "..")
}

fn invalid(problem: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, problem)
}

/// The whole of `path`, which must be a regular file (after symlinks) of at most `max_bytes`.
/// Devices (`/dev/zero`), FIFOs and sockets are refused before a byte is read; a file that grows while
/// it is read is cut at `max_bytes + 1` and refused.
pub fn read_regular(path: &Path, max_bytes: u64) -> io::Result<Vec<u8>> {
    read_open(open_regular(path)?, max_bytes)
}

/// [`read_regular`] of a file that must lie inside the folder `root` (canonical). The check is made on
/// the open handle (its `/proc/self/fd` link), not on the name: a file swapped for a link out of the
/// folder between the listing that admitted it and this read is refused, not read.
pub fn read_regular_inside(path: &Path, root: &Path, max_bytes: u64) -> io::Result<Vec<u8>> {
    use std::os::fd::AsRawFd;
    let file = open_regular(path)?;
    let real = std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd()))
        .or_else(|_| std::fs::canonicalize(path))?;
    if !real.starts_with(root) {
        return Err(invalid(format!("resolves to {}, outside {}", real.display(), root.display())));
    }
    read_open(file, max_bytes)
}

fn read_open(file: std::fs::File, max_bytes: u64) -> io::Result<Vec<u8>> {
    let meta = file.metadata()?;
    if meta.len() > max_bytes {
        return Err(invalid(format!("{} bytes, more than the {max_bytes} this file may hold", meta.len())));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(max_bytes + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max_bytes {
        return Err(invalid(format!("grew past the {max_bytes} bytes this file may hold while read")));
    }
    Ok(bytes)
}

/// Opens `path` for reading only if it is a regular file (after symlinks). The type is checked before
/// the open (opening a FIFO blocks until a writer comes; opening some devices acts on them) and again
/// on the open handle (the name may have been replaced in between); the open itself never blocks.
pub fn open_regular(path: &Path) -> io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let before = std::fs::metadata(path)?;
    if !before.is_file() {
        return Err(invalid(format!("not a regular file ({})", kind_of(&before))));
    }
    // O_NONBLOCK: the open never waits (reads of a regular file ignore it).
    let file = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(invalid(format!("not a regular file ({})", kind_of(&meta))));
    }
    Ok(file)
}

/// [`read_regular`] as UTF-8 text.
pub fn read_text(path: &Path, max_bytes: u64) -> io::Result<String> {
    String::from_utf8(read_regular(path, max_bytes)?).map_err(|_| invalid("not UTF-8 text".into()))
}

/// Whether `path` may be replaced by a new regular file: it is absent, or a regular file (after
/// symlinks). A folder, a device, a FIFO or a socket is refused: renaming a file onto `/dev/full` as
/// root replaces the device node, and renaming onto a folder fails after the data is written.
pub fn check_replaceable(path: &Path) -> io::Result<()> {
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_file() => Ok(()),
        Ok(meta) => Err(invalid(format!("exists and is {}, not a regular file", kind_of(&meta)))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

fn kind_of(meta: &std::fs::Metadata) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    let t = meta.file_type();
    if t.is_dir() {
        "a folder"
    } else if t.is_char_device() || t.is_block_device() {
        "a device"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else {
        "not a plain file"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_read_inside_a_folder_refuses_what_resolves_outside_it() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("in");
        std::fs::create_dir_all(root.join("a")).unwrap();
        std::fs::write(tmp.path().join("secret"), b"outside").unwrap();
        std::fs::write(root.join("a/x.jpg"), b"inside").unwrap();
        let root = std::fs::canonicalize(&root).unwrap();
        assert_eq!(read_regular_inside(&root.join("a/x.jpg"), &root, 100).unwrap(), b"inside");
        // The name admitted by the listing, swapped for a link out before the read.
        std::fs::remove_file(root.join("a/x.jpg")).unwrap();
        std::os::unix::fs::symlink(tmp.path().join("secret"), root.join("a/x.jpg")).unwrap();
        let err = read_regular_inside(&root.join("a/x.jpg"), &root, 100).unwrap_err().to_string();
        assert!(err.contains("outside"), "{err}");
        // A link to a file inside is inside.
        std::fs::write(root.join("b.jpg"), b"b").unwrap();
        std::os::unix::fs::symlink(root.join("b.jpg"), root.join("a/y.jpg")).unwrap();
        assert_eq!(read_regular_inside(&root.join("a/y.jpg"), &root, 100).unwrap(), b"b");
    }

    #[test]
    fn devices_folders_and_oversized_files_are_refused_before_reading() {
        let dir = std::env::temp_dir().join(format!("common-files-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let small = dir.join("small.txt");
        std::fs::write(&small, "abc").unwrap();
        assert_eq!(read_text(&small, 3).unwrap(), "abc");
        let e = read_regular(&small, 2).unwrap_err();
        assert!(e.to_string().contains("3 bytes, more than the 2"), "{e}");
        // /dev/zero would never end; it is refused from its metadata alone.
        let e = read_regular(Path::new("/dev/zero"), MAX_TEXT_BYTES).unwrap_err();
        assert!(e.to_string().contains("not a regular file (a device)"), "{e}");
        let e = read_regular(&dir, MAX_TEXT_BYTES).unwrap_err();
        assert!(e.to_string().contains("a folder") || e.kind() == io::ErrorKind::IsADirectory, "{e}");
        // A FIFO is refused without opening it (an open for reading would wait for a writer forever).
        let fifo = dir.join("fifo");
        assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
        let e = read_regular(&fifo, MAX_TEXT_BYTES).unwrap_err();
        assert!(e.to_string().contains("not a regular file (a FIFO)"), "{e}");
        std::fs::write(dir.join("bad.txt"), [0xFFu8, 0xFE]).unwrap();
        assert!(read_text(&dir.join("bad.txt"), 10).unwrap_err().to_string().contains("UTF-8"));

        for (rel, inside) in
            [("a/b.jpg", true), ("x.tar", true), ("../x", false), ("a/../x", false), ("/abs", false)]
                .into_iter()
                .chain([("a//b", false), ("./a", false), ("", false), ("a\\b", false)])
        {
            assert_eq!(stays_inside(rel), inside, "{rel:?}");
        }

        check_replaceable(&small).unwrap();
        check_replaceable(&dir.join("absent")).unwrap();
        let e = check_replaceable(Path::new("/dev/full")).unwrap_err();
        assert!(e.to_string().contains("a device"), "{e}");
        let e = check_replaceable(&dir).unwrap_err();
        assert!(e.to_string().contains("a folder"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
