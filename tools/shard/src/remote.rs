//! Shard sets that are not in a local folder: in an object store (`s3://`, `gs://`, `az://`, through the
//! `object_store` crate), behind a web server (`http(s)://`), or printed by a command (`pipe:`, as
//! WebDataset has it); and the local cache that keeps their shards for later epochs.
//!
//! A remote set is named by its URL wherever a folder is taken (`--shards`, `data.shards`, `--train`,
//! `shard verify`, `shard pack --out`): the URL travels as the text of the `PathBuf` the folder would be,
//! and [`remote_url`] tells the two apart, so the code between the command line and the reader is the same
//! for both. The URL names the set's folder (`s3://bucket/imagenet/train`) or its `index.json`.
//!
//! **Credentials and endpoints** come from each cloud's own environment variables, read by the crate's
//! builders, never from our configs: `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`,
//! `AWS_REGION` / `AWS_DEFAULT_REGION`, `AWS_ENDPOINT_URL` for an S3-compatible store (MinIO, Ceph, R2;
//! an `http://` endpoint is allowed because it was asked for by name), and what they leave unset from the
//! AWS CLI's `~/.aws/credentials` and `~/.aws/config` (profile `AWS_PROFILE`); `GOOGLE_SERVICE_ACCOUNT` (a key
//! file) or the instance's metadata server for GCS; `AZURE_STORAGE_ACCOUNT_NAME` with
//! `AZURE_STORAGE_ACCOUNT_KEY` or `AZURE_STORAGE_SAS_KEY` for Azure. On AWS machines the instance or
//! task role works with no variable at all.
//!
//! **Streaming and retries.** A file is read while it downloads, in 8 MiB range requests fetched at most
//! two ahead of its reader (each request completes at network speed, so no request outlives the clients'
//! 30 s timeout however slowly training reads, and memory stays at two ranges per open shard), each
//! carrying the first range's ETag (a file replaced mid-read is an error, not a mix). A web server that
//! ignores ranges streams the file whole instead. Transient failures (5xx, throttling, a cut connection)
//! are retried by `object_store` itself, up to 10 times with exponential back-off within 3 minutes.
//! Permanent ones (bucket or object missing, access refused, no credentials) fail at once with the URL
//! and the cause.
//!
//! **The cache** ([`Cache`]) holds whole shards, named by the SHA-256 that `index.json` lists for them,
//! so a repacked set never reads a stale copy and two sets sharing a shard share it. A shard is written
//! to a temporary name while it streams, then synced and renamed into place only if its size and digest
//! are the index's: a half-downloaded or corrupted download is never kept, and a kept copy is checked
//! again as it is read (one damaged on disk anyway is reported and removed). Processes of one machine
//! share the folder (each writes its own temporary; the rename is atomic; a copy evicted by another
//! process while being opened is simply downloaded again). Eviction removes the least recently used
//! copies until the cache is under its limit, and the temporaries of processes that died mid-download.
//! The samples of a shard reach the reader as they stream: a shard corrupted in the store (or a cached
//! copy damaged on disk) is found at its end ([`TarReader::finish`]), after its samples were read; the
//! loader then stops, and the run with it (`shard verify` checks a set before a run).
//!
//! **`pipe:COMMAND`**: the command runs under `sh -c` once per file, with `{}` standing for the file's
//! name in the set (`index.json`, then each shard's), and its standard output is the file:
//! `pipe:aws s3 cp s3://bucket/set/{} -`, `pipe:curl -sf https://host/set/{}`. The name is passed to the
//! shell as a positional parameter (`"$1"`), never spliced into the command's text, so a hostile shard
//! name in an index cannot run anything.

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use bytes::Bytes;
use futures_util::StreamExt;
use object_store::path::Path as Key;
use object_store::{ObjectStore, ObjectStoreExt, ObjectStoreScheme};
use sha2::Digest;

use crate::error::{Error, Result};
use crate::format::{HashingReader, ShardInfo};

/// The URL beginnings read as remote sets; `object_store`'s schemes for its stores, and WebDataset's `pipe:`.
const SCHEMES: [&str; 10] =
    ["s3://", "s3a://", "gs://", "az://", "abfs://", "abfss://", "azure://", "http://", "https://", "pipe:"];

/// The text of `path` when it names a remote set (it starts with one of the schemes above).
pub fn remote_url(path: &Path) -> Option<&str> {
    let s = path.to_str()?;
    SCHEMES.iter().any(|p| s.starts_with(p)).then_some(s)
}

/// A remote file is read in ranges of this size, each one request: a request completes at network
/// speed whatever pace the reader keeps (a body paced by training would outlive the clients' 30 s request
/// timeout on a large shard), and each is retried on its own.
const RANGE: u64 = 8 << 20;

/// Ranges fetched ahead of the reader, per open file (memory: this many ranges per open shard).
const RANGES_AHEAD: usize = 2;

/// What the AWS CLI's files say for the profile `AWS_PROFILE` (or `default`): `~/.aws/config`'s
/// `[default]` or `[profile NAME]` section, then `~/.aws/credentials`' `[NAME]` over it (the files
/// `AWS_CONFIG_FILE` and `AWS_SHARED_CREDENTIALS_FILE` name instead, when set). `object_store` reads the
/// environment and instance roles only; these fill in what the environment leaves unset.
fn aws_profile() -> std::collections::HashMap<String, String> {
    let profile = std::env::var("AWS_PROFILE").unwrap_or_else(|_| "default".into());
    let home = std::env::var_os("HOME").map(PathBuf::from);
    let file = |var: &str, name: &str| {
        std::env::var_os(var).map(PathBuf::from).or_else(|| home.as_ref().map(|h| h.join(".aws").join(name)))
    };
    let mut out = std::collections::HashMap::new();
    let config_section = if profile == "default" { profile.clone() } else { format!("profile {profile}") };
    if let Some(path) = file("AWS_CONFIG_FILE", "config") {
        out.extend(ini_section(&path, &config_section));
    }
    if let Some(path) = file("AWS_SHARED_CREDENTIALS_FILE", "credentials") {
        out.extend(ini_section(&path, &profile));
    }
    out
}

