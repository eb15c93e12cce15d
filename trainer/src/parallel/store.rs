//! The rendezvous of a torchrun-style launch: a small key-value store that rank 0 serves over TCP and
//! every rank reaches at `MASTER_ADDR:MASTER_PORT`, as torch's `TCPStore`. It carries only what starts
//! and steers a job: the NCCL unique id, what rank 0 tells the others (the run folder), barriers. No
//! tensor goes through it.
//!
//! Every wait is bounded: a rank that cannot reach the store, or that waits for a key another rank never
//! sets (it failed, or never started), stops with an error naming itself, the address and what it waited
//! for, instead of hanging.
//!
//! The port is open to whoever reaches it, so the server trusts nothing it reads:
//! - it listens on loopback only when every rank runs on this machine ([`Job::local`]);
//! - a connection first presents the job's token ([`Job::token`]: the launcher's run id, e.g. torchrun's
//!   `TORCHELASTIC_RUN_ID` or SLURM's job and step ids) within [`HELLO_TIMEOUT`], or is closed: another
//!   job, a port scanner or a spoofed `SET barrier/…` never reaches the table;
//! - lengths are read before anything is allocated and bounded ([`MAX_KEY_BYTES`], [`MAX_VALUE_BYTES`],
//!   [`MAX_TABLE_BYTES`] in all), and at most [`Job::max_connections`] connections are served at once
//!   (one thread each), so neither a flood nor a 4 GiB length prefix can take rank 0's memory or threads.
//!
//! Wire format, one request per message: `op: u8`, then `u32` little-endian length-prefixed frames.
//! `HELLO token` (answered with one byte: 1 when the token is the job's, 0 when not), `SET key value`, `GET key`
//! (answered with the value's frame once some rank has set the key).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

const SET: u8 = 1;
const GET: u8 = 2;
const HELLO: u8 = 3;

/// The longest key (ours are a few words and numbers).
pub const MAX_KEY_BYTES: usize = 256;
/// The largest value (an NCCL id is 128 bytes; rank 0's word to the others a path or an error message).
pub const MAX_VALUE_BYTES: usize = 1 << 20;
/// The most the table holds in all, keys and values.
pub const MAX_TABLE_BYTES: usize = 64 << 20;
/// How long a new connection has to present the job's token.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Who may use the store, and where it listens.
#[derive(Clone, Debug)]
pub struct Job {
    /// What every rank of this job presents first (empty when the launcher gives no run id: then only
    /// the loopback binding and the bounds protect a local job).
    pub token: String,
    /// Every rank on this machine: the server listens on 127.0.0.1 only, and the ranks connect there.
    pub local: bool,
    /// Connections served at once; further ones are closed as they arrive.
    pub max_connections: usize,
}

impl Job {
    /// The job of `size` ranks as the launcher's environment (`var`) describes it.
    pub fn from_env(var: impl Fn(&str) -> Option<String>, size: usize, master: &str) -> Self {
        let token = var("DENSEDINO_RENDEZVOUS_TOKEN")
            .or_else(|| var("TORCHELASTIC_RUN_ID"))
            .or_else(|| {
                var("SLURM_JOB_ID").map(|j| format!("slurm-{j}.{}", var("SLURM_STEP_ID").unwrap_or_default()))
            })
            .unwrap_or_default();
        let loopback = master
            .parse::<IpAddr>()
            .map(|ip| ip.is_loopback())
            .unwrap_or_else(|_| master.eq_ignore_ascii_case("localhost"));
        let all_here = var("LOCAL_WORLD_SIZE").and_then(|v| v.trim().parse::<usize>().ok()) == Some(size);
        // Each rank keeps one connection; a rank's retries before rank 0 listens leave none open.
        Job { token, local: loopback || all_here, max_connections: 2 * size + 8 }
    }
}

/// One rank's connection to the store (rank 0 also runs the server, on a thread of its own).
pub struct Store {
    stream: TcpStream,
    rank: usize,
    addr: String,
    timeout: Duration,
}

