//! `shard`'s error: every variant names the file (or the option) and the problem.
//!
//! The cause of a failed file operation is part of the message rather than a `source()`: the `shard` and
//! `trainer` binaries print errors with anyhow's `{:#}`, which would print it twice, and the trainer's
//! warnings print `{}`, which would drop it.
//!
//! Some functions work on bytes and do not know which file they came from ([`crate::clean::clean`],
//! [`crate::pack::decode_mask`], [`crate::format::read_samples`]); their errors leave `path` empty and
//! callers that know the file name it with [`Error::in_file`].

use std::fmt;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file or folder could not be read, listed, created, written, renamed or removed.
    #[error("{path}: {action}: {cause}")]
    Io {
        path: PathBuf,
        /// What was being done, e.g. "cannot read".
        action: &'static str,
        cause: std::io::Error,
    },
    /// Image (or mask) bytes that cannot be used: empty, truncated, not an image, a mask of another
    /// kind or size. `pack` skips such inputs and records the problem, unless `--strict`.
    #[error("{}{problem}", Named(.path))]
    Image { path: Option<PathBuf>, problem: String },
    /// An input that does not fit its layout: not a folder, no class folders, a list line that is not
    /// `class/file`, a file without a label or a class outside the class list; or an input folder in
    /// which no file is a readable image (every one skipped).
    #[error("{path}: {problem}")]
    Layout { path: PathBuf, problem: String },
    /// A shard index (`index.json`) that is not valid JSON or of another format.
    #[error("{path}: {problem}")]
    Index { path: PathBuf, problem: String },
    /// An output folder that cannot take the set as asked: it holds another set (no `--force`), an
    /// interrupted run with other options, a damaged journal, or nothing to resume.
    #[error("{path}: {problem}")]
    Output { path: PathBuf, problem: String },
    /// A shard whose tar stream is damaged after `samples` complete samples.
    #[error("{}damaged after {samples} samples: {problem}", Named(.path))]
    Shard { path: Option<PathBuf>, samples: u64, problem: String },
    /// A file of a remote set ([`crate::remote`]) that cannot be read or written: missing, refused,
    /// unreachable, or a URL that names no store.
    #[error("{url}: {problem}")]
    Remote { url: String, problem: String },
    /// An option value that cannot be used, naming the option.
    #[error("{option}: {problem}")]
    InvalidOption { option: &'static str, problem: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A failed file operation on `path`; `action` says what was being done ("cannot read").
    pub fn io(path: impl Into<PathBuf>, action: &'static str, cause: std::io::Error) -> Self {
        Error::Io { path: path.into(), action, cause }
    }

    /// Unusable image bytes whose file is not known here (see [`Error::in_file`]).
    pub fn image(problem: impl Into<String>) -> Self {
        Error::Image { path: None, problem: problem.into() }
    }

    pub fn layout(path: impl Into<PathBuf>, problem: impl Into<String>) -> Self {
        Error::Layout { path: path.into(), problem: problem.into() }
    }

    pub fn output(path: impl Into<PathBuf>, problem: impl Into<String>) -> Self {
        Error::Output { path: path.into(), problem: problem.into() }
    }

    /// Names the file of an error that came from bytes alone; errors that name one already are kept.
    pub fn in_file(self, file: &Path) -> Self {
        match self {
            Error::Image { path: None, problem } => Error::Image { path: Some(file.to_path_buf()), problem },
            Error::Shard { path: None, samples, problem } => {
                Error::Shard { path: Some(file.to_path_buf()), samples, problem }
            }
            other => other,
        }
    }
}

/// Displays an optional path as `path: `, or nothing.
struct Named<'a>(&'a Option<PathBuf>);

impl fmt::Display for Named<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(p) => write!(f, "{}: ", p.display()),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_from_bytes_get_their_file_from_the_caller() {
        let e = Error::image("empty file");
        assert_eq!(e.to_string(), "empty file");
        let e = e.in_file(Path::new("in/a/x.jpg"));
        assert_eq!(e.to_string(), "in/a/x.jpg: empty file");
        // A file already named is kept.
        let e = e.in_file(Path::new("elsewhere"));
        assert_eq!(e.to_string(), "in/a/x.jpg: empty file");
        let e = Error::Shard { path: None, samples: 3, problem: "damaged tar: unexpected EOF".into() };
        assert_eq!(
            e.in_file(Path::new("s/train-000001.tar")).to_string(),
            "s/train-000001.tar: damaged after 3 samples: damaged tar: unexpected EOF"
        );
        let e = Error::io(
            "out/index.json",
            "cannot write",
            std::io::Error::from(std::io::ErrorKind::PermissionDenied),
        );
        assert_eq!(e.to_string(), "out/index.json: cannot write: permission denied");
    }
}