/// The `key = value` lines of section `[wanted]` of an INI file (none if it cannot be read).
fn ini_section(path: &Path, wanted: &str) -> Vec<(String, String)> {
    let Ok(text) = common::files::read_text(path, common::files::MAX_TEXT_BYTES) else { return vec![] };
    let (mut inside, mut out) = (false, vec![]);
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            inside = name.trim() == wanted;
        } else if inside && let Some((k, v)) = line.split_once('=') {
            out.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    out
}

/// Chunks of a streamed body held between the download and the reader (each is what one network read
/// gave, typically 8 to 64 KiB): for a web server that ignores range requests.
const CHANNEL_CHUNKS: usize = 16;

/// The runtime that drives the HTTP clients: two threads are plenty for a few streams at a time, and it
/// is our own so that callers need no runtime of theirs (the loader's reader threads are plain threads).
fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("shard-io")
            .enable_all()
            .build()
            .expect("cannot start the I/O runtime (no threads left?)")
    })
}

/// Runs `f` on the I/O runtime and waits for it; callable from any thread, async contexts included.
fn block<T: Send + 'static>(f: impl Future<Output = T> + Send + 'static) -> io::Result<T> {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    runtime().spawn(async move {
        let _ = tx.send(f.await);
    });
    rx.recv().map_err(|_| io::Error::other("the I/O task ended without an answer"))
}

/// A remote shard set: where its files are and how to read them.
pub struct RemoteSet {
    /// The set's URL without a trailing `/` or `index.json`: `{url}/{name}` names each file in messages.
    pub url: String,
    source: Source,
    /// Cleared once the server has answered a range request with the whole file (a plain web server):
    /// its files are then asked for whole, with no range request first.
    ranges: std::sync::atomic::AtomicBool,
}

enum Source {
    /// `list`: the store can list a prefix (an HTTP server cannot: its files are asked for one by one).
    Store {
        store: Arc<dyn ObjectStore>,
        prefix: Key,
        list: bool,
    },
    Pipe {
        command: String,
    },
}

impl std::fmt::Debug for RemoteSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteSet").field("url", &self.url).finish()
    }
}

/// An error about the remote file `url`.
fn remote_error(url: &str, problem: impl Into<String>) -> Error {
    Error::Remote { url: url.to_string(), problem: problem.into() }
}

/// `object_store`'s error in words a user acts on: which of missing, refused or unreachable it is, then
/// the store's own message (which carries the server's, e.g. `NoSuchBucket`).
fn explain(e: &object_store::Error) -> String {
    use object_store::Error as E;
    let text = e.to_string();
    // The server's own code first (S3's error body), then the status the crate classified.
    let what = if text.contains("169.254.169.254") || text.contains("169.254.170.2") {
        // No key in the environment: the crate asked the instance metadata service, and there is none.
        "no credentials found (set the store's variables: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY for \
         S3, GOOGLE_SERVICE_ACCOUNT for GCS, AZURE_STORAGE_ACCOUNT_NAME and AZURE_STORAGE_ACCOUNT_KEY for \
         Azure; or AWS_SKIP_SIGNATURE=true for a public bucket; or run where an instance role provides them)"
    } else if text.contains("NoSuchBucket") {
        "the bucket does not exist"
    } else if ["InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken"]
        .iter()
        .any(|code| text.contains(code))
    {
        "the credentials were refused"
    } else {
        match e {
            E::NotFound { .. } => "no such object",
            E::PermissionDenied { .. } => "access denied (check the credentials and the bucket's policy)",
            E::Unauthenticated { .. } => "not authenticated (check the credentials)",
            _ if text.contains("AccessDenied") => {
                "access denied (check the credentials and the bucket's policy)"
            }
            _ => "request failed",
        }
    };
    format!("{what}: {text}")
}