/// The table, its size in bytes, and the condition a `GET` waits on.
type Table = Arc<(Mutex<(HashMap<String, Vec<u8>>, usize)>, Condvar)>;

impl Store {
    /// Rank 0 serves the store on `port` and connects to it; the other ranks connect to `host:port`,
    /// retrying until `timeout` has passed (rank 0 may start later than they do). Every rank presents
    /// `job.token` first.
    pub fn connect(host: &str, port: u16, rank: usize, timeout: Duration, job: &Job) -> Result<Self> {
        let addr = format!("{host}:{port}");
        let connect_to = if rank == 0 {
            let ip =
                if job.local { IpAddr::V4(Ipv4Addr::LOCALHOST) } else { IpAddr::V4(Ipv4Addr::UNSPECIFIED) };
            let listener = TcpListener::bind((ip, port)).with_context(|| {
                format!("rank 0: serving the rendezvous on {ip} port {port} (MASTER_PORT): is it in use?")
            })?;
            let local = listener.local_addr()?.port();
            let table: Table = Arc::default();
            let job = job.clone();
            std::thread::Builder::new()
                .name("rendezvous".into())
                .spawn(move || serve(listener, table, job))
                .context("starting the rendezvous server")?;
            format!("127.0.0.1:{local}")
        } else if job.local {
            // Every rank on this machine, where rank 0 listens on loopback only: MASTER_ADDR may name the
            // machine by an address that is not loopback.
            format!("127.0.0.1:{port}")
        } else {
            addr.clone()
        };
        let deadline = Instant::now() + timeout;
        let mut hello = vec![HELLO];
        frame(&mut hello, job.token.as_bytes());
        let stream = loop {
            let last = match connect_to.to_socket_addrs() {
                Ok(mut addrs) => match addrs.next() {
                    Some(a) => match TcpStream::connect_timeout(&a, Duration::from_secs(2)) {
                        Ok(mut s) => {
                            // 1: in; 0: another job's token; nothing (closed): the server is at its
                            // connection bound, try again.
                            let mut answer = [0u8; 1];
                            let asked = s
                                .set_read_timeout(Some(HELLO_TIMEOUT.min(timeout)))
                                .and_then(|()| s.write_all(&hello))
                                .and_then(|()| s.read_exact(&mut answer));
                            match (asked, answer[0]) {
                                (Ok(()), 1) => break s,
                                (Ok(()), _) => bail!(
                                    "rank {rank}: the rendezvous at {addr} refused this job's token: is another \
                                     job's store on MASTER_PORT, or do the ranks see different launcher run ids \
                                     (TORCHELASTIC_RUN_ID, SLURM_JOB_ID, DENSEDINO_RENDEZVOUS_TOKEN)?"
                                ),
                                (Err(e), _) => format!("the store closed the connection: {e}"),
                            }
                        }
                        Err(e) => e.to_string(),
                    },
                    None => "the address resolves to nothing".to_string(),
                },
                Err(e) => e.to_string(),
            };
            if Instant::now() >= deadline {
                bail!(
                    "rank {rank}: could not reach the rendezvous at {addr} (MASTER_ADDR:MASTER_PORT, served by \
                     rank 0) within {} s: {last}",
                    timeout.as_secs()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        stream.set_nodelay(true)?;
        Ok(Self { stream, rank, addr, timeout })
    }

    pub fn set(&mut self, key: &str, value: &[u8]) -> Result<()> {
        if key.len() > MAX_KEY_BYTES || value.len() > MAX_VALUE_BYTES {
            bail!(
                "rank {}: rendezvous key `{key}` of {} bytes or its value of {} exceeds the store's bounds ({} and \
                 {} bytes)",
                self.rank,
                key.len(),
                value.len(),
                MAX_KEY_BYTES,
                MAX_VALUE_BYTES
            );
        }
        let mut msg = vec![SET];
        frame(&mut msg, key.as_bytes());
        frame(&mut msg, value);
        self.stream.write_all(&msg).map_err(|e| self.lost(e))
    }

    /// The value of `key`, waiting until some rank sets it (at most the store's timeout).
    pub fn get(&mut self, key: &str) -> Result<Vec<u8>> {
        let mut msg = vec![GET];
        frame(&mut msg, key.as_bytes());
        self.stream.write_all(&msg).map_err(|e| self.lost(e))?;
        self.stream.set_read_timeout(Some(self.timeout))?;
        read_frame(&mut self.stream, MAX_VALUE_BYTES).map_err(|e| match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => anyhow!(
                "rank {}: waited {} s at the rendezvous ({}) for `{key}`: a rank did not get there (it failed, \
                 or never started)",
                self.rank,
                self.timeout.as_secs(),
                self.addr
            ),
            _ => self.lost(e),
        })
    }

    fn lost(&self, e: std::io::Error) -> anyhow::Error {
        anyhow!("rank {}: lost the rendezvous at {} (rank 0 ended?): {e}", self.rank, self.addr)
    }
}

fn frame(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend((bytes.len() as u32).to_le_bytes());
    out.extend(bytes);
}

/// One length-prefixed frame of at most `max` bytes: a longer prefix is an error before any allocation.
fn read_frame(r: &mut impl Read, max: usize) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len)?;
    let len = u32::from_le_bytes(len) as usize;
    if len > max {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("a rendezvous frame of {len} bytes, over the {max} allowed"),
        ));
    }
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf)?;
    Ok(buf)
}

/// Accepts connections for as long as the process lives, at most `job.max_connections` at once, one
/// thread each.
fn serve(listener: TcpListener, table: Table, job: Job) {
    let live = Arc::new(AtomicUsize::new(0));
    for stream in listener.incoming().flatten() {
        if live.fetch_add(1, Ordering::AcqRel) >= job.max_connections {
            live.fetch_sub(1, Ordering::AcqRel);
            continue; // dropped: closed at once
        }
        let (table, live, token) = (table.clone(), live.clone(), job.token.clone());
        let spawned = std::thread::Builder::new().name("rendezvous-conn".into()).spawn({
            let live = live.clone();
            move || {
                let _ = serve_one(stream, &table, &token);
                live.fetch_sub(1, Ordering::AcqRel);
            }
        });
        if spawned.is_err() {
            live.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

fn serve_one(mut stream: TcpStream, table: &Table, token: &str) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let refused = |what: &str| std::io::Error::new(std::io::ErrorKind::PermissionDenied, what.to_string());
    // The token first, within the hello timeout: a silent or wrong peer holds its slot no longer.
    stream.set_read_timeout(Some(HELLO_TIMEOUT))?;
    let mut op = [0u8; 1];
    stream.read_exact(&mut op)?;
    if op[0] != HELLO {
        return Err(refused("no hello"));
    }
    if read_frame(&mut stream, MAX_KEY_BYTES)? != token.as_bytes() {
        stream.write_all(&[0])?;
        return Err(refused("another job's token"));
    }
    stream.write_all(&[1])?;
    stream.set_read_timeout(None)?;
    let (state, changed) = &**table;
    loop {
        if stream.read(&mut op)? == 0 {
            return Ok(()); // the rank closed its connection
        }
        let key = String::from_utf8_lossy(&read_frame(&mut stream, MAX_KEY_BYTES)?).into_owned();
        match op[0] {
            SET => {
                let value = read_frame(&mut stream, MAX_VALUE_BYTES)?;
                let mut guard = state.lock().expect("rendezvous table");
                let (map, bytes) = &mut *guard;
                let old = map.get(&key).map_or(0, |v| key.len() + v.len());
                let new = *bytes - old + key.len() + value.len();
                if new > MAX_TABLE_BYTES {
                    return Err(refused("the rendezvous table is full"));
                }
                *bytes = new;
                map.insert(key, value);
                changed.notify_all();
            }
            GET => {
                let mut guard = state.lock().expect("rendezvous table");
                let value = loop {
                    if let Some(v) = guard.0.get(&key) {
                        break v.clone();
                    }
                    guard = changed.wait(guard).expect("rendezvous table");
                };
                drop(guard);
                let mut out = Vec::with_capacity(4 + value.len());
                frame(&mut out, &value);
                stream.write_all(&out)?;
            }
            _ => return Err(refused("unknown rendezvous request")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
    }

    fn job(token: &str) -> Job {
        Job { token: token.into(), local: true, max_connections: 12 }
    }

    #[test]
    fn ranks_meet_and_exchange_bytes_whoever_comes_first() {
        let port = free_port();
        // Rank 1 starts before rank 0 serves: it retries until the store is up.
        let late = std::thread::spawn(move || {
            let mut s = Store::connect("127.0.0.1", port, 1, Duration::from_secs(20), &job("j")).unwrap();
            s.set("from-1", b"one").unwrap();
            s.get("from-0").unwrap()
        });
        std::thread::sleep(Duration::from_millis(300));
        let mut s0 = Store::connect("localhost", port, 0, Duration::from_secs(20), &job("j")).unwrap();
        s0.set("from-0", &[7u8; 100_000]).unwrap();
        assert_eq!(s0.get("from-1").unwrap(), b"one");
        assert_eq!(late.join().unwrap(), vec![7u8; 100_000]);
    }

    #[test]
    fn an_unreachable_rendezvous_is_an_error_naming_rank_and_address_within_the_timeout() {
        let port = free_port(); // nobody serves it
        let t = Instant::now();
        let e =
            Store::connect("127.0.0.1", port, 3, Duration::from_secs(1), &job("")).err().unwrap().to_string();
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        assert!(
            e.contains("rank 3") && e.contains(&format!("127.0.0.1:{port}")) && e.contains("within 1 s"),
            "{e}"
        );
    }

    #[test]
    fn a_key_no_rank_sets_ends_the_wait_with_an_error() {
        let port = free_port();
        let mut s = Store::connect("127.0.0.1", port, 0, Duration::from_secs(1), &job("")).unwrap();
        let t = Instant::now();
        let e = s.get("never").unwrap_err().to_string();
        assert!(t.elapsed() < Duration::from_secs(5));
        assert!(e.contains("rank 0") && e.contains("`never`") && e.contains("did not get there"), "{e}");
    }

    #[test]
    fn the_job_token_and_the_binding_come_from_the_launcher() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
        };
        let j = Job::from_env(env(&[("TORCHELASTIC_RUN_ID", "abc"), ("LOCAL_WORLD_SIZE", "4")]), 4, "node7");
        assert_eq!((j.token.as_str(), j.local, j.max_connections), ("abc", true, 16));
        let j = Job::from_env(env(&[("SLURM_JOB_ID", "9"), ("SLURM_STEP_ID", "2")]), 8, "10.0.0.5");
        assert_eq!((j.token.as_str(), j.local), ("slurm-9.2", false));
        assert!(Job::from_env(env(&[]), 2, "127.0.0.1").local);
        assert!(Job::from_env(env(&[]), 2, "::1").local);
        assert!(!Job::from_env(env(&[("LOCAL_WORLD_SIZE", "4")]), 8, "node7").local);
        let j = Job::from_env(
            env(&[("DENSEDINO_RENDEZVOUS_TOKEN", "t"), ("TORCHELASTIC_RUN_ID", "abc")]),
            2,
            "x",
        );
        assert_eq!(j.token, "t");
    }

    /// The server's threads and resident memory, from /proc.
    fn threads_and_rss_kb() -> (usize, u64) {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let field = |name: &str| -> u64 {
            let line = status.lines().find(|l| l.starts_with(name)).unwrap();
            line.split_whitespace().nth(1).unwrap().parse().unwrap()
        };
        (field("Threads:") as usize, field("VmRSS:"))
    }

    /// Loopback only, bounded in count and time: random bytes, huge length prefixes, a flood of silent
    /// connections and a spoofed barrier key without the token. Rank 0's threads and memory stay
    /// bounded, no stranger's write reaches the table, and the two real ranks still meet.
    #[test]
    fn the_store_survives_a_bounded_fuzz() {
        let port = free_port();
        let j = Job { token: "job-42".into(), local: true, max_connections: 12 };
        let mut s0 = Store::connect("127.0.0.1", port, 0, Duration::from_secs(5), &j).unwrap();
        let (threads0, rss0) = threads_and_rss_kb();
        let addr = format!("127.0.0.1:{port}");
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let t = Instant::now();
        // 1. Random bytes, each on its own connection.
        for _ in 0..200 {
            let n = rng.random_range(1..2048);
            let bytes: Vec<u8> = (0..n).map(|_| rng.random()).collect();
            if let Ok(mut c) = TcpStream::connect(&addr) {
                let _ = c.write_all(&bytes);
            }
        }
        // 2. Huge length prefixes with 64 MiB behind them: as a hello, and as a key after a wrong hello.
        for prefix in [vec![HELLO, 0xFF, 0xFF, 0xFF, 0xFF], vec![SET, 0xFF, 0xFF, 0xFF, 0xFF]] {
            if let Ok(mut c) = TcpStream::connect(&addr) {
                let _ = c.write_all(&prefix);
                let chunk = vec![0xAB; 1 << 20];
                for _ in 0..64 {
                    if c.write_all(&chunk).is_err() {
                        break; // closed by the server, as it should
                    }
                }
            }
        }
        // 3. A spoofed barrier: the right wire format, no token.
        if let Ok(mut c) = TcpStream::connect(&addr) {
            let mut msg = vec![SET];
            frame(&mut msg, b"barrier/1/1");
            frame(&mut msg, b"");
            let _ = c.write_all(&msg);
        }
        // ... and with a wrong token.
        if let Ok(mut c) = TcpStream::connect(&addr) {
            let mut msg = vec![HELLO];
            frame(&mut msg, b"job-41");
            let mut answer = [9u8; 1];
            let _ = c.write_all(&msg);
            let _ = c.read_exact(&mut answer);
            assert_eq!(answer[0], 0, "a wrong token is told so");
            let mut msg = vec![SET];
            frame(&mut msg, b"barrier/1/1");
            frame(&mut msg, b"");
            let _ = c.write_all(&msg);
        }
        // 4. A flood of 300 silent connections, held open.
        let flood: Vec<TcpStream> = (0..300).filter_map(|_| TcpStream::connect(&addr).ok()).collect();
        std::thread::sleep(Duration::from_millis(500));
        let (threads1, rss1) = threads_and_rss_kb();
        assert!(threads1 <= threads0 + j.max_connections + 2, "threads {threads0} -> {threads1}");
        assert!(rss1 < rss0 + 32 * 1024, "rank 0 grew from {rss0} to {rss1} kB");
        // No stranger's key is in the table: a get of the spoofed barrier key waits and times out.
        let e = s0.get("barrier/1/1").unwrap_err().to_string();
        assert!(e.contains("did not get there"), "{e}");
        drop(flood);
        // The real rank 1 still gets in (the flood's slots freed, or its hello timeout passed).
        let late = std::thread::spawn(move || {
            let j = Job { token: "job-42".into(), local: true, max_connections: 12 };
            // MASTER_ADDR naming the machine by a non-loopback address (TEST-NET-1, never routed): a
            // local job's ranks still meet on loopback.
            let mut s1 = Store::connect("192.0.2.1", port, 1, Duration::from_secs(30), &j).unwrap();
            s1.set("barrier/1/1", b"").unwrap();
            s1.get("barrier/1/0").unwrap()
        });
        s0.set("barrier/1/0", b"0").unwrap();
        assert_eq!(s0.get("barrier/1/1").unwrap(), b"");
        assert_eq!(late.join().unwrap(), b"0");
        assert!(t.elapsed() < Duration::from_secs(60), "{:?}", t.elapsed());
        // Over-long keys and values are refused before they are sent.
        assert!(s0.set(&"k".repeat(MAX_KEY_BYTES + 1), b"").is_err());
        assert!(s0.set("k", &vec![0; MAX_VALUE_BYTES + 1]).is_err());
    }
}