impl RemoteSet {
    /// The set at `url` (its folder or its `index.json`); no request is made yet.
    pub fn open(url: &str) -> Result<RemoteSet> {
        let base =
            url.strip_suffix(crate::index::INDEX_FILE).unwrap_or(url).trim_end_matches('/').to_string();
        if let Some(command) = base.strip_prefix("pipe:") {
            if !command.contains("{}") {
                return Err(remote_error(
                    url,
                    "a pipe: command needs {} where each file's name goes, e.g. `pipe:curl -sf https://host/set/{}`",
                ));
            }
            return Ok(RemoteSet {
                url: base.clone(),
                source: Source::Pipe { command: command.to_string() },
                ranges: true.into(),
            });
        }
        let parsed =
            url::Url::parse(&base).map_err(|e| remote_error(url, format!("not a valid URL: {e}")))?;
        let (scheme, prefix) = ObjectStoreScheme::parse(&parsed)
            .map_err(|e| remote_error(url, format!("not a store URL: {e}")))?;
        fn built<S: ObjectStore>(url: &str, store: object_store::Result<S>) -> Result<Arc<dyn ObjectStore>> {
            match store {
                Ok(s) => Ok(Arc::new(s)),
                Err(e) => Err(remote_error(url, format!("cannot set up the store: {e}"))),
            }
        }
        let store: Arc<dyn ObjectStore> = match scheme {
            ObjectStoreScheme::AmazonS3 => {
                use object_store::aws::AmazonS3ConfigKey as K;
                let mut b = object_store::aws::AmazonS3Builder::from_env().with_url(&base);
                // The AWS CLI's files, for what the environment leaves unset: the key only as a whole
                // (id, secret and token from one place), the region, the endpoint.
                let profile = aws_profile();
                let unset = |vars: &[&str]| vars.iter().all(|v| std::env::var_os(v).is_none());
                let mut from_file = |key: K, name: &str| {
                    if let Some(v) = profile.get(name) {
                        b = std::mem::take(&mut b).with_config(key, v);
                    }
                };
                if unset(&["AWS_ACCESS_KEY_ID"]) {
                    from_file(K::AccessKeyId, "aws_access_key_id");
                    from_file(K::SecretAccessKey, "aws_secret_access_key");
                    from_file(K::Token, "aws_session_token");
                }
                if unset(&["AWS_REGION", "AWS_DEFAULT_REGION"]) {
                    from_file(K::Region, "region");
                }
                let endpoints = ["AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_ENDPOINT"];
                if unset(&endpoints) {
                    from_file(K::Endpoint, "endpoint_url");
                }
                // An endpoint named by hand as http:// (a MinIO on the LAN, a test server) is meant as
                // such; the crate refuses plain HTTP unless told.
                let endpoint = endpoints
                    .iter()
                    .find_map(|k| std::env::var(k).ok())
                    .or_else(|| profile.get("endpoint_url").cloned());
                if endpoint.is_some_and(|e| e.starts_with("http://")) {
                    b = b.with_allow_http(true);
                }
                built(url, b.build())?
            }
            ObjectStoreScheme::GoogleCloudStorage => {
                built(url, object_store::gcp::GoogleCloudStorageBuilder::from_env().with_url(&base).build())?
            }
            ObjectStoreScheme::MicrosoftAzure => {
                built(url, object_store::azure::MicrosoftAzureBuilder::from_env().with_url(&base).build())?
            }
            ObjectStoreScheme::Http => {
                let origin = &parsed[..url::Position::BeforePath];
                // A server that ignores ranges sends a shard as one body, paced by the reader: no limit on
                // the whole request, only on the wait for each read.
                let options = object_store::ClientOptions::new()
                    .with_allow_http(parsed.scheme() == "http")
                    .with_timeout_disabled()
                    .with_read_timeout(std::time::Duration::from_secs(120));
                built(
                    url,
                    object_store::http::HttpBuilder::new()
                        .with_url(origin)
                        .with_client_options(options)
                        .build(),
                )?
            }
            other => return Err(remote_error(url, format!("{other:?} is not a remote store"))),
        };
        let list = scheme != ObjectStoreScheme::Http;
        Ok(RemoteSet { url: base, source: Source::Store { store, prefix, list }, ranges: true.into() })
    }

    /// The set at `url`, built once per process and URL: a store's client keeps its connections and
    /// credentials (an instance role's token) for every shard read after.
    pub fn shared(url: &str) -> Result<Arc<RemoteSet>> {
        static SETS: OnceLock<std::sync::Mutex<std::collections::HashMap<String, Arc<RemoteSet>>>> =
            OnceLock::new();
        let sets = SETS.get_or_init(Default::default);
        if let Some(set) = sets.lock().ok().and_then(|m| m.get(url).cloned()) {
            return Ok(set);
        }
        let set = Arc::new(RemoteSet::open(url)?);
        if let Ok(mut m) = sets.lock() {
            m.insert(url.to_string(), set.clone());
        }
        Ok(set)
    }

    /// The URL of file `name` of the set, for messages.
    pub fn file_url(&self, name: &str) -> String {
        format!("{}/{name}", self.url)
    }

    fn key(prefix: &Key, name: &str) -> Key {
        prefix.clone().join(name)
    }

    /// The store and the key of file `name`, for writing: a `pipe:` set has neither.
    fn writable(&self, name: &str) -> Result<(Arc<dyn ObjectStore>, Key)> {
        match &self.source {
            Source::Store { store, prefix, .. } => Ok((store.clone(), Self::key(prefix, name))),
            Source::Pipe { .. } => Err(remote_error(&self.file_url(name), "a pipe: set is read-only")),
        }
    }

    /// Reads file `name` whole, refusing more than `max_bytes` (an index, not a shard).
    pub fn read_small(&self, name: &str, max_bytes: u64) -> Result<Vec<u8>> {
        let url = self.file_url(name);
        let mut bytes = vec![];
        self.reader(name)?
            .take(max_bytes + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| remote_error(&url, format!("cannot read: {e}")))?;
        if bytes.len() as u64 > max_bytes {
            return Err(remote_error(
                &url,
                format!("larger than the {max_bytes} bytes such a file may have"),
            ));
        }
        Ok(bytes)
    }

    /// The raw bytes of file `name`, streamed as they arrive. A missing object or a refused request is
    /// an error here; a failure later in the body is an error of the returned reader.
    pub fn reader(&self, name: &str) -> Result<Box<dyn Read + Send>> {
        let url = self.file_url(name);
        match &self.source {
            Source::Pipe { command } => pipe_reader(command, name, &url),
            Source::Store { store, prefix, .. } => {
                use std::sync::atomic::Ordering::Relaxed;
                let key = Self::key(prefix, name);
                if !self.ranges.load(Relaxed) {
                    return streamed_reader(store.clone(), key, url);
                }
                let (first_store, first_key) = (store.clone(), key.clone());
                let first = block(async move {
                    let got = first_store.get_opts(&first_key, ranged(0..RANGE, None)).await?;
                    let (size, etag) = (got.meta.size, got.meta.e_tag.clone());
                    Ok::<_, object_store::Error>((size, etag, got.bytes().await?))
                })
                .map_err(|e| remote_error(&url, e.to_string()))?;
                match first {
                    Ok((size, etag, bytes)) => Ok(ranged_reader(store.clone(), key, url, size, etag, bytes)),
                    // A plain web server that ignores ranges: its body, streamed.
                    Err(e)
                        if matches!(e, object_store::Error::NotSupported { .. })
                            || e.to_string().contains("non-partial response") =>
                    {
                        self.ranges.store(false, Relaxed);
                        streamed_reader(store.clone(), key, url)
                    }
                    Err(e) => Err(remote_error(&url, explain(&e))),
                }
            }
        }
    }

    /// The sizes of files `names` as the store lists them, `None` for one that is not there; `None`
    /// altogether where the source cannot say without reading (`pipe:`). One listing of the prefix
    /// where the store can list, one HEAD per file (sixteen at a time) where it cannot (HTTP).
    pub fn sizes(&self, names: &[&str]) -> Result<Option<Vec<Option<u64>>>> {
        let Source::Store { store, prefix, list } = &self.source else {
            return Ok(None);
        };
        let (store, prefix, can_list) = (store.clone(), prefix.clone(), *list);
        let wanted: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let url = self.url.clone();
        let listed = block(async move {
            use std::collections::HashMap;
            let listing = if can_list {
                store.list_with_delimiter(Some(&prefix)).await
            } else {
                Err(object_store::Error::NotSupported { source: "an HTTP server lists nothing".into() })
            };
            match listing {
                Ok(list) => {
                    let found: HashMap<String, u64> = list
                        .objects
                        .into_iter()
                        .filter_map(|o| Some((o.location.filename()?.to_string(), o.size)))
                        .collect();
                    Ok(wanted.iter().map(|n| found.get(n).copied()).collect())
                }
                Err(
                    // An HTTP server, or a read-only role without the right to list: ask for each file.
                    object_store::Error::NotSupported { .. }
                    | object_store::Error::NotImplemented { .. }
                    | object_store::Error::PermissionDenied { .. },
                ) => {
                    let heads = futures_util::stream::iter(wanted.into_iter().map(|n| {
                        let (store, key) = (store.clone(), Self::key(&prefix, &n));
                        async move {
                            match store.head(&key).await {
                                Ok(meta) => Ok(Some(meta.size)),
                                Err(object_store::Error::NotFound { .. }) => Ok(None),
                                Err(e) => Err(explain(&e)),
                            }
                        }
                    }))
                    .buffered(16)
                    .collect::<Vec<_>>()
                    .await;
                    heads.into_iter().collect()
                }
                Err(e) => Err(explain(&e)),
            }
        })
        .map_err(|e| remote_error(&url, e.to_string()))?;
        listed.map(Some).map_err(|problem| remote_error(&self.url, format!("cannot list the set: {problem}")))
    }

    /// Uploads the local file `local` as file `name` of the set: in one request up to 8 MiB, as a
    /// multipart upload (8 MiB parts, a few in flight) above, so that each request fits the clients' 30 s
    /// timeout at 0.3 MB/s. The object appears whole or not at all: a failed upload is aborted.
    pub fn upload(&self, name: &str, local: &Path) -> Result<()> {
        let url = self.file_url(name);
        let (store, key) = self.writable(name)?;
        let mut file = crate::format::open_regular(local)?;
        let len = file.metadata().map_err(|e| Error::io(local, "cannot read", e))?.len();
        const SINGLE: u64 = RANGE;
        const PART: usize = RANGE as usize;
        let done = if len <= SINGLE {
            let mut bytes = Vec::with_capacity(len as usize);
            file.read_to_end(&mut bytes).map_err(|e| Error::io(local, "cannot read", e))?;
            block(async move { store.put(&key, bytes.into()).await.map(|_| ()) })
        } else {
            // `Some(part)` for each part, `None` once the file is read whole: a channel that closes without
            // it (the file could not be read) aborts the upload, so no truncated object is completed and
            // no part is left behind.
            let (tx, mut rx) = tokio::sync::mpsc::channel::<Option<Bytes>>(2);
            let task = runtime().spawn(async move {
                let upload = store.put_multipart(&key).await?;
                let mut writer = object_store::WriteMultipart::new_with_chunk_size(upload, PART);
                loop {
                    match rx.recv().await {
                        Some(Some(part)) => match writer.wait_for_capacity(4).await {
                            Ok(()) => writer.put(part),
                            Err(e) => {
                                let _ = writer.abort().await;
                                return Err(e);
                            }
                        },
                        Some(None) => return writer.finish().await.map(|_| ()),
                        None => {
                            let _ = writer.abort().await;
                            return Ok(());
                        }
                    }
                }
            });
            let mut buf = vec![0u8; PART];
            // A plain thread sends (this is not called from async code: `blocking_send` would panic there).
            let read = loop {
                match read_full(&mut file, &mut buf) {
                    Ok(0) => {
                        let _ = tx.blocking_send(None);
                        break Ok(());
                    }
                    Ok(n) if tx.blocking_send(Some(Bytes::copy_from_slice(&buf[..n]))).is_ok() => {}
                    Ok(_) => break Ok(()), // the upload failed: its error comes from the task
                    Err(e) => break Err(e),
                }
            };
            drop(tx);
            let done = block(async move {
                task.await.unwrap_or_else(|e| Err(object_store::Error::JoinError { source: e }))
            });
            read.map_err(|e| Error::io(local, "cannot read", e))?;
            done
        };
        done.map_err(|e| remote_error(&url, e.to_string()))?.map_err(|e| remote_error(&url, explain(&e)))
    }

    /// Removes the set's `index.json` if there is one: done before a set's shards are replaced, so that no
    /// reader pairs the old index with new shards.
    pub fn remove_index(&self) -> Result<()> {
        let url = self.file_url(crate::index::INDEX_FILE);
        let (store, key) = self.writable(crate::index::INDEX_FILE)?;
        match block(async move { store.delete(&key).await }).map_err(|e| remote_error(&url, e.to_string()))? {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(remote_error(&url, explain(&e))),
        }
    }
}

/// What [`push`] did: shards uploaded, shards the store already held as the index lists them.
#[derive(Debug, Default, PartialEq)]
pub struct Pushed {
    pub uploaded: usize,
    pub kept: usize,
    pub bytes: u64,
}

/// Uploads the finished set in folder `dir` to the remote set `url`: each shard the store does not already
/// hold as this index lists it, then `index.json` last, so that a reader sees either the old index or
/// the new one with all its shards, never an index whose shards are still on their way. A store holding
/// another index for the set has that index removed first (its readers then see no set, not a mixed one).
/// Run again after an interruption, it uploads only what is missing: a shard counts as there when the
/// store lists it at its size and the remote index (if any) lists its digest.
pub fn push(dir: &Path, url: &str, quiet: bool) -> Result<Pushed> {
    use crate::index::{INDEX_FILE, Index};
    let index = Index::load(dir)?;
    let set = RemoteSet::shared(url)?;
    set.writable(INDEX_FILE)?;
    let remote = match Index::load(Path::new(url)) {
        Ok(i) => Some(i),
        Err(Error::Remote { problem, .. }) if problem.starts_with("no such object") => None,
        Err(e) => return Err(e),
    };
    if remote.as_ref().is_some_and(|r| r != &index) {
        set.remove_index()?;
    }
    let names: Vec<&str> = index.shards.iter().map(|s| s.name.as_str()).collect();
    let sizes = set.sizes(&names)?.unwrap_or_default();
    let mut done = Pushed::default();
    for (i, shard) in index.shards.iter().enumerate() {
        let listed_there = remote
            .as_ref()
            .is_none_or(|r| r.shards.iter().any(|s| s.name == shard.name && s.sha256 == shard.sha256));
        if sizes.get(i).copied().flatten() == Some(shard.bytes) && listed_there {
            done.kept += 1;
            continue;
        }
        set.upload(&shard.name, &dir.join(&shard.name))?;
        done.uploaded += 1;
        done.bytes += shard.bytes;
        if !quiet {
            eprintln!("uploaded {} ({} of {})", set.file_url(&shard.name), i + 1, index.shards.len());
        }
    }
    set.upload(INDEX_FILE, &dir.join(INDEX_FILE))?;
    Ok(done)
}

/// A GET of `range`, of the object version `etag` where known (a file replaced between two ranges is an
/// error, not a mix of two files).
fn ranged(range: std::ops::Range<u64>, etag: Option<String>) -> object_store::GetOptions {
    object_store::GetOptions { range: Some(range.into()), if_match: etag, ..Default::default() }
}

/// The reader of a file of `size` bytes whose first range, `first`, has arrived: the next ranges are
/// fetched [`RANGES_AHEAD`] at most ahead of the reader.
fn ranged_reader(
    store: Arc<dyn ObjectStore>,
    key: Key,
    url: String,
    size: u64,
    etag: Option<String>,
    first: Bytes,
) -> Box<dyn Read + Send> {
    // A bounded channel whose sender awaits (a full one must not hold one of the runtime's two threads
    // while other shards' downloads wait for it) and whose receiver blocks in plain `std` fashion
    // (readers may be called from inside another runtime): an unbounded std channel, with credits the
    // reader hands back as it takes chunks. The first range is in the channel already.
    let (tx, task_credits, reader) = ChannelReader::new(RANGES_AHEAD - 1);
    let mut offset = first.len() as u64;
    let _ = tx.send(Ok(first));
    runtime().spawn(async move {
        while offset < size {
            match task_credits.acquire().await {
                Ok(permit) => permit.forget(),
                Err(_) => break, // the reader is gone
            }
            let end = (offset + RANGE).min(size);
            let chunk = match store.get_opts(&key, ranged(offset..end, etag.clone())).await {
                Ok(got) => got.bytes().await,
                Err(e) => Err(e),
            };
            let chunk = chunk.map_err(|e| io::Error::other(format!("{url}: {}", explain(&e))));
            let failed = chunk.is_err();
            if tx.send(chunk).is_err() || failed {
                break;
            }
            offset = end;
        }
    });
    Box::new(reader)
}

/// The reader of a file whose server sends it whole (no ranges): its body as it streams, paced by the
/// reader through [`CHANNEL_CHUNKS`] credits.
fn streamed_reader(store: Arc<dyn ObjectStore>, key: Key, url: String) -> Result<Box<dyn Read + Send>> {
    let got = block(async move { store.get(&key).await })
        .map_err(|e| remote_error(&url, e.to_string()))?
        .map_err(|e| remote_error(&url, explain(&e)))?;
    let (tx, task_credits, reader) = ChannelReader::new(CHANNEL_CHUNKS);
    runtime().spawn(async move {
        let mut body = got.into_stream();
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| io::Error::other(format!("{url}: {}", explain(&e))));
            let failed = chunk.is_err();
            match task_credits.acquire().await {
                Ok(permit) => permit.forget(),
                Err(_) => break,
            }
            if tx.send(chunk).is_err() || failed {
                break;
            }
        }
    });
    Ok(Box::new(reader))
}

/// Reads until `buf` is full or the input ends; the count read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// The reading end of a download: chunks from the I/O runtime, handed out as `Read`.
struct ChannelReader {
    rx: std::sync::mpsc::Receiver<io::Result<Bytes>>,
    credits: Arc<tokio::sync::Semaphore>,
    chunk: Bytes,
}

type Chunks = std::sync::mpsc::Sender<io::Result<Bytes>>;

impl ChannelReader {
    /// The reader, the sender of its chunks, and the credits the sender must take one of per chunk
    /// (`ahead` at first; the reader hands one back per chunk it takes).
    fn new(ahead: usize) -> (Chunks, Arc<tokio::sync::Semaphore>, ChannelReader) {
        let (tx, rx) = std::sync::mpsc::channel();
        let credits = Arc::new(tokio::sync::Semaphore::new(ahead));
        (tx, credits.clone(), ChannelReader { rx, credits, chunk: Bytes::new() })
    }
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.chunk.is_empty() {
            let got = self.rx.recv();
            self.credits.add_permits(1);
            match got {
                Ok(Ok(chunk)) => self.chunk = chunk,
                Ok(Err(e)) => return Err(e),
                Err(_) => return Ok(0),
            }
        }
        let n = buf.len().min(self.chunk.len());
        buf[..n].copy_from_slice(&self.chunk.split_to(n));
        Ok(n)
    }
}

impl Drop for ChannelReader {
    fn drop(&mut self) {
        // A download waiting for credits learns that nobody reads any more, and ends.
        self.credits.close();
    }
}

/// A `pipe:` file: the command's standard output; its exit status checked at the end.
fn pipe_reader(command: &str, name: &str, url: &str) -> Result<Box<dyn Read + Send>> {
    use std::process::{Command, Stdio};
    if name.starts_with('-') {
        return Err(remote_error(
            url,
            "a file name that starts with '-' would read as an option of the command",
        ));
    }
    // `"{}"` and `'{}'` as written by a careful user are the same placeholder as a bare `{}`.
    let script = command.replace("\"{}\"", "{}").replace("'{}'", "{}").replace("{}", "\"$1\"");
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(&script)
        .arg("sh")
        .arg(name)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| remote_error(url, format!("cannot start `sh -c {script}`: {e}")))?;
    let stdout = child.stdout.take().expect("stdout was piped");
    let mut stderr = child.stderr.take().expect("stderr was piped");
    // The last few KiB of what the command says on stderr, for the error if it fails.
    let said = std::thread::spawn(move || {
        let mut all = vec![];
        let _ = stderr.read_to_end(&mut all);
        let start = all.len().saturating_sub(2048);
        String::from_utf8_lossy(&all[start..]).trim().to_string()
    });
    Ok(Box::new(PipeReader {
        child,
        stdout,
        said: Some(said),
        url: url.to_string(),
        command: command.to_string(),
    }))
}

struct PipeReader {
    child: std::process::Child,
    stdout: std::process::ChildStdout,
    said: Option<std::thread::JoinHandle<String>>,
    url: String,
    command: String,
}

impl Read for PipeReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.stdout.read(buf)?;
        if n == 0 && !buf.is_empty() {
            let status = self.child.wait()?;
            let said = self.said.take().and_then(|h| h.join().ok()).unwrap_or_default();
            if !status.success() {
                let tail = if said.is_empty() { String::new() } else { format!(": {said}") };
                return Err(io::Error::other(format!(
                    "{}: `{}` failed ({status}){tail}",
                    self.url, self.command
                )));
            }
        }
        Ok(n)
    }
}

impl Drop for PipeReader {
    fn drop(&mut self) {
        // Left early (the epoch ended, the run stopped): the command has nobody to write to.
        if self.said.is_some() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The tar stream of shard `info` of the set at `set` (decompressed where its name says `.zst`): a
/// folder's file, or a remote set's object (through `cache` when one is given), checked against the
/// index's size and digest as it streams ([`TarReader::finish`] gives the verdict).
pub fn open_tar(set: &Path, info: &ShardInfo, cache: Option<&Cache>) -> Result<TarReader> {
    let path = set.join(&info.name);
    match remote_url(set) {
        Some(url) => {
            let raw = Arc::new(Mutex::new(open_shard(&*RemoteSet::shared(url)?, info, cache)?));
            let shared = SharedChecked(raw.clone());
            let tar = crate::format::tar_stream(&path, io::BufReader::with_capacity(1 << 16, shared))?;
            Ok(TarReader { tar, raw: Some(raw) })
        }
        // One buffer over the file, as before remote sets.
        None => Ok(TarReader { tar: crate::format::open_shard(&path)?, raw: None }),
    }
}

/// A shard's tar stream ([`open_tar`]). For a remote shard it also holds the raw (compressed) stream
/// beneath the decompressor, which [`TarReader::finish`] reads to its end: the tar reader stops at the
/// end-of-archive block, a zstd decoder at its frame's end, and either may stop at damage, before the
/// bytes that settle whether the shard is the one its index lists.
pub struct TarReader {
    tar: Box<dyn Read + Send>,
    raw: Option<Arc<Mutex<Checked>>>,
}

impl Read for TarReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.tar.read(buf)
    }
}

impl TarReader {
    /// A remote shard's raw bytes read to their end (bounded by the index's size: a longer stream fails
    /// there) and compared with its index entry: `Ok` when size and digest match (the cache copy, if
    /// any, is then kept), else the mismatch ([`is_mismatch`] tells it from a failed read). `Ok` for a
    /// folder's shard, whose bytes `shard verify` checks.
    pub fn finish(&mut self) -> io::Result<()> {
        let Some(raw) = &self.raw else { return Ok(()) };
        let mut checked = raw.lock().map_err(|_| io::Error::other("a shard reader panicked"))?;
        io::copy(&mut *checked, &mut io::sink()).map(drop)
    }
}

/// Whether an error of a remote shard's read is its bytes differing from its index entry (size or
/// SHA-256), rather than a read that failed.
pub fn is_mismatch(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<Mismatch>())
}

/// A remote shard whose bytes are not the ones its index entry lists.
#[derive(Debug)]
struct Mismatch(String);

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Mismatch {}

/// The decompressor's side of a [`TarReader`]'s raw stream.
struct SharedChecked(Arc<Mutex<Checked>>);

impl Read for SharedChecked {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.lock().map_err(|_| io::Error::other("a shard reader panicked"))?.read(buf)
    }
}

/// Where remote shards are kept between epochs, and how many bytes they may take.
#[derive(Clone, Debug, PartialEq)]
pub struct Cache {
    pub dir: PathBuf,
    pub limit: u64,
}

/// Opens shard `info` of a remote set for reading, raw (still compressed if it is): from `cache` when a
/// copy is there, else from the source while a copy is written into `cache` (kept only if complete
/// and as `index.json` describes it; see the module's doc). The reader must be read to its end for the
/// copy to be kept ([`TarReader::finish`] does).
fn open_shard(set: &RemoteSet, info: &ShardInfo, cache: Option<&Cache>) -> Result<Checked> {
    let url = set.file_url(&info.name);
    let valid_digest = info.sha256.len() == 64 && info.sha256.bytes().all(|b| b.is_ascii_hexdigit());
    let Some(cache) = cache.filter(|c| valid_digest && info.bytes <= c.limit) else {
        return Ok(Checked::new(set.reader(&info.name)?, info, url, None));
    };
    let kept = cache.dir.join(info.sha256.to_ascii_lowercase());
    if let Ok(file) = std::fs::File::open(&kept)
        && file.metadata().is_ok_and(|m| m.is_file() && m.len() == info.bytes)
    {
        // Most recently used: eviction goes by modification time. Checked as it is read, as a download
        // is: a copy damaged on disk (or put there by someone else) is reported and removed.
        let _ = file.set_modified(std::time::SystemTime::now());
        let file = Box::new(io::BufReader::with_capacity(1 << 20, file));
        let mut checked = Checked::new(file, info, url, None);
        checked.cached = Some(kept);
        return Ok(checked);
    }
    std::fs::create_dir_all(&cache.dir)
        .map_err(|e| Error::io(&cache.dir, "cannot create the cache folder", e))?;
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let part = cache.dir.join(format!(".{}.{}.{nanos}.part", info.sha256, std::process::id()));
    // A copy that cannot be started is a run without a cache for this shard, not a failed run.
    let copy = match std::fs::OpenOptions::new().write(true).create_new(true).open(&part) {
        Ok(file) => {
            if let Ok(mut parts) = PARTS.lock() {
                parts.push(part.clone());
            }
            Some(Copy { file: io::BufWriter::with_capacity(1 << 20, file), part, kept, cache: cache.clone() })
        }
        Err(e) => {
            eprintln!("warning: {}: cannot cache {url} there: {e}", cache.dir.display());
            None
        }
    };
    Ok(Checked::new(set.reader(&info.name)?, info, url, copy))
}

/// The temporaries of this process's copies in progress, which [`abandon_copies`] removes.
static PARTS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// Removes the temporaries of the copies this process has in progress: called by a binary as it exits,
/// when reader threads may still be writing (their shard is then downloaded again by a later run; a
/// process killed before this runs leaves its temporaries to the next eviction).
pub fn abandon_copies() {
    let parts = PARTS.lock().map(|mut p| std::mem::take(&mut *p)).unwrap_or_default();
    for part in parts {
        let _ = std::fs::remove_file(part);
    }
}

fn forget_part(part: &Path) {
    if let Ok(mut parts) = PARTS.lock() {
        parts.retain(|p| p != part);
    }
}

/// A copy into the cache in progress.
struct Copy {
    file: io::BufWriter<std::fs::File>,
    part: PathBuf,
    kept: PathBuf,
    cache: Cache,
}

/// A remote shard's bytes as they stream, counted and hashed: at their end (or past the index's size), a
/// size or digest other than the index's is an error of the read, a [`Mismatch`], returned again by
/// every later read; a copy in progress is kept only when both match.
struct Checked {
    raw: HashingReader<Box<dyn Read + Send>>,
    expect_bytes: u64,
    expect_sha: String,
    url: String,
    copy: Option<Copy>,
    /// Set at the end of the stream: `None` for a match, else the mismatch.
    verdict: Option<Option<String>>,
    /// A read of the source that failed (after the client's retries): every later read fails the same
    /// way, so that reading on to the end never turns a lost connection into a short, "corrupted" shard.
    failed: Option<String>,
    /// A cached copy being read: removed if it turns out not to be the shard.
    cached: Option<PathBuf>,
}

impl Checked {
    fn new(inner: Box<dyn Read + Send>, info: &ShardInfo, url: String, copy: Option<Copy>) -> Self {
        Checked {
            raw: HashingReader::new(inner),
            expect_bytes: info.bytes,
            expect_sha: info.sha256.to_ascii_lowercase(),
            url,
            copy,
            verdict: None,
            failed: None,
            cached: None,
        }
    }

    /// The verdict at the end of the stream (`longer`: it went on past the index's size).
    fn finish(&mut self, longer: bool) -> Option<String> {
        let (bytes, sha) = (self.raw.bytes, hex::encode(std::mem::take(&mut self.raw.hasher).finalize()));
        if longer || bytes != self.expect_bytes || sha != self.expect_sha {
            self.discard();
            let what = match longer {
                true => format!("more than the {} bytes", self.expect_bytes),
                false => format!("{bytes} bytes with SHA-256 {sha}"),
            };
            let differs = format!(
                "{what}, where index.json lists {} bytes with {}",
                self.expect_bytes, self.expect_sha
            );
            return Some(match self.cached.take() {
                // Damaged on disk (a crash, a full disk, another tool): removed, so that the next read
                // downloads the shard again.
                Some(bad) => {
                    let _ = std::fs::remove_file(&bad);
                    format!(
                        "{}: the cache's copy of {} holds {differs} (damaged on disk; removed, so the next \
                         read downloads it again)",
                        bad.display(),
                        self.url
                    )
                }
                None => format!("{}: {differs} (changed or corrupted in the store; not cached)", self.url),
            });
        }
        if let Some(Copy { file, part, kept, cache }) = self.copy.take() {
            // Synced before the rename: a copy that a crash leaves in place is the whole shard.
            let stored = file.into_inner().map_err(|e| e.into_error()).and_then(|f| f.sync_all());
            let renamed = stored.and_then(|()| std::fs::rename(&part, &kept));
            forget_part(&part);
            match renamed {
                Ok(()) => evict(&cache, &kept),
                Err(e) => {
                    let _ = std::fs::remove_file(&part);
                    eprintln!("warning: {}: cannot keep {} there: {e}", cache.dir.display(), self.url);
                }
            }
        }
        None
    }

    fn discard(&mut self) {
        if let Some(copy) = self.copy.take() {
            drop(copy.file);
            let _ = std::fs::remove_file(&copy.part);
            forget_part(&copy.part);
        }
    }
}

impl Read for Checked {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some(verdict) = &self.verdict {
            return match verdict {
                None => Ok(0),
                Some(m) => Err(io::Error::new(io::ErrorKind::InvalidData, Mismatch(m.clone()))),
            };
        }
        if let Some(f) = &self.failed {
            return Err(io::Error::other(f.clone()));
        }
        let n = match self.raw.read(buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Err(e),
            Err(e) => {
                self.discard();
                self.failed = Some(e.to_string());
                return Err(e);
            }
        };
        let longer = self.raw.bytes > self.expect_bytes;
        if (n == 0 && !buf.is_empty()) || longer {
            let verdict = self.finish(longer);
            self.verdict = Some(verdict);
            return self.read(buf);
        }
        if let Some(copy) = &mut self.copy
            && let Err(e) = copy.file.write_all(&buf[..n])
        {
            eprintln!("warning: {}: cannot cache {} there: {e}", copy.cache.dir.display(), self.url);
            self.discard();
        }
        Ok(n)
    }
}

impl Drop for Checked {
    fn drop(&mut self) {
        // Not read to its end: whatever was written is not the whole shard.
        self.discard();
    }
}

/// Removes the least recently used shards of the cache until it holds at most its limit (never `keep`,
/// the one just added). Only complete copies (64 hex digits) count; another process's temporaries are
/// left alone.
fn evict(cache: &Cache, keep: &Path) {
    let Ok(entries) = std::fs::read_dir(&cache.dir) else { return };
    let mut copies: Vec<(std::time::SystemTime, u64, PathBuf)> = entries
        .filter_map(|e| {
            let e = e.ok()?;
            let name = e.file_name();
            let name = name.to_str()?;
            if let Some(pid) = stale_part_pid(name)
                && !Path::new(&format!("/proc/{pid}")).exists()
            {
                // A temporary whose process died mid-download (killed: no destructor ran).
                let _ = std::fs::remove_file(e.path());
                return None;
            }
            if name.len() != 64 || !name.bytes().all(|b| b.is_ascii_hexdigit()) {
                return None;
            }
            let meta = e.metadata().ok()?;
            Some((meta.modified().ok()?, meta.len(), e.path()))
        })
        .collect();
    let mut total: u64 = copies.iter().map(|c| c.1).sum();
    copies.sort();
    for (_, len, path) in copies {
        if total <= cache.limit {
            break;
        }
        if path != keep && std::fs::remove_file(&path).is_ok() {
            total -= len;
        }
    }
}

/// The process id in the name of a cache temporary (`.{sha256}.{pid}.{nanos}.part`).
fn stale_part_pid(name: &str) -> Option<u32> {
    let mut parts = name.strip_prefix('.')?.strip_suffix(".part")?.split('.');
    let (_, pid, _) = (parts.next()?, parts.next()?, parts.next()?);
    pid.parse().ok()
}

/// A size such as `512M`, `20G` or `1.5T` (binary multiples), or a plain count of bytes.
pub fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let mult = match c.to_ascii_uppercase() {
                'K' => 1u64 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => return Err(format!("unknown size suffix in {s:?} (use K, M, G or T)")),
            };
            (&s[..i], mult)
        }
        _ => (s, 1),
    };
    match num.trim().parse::<f64>() {
        Ok(n) if n > 0.0 && n.is_finite() => Ok((n * mult as f64) as u64),
        Ok(_) => Err(format!("size must be positive: {s:?}")),
        Err(_) => Err(format!("not a size: {s:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_told_from_folders() {
        for url in ["s3://b/set", "gs://b/set", "az://c/set", "https://h/set", "http://h:80/s", "pipe:cat {}"]
        {
            assert_eq!(remote_url(Path::new(url)), Some(url), "{url}");
        }
        for path in ["data/set", "/data/set", "s3", "s3:/b", "./s3://b", "pipe", "file:///x"] {
            assert_eq!(remote_url(Path::new(path)), None, "{path}");
        }
    }

    #[test]
    fn a_set_url_may_name_the_folder_or_its_index() {
        let set = RemoteSet::open("pipe:cat /sets/a/{}").unwrap();
        assert_eq!(set.file_url("x.tar"), "pipe:cat /sets/a/{}/x.tar");
        let set = RemoteSet::open("http://127.0.0.1:9/sets/a/index.json").unwrap();
        assert_eq!(set.url, "http://127.0.0.1:9/sets/a");
        let set = RemoteSet::open("http://127.0.0.1:9/sets/a/").unwrap();
        assert_eq!(set.file_url("s-000000.tar"), "http://127.0.0.1:9/sets/a/s-000000.tar");
        let e = RemoteSet::open("pipe:cat index.json").unwrap_err().to_string();
        assert!(e.contains("needs {}"), "{e}");
    }

    #[test]
    fn a_pipe_passes_the_name_as_an_argument_and_reports_a_failed_command() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a b.txt"), b"hello").unwrap();
        let set = RemoteSet::open(&format!("pipe:cat {}/{{}}", dir.path().display())).unwrap();
        assert_eq!(set.read_small("a b.txt", 100).unwrap(), b"hello");
        // A name that would be a command if it were spliced into the text stays a name.
        let marker = dir.path().join("ran");
        let hostile = format!("x; touch {}", marker.display());
        let e = set.read_small(&hostile, 100).unwrap_err().to_string();
        assert!(!marker.exists(), "the name ran as a command");
        assert!(e.contains("failed") && e.contains("exit status: 1"), "{e}");
        let e = set.read_small("a b.txt", 3).unwrap_err().to_string();
        assert!(e.contains("larger than the 3 bytes"), "{e}");
    }

    #[test]
    fn a_profile_section_is_read_from_an_ini_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config");
        std::fs::write(
            &path,
            "[default]\nregion = eu-west-1\n# a comment\n[profile lab]\nRegion=us-east-2\nendpoint_url = http://minio:9000\n",
        )
        .unwrap();
        let lab = ini_section(&path, "profile lab");
        assert_eq!(
            lab,
            [("region".into(), "us-east-2".into()), ("endpoint_url".into(), "http://minio:9000".into())]
        );
        assert_eq!(ini_section(&path, "default"), [("region".to_string(), "eu-west-1".to_string())]);
        assert!(
            ini_section(&path, "other").is_empty()
                && ini_section(&dir.path().join("none"), "default").is_empty()
        );
    }

    #[test]
    fn sizes_parse_with_binary_suffixes() {
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("1.5k"), Ok(1536));
        assert_eq!(parse_size(" 20G "), Ok(20 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("0").is_err() && parse_size("-1G").is_err() && parse_size("3X").is_err());
        assert!(parse_size("inf").is_err() && parse_size("").is_err());
    }
}
