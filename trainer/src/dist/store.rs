//! The rendezvous of a torchrun-style launch: a small key-value store that rank 0 serves over TCP and
//! every rank reaches at `MASTER_ADDR:MASTER_PORT`, as torch's `TCPStore`. It carries only what starts
//! and steers a job: the NCCL unique id, what rank 0 tells the others (the run folder), barriers. No
//! tensor goes through it.
//!
//! Every wait is bounded: a rank that cannot reach the store, or that waits for a key another rank never
//! sets (it failed, or never started), stops with an error naming itself, the address and what it waited
//! for, instead of hanging.
//!
//! Wire format, one request per message: `op: u8` (1 set, 2 get), `key: u32 length + bytes`, and for a
//! set `value: u32 length + bytes`. A get is answered with the value (`u32 length + bytes`) once some
//! rank has set the key.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

const SET: u8 = 1;
const GET: u8 = 2;

/// One rank's connection to the store (rank 0 also runs the server, on a thread of its own).
pub struct Store {
    stream: TcpStream,
    rank: usize,
    addr: String,
    timeout: Duration,
}

type Table = Arc<(Mutex<HashMap<String, Vec<u8>>>, Condvar)>;

impl Store {
    /// Rank 0 serves the store on `port` (all interfaces) and connects to it; the other ranks connect
    /// to `host:port`, retrying until `timeout` has passed (rank 0 may start later than they do).
    pub fn connect(host: &str, port: u16, rank: usize, timeout: Duration) -> Result<Self> {
        let addr = format!("{host}:{port}");
        let connect_to = if rank == 0 {
            let listener = TcpListener::bind(("0.0.0.0", port)).with_context(|| {
                format!("rank 0: serving the rendezvous on port {port} (MASTER_PORT): is it in use?")
            })?;
            let local = listener.local_addr()?.port();
            let table: Table = Arc::default();
            std::thread::Builder::new()
                .name("rendezvous".into())
                .spawn(move || serve(listener, table))
                .context("starting the rendezvous server")?;
            format!("127.0.0.1:{local}")
        } else {
            addr.clone()
        };
        let deadline = Instant::now() + timeout;
        let stream = loop {
            let last = match connect_to.to_socket_addrs() {
                Ok(mut addrs) => match addrs.next() {
                    Some(a) => match TcpStream::connect_timeout(&a, Duration::from_secs(2)) {
                        Ok(s) => break s,
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
        read_frame(&mut self.stream).map_err(|e| match e.kind() {
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

fn read_frame(r: &mut impl Read) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len)?;
    let mut buf = vec![0u8; u32::from_le_bytes(len) as usize];
    r.read_exact(&mut buf)?;
    Ok(buf)
}

/// Accepts ranks for as long as the process lives; one thread per connection (a job has few).
fn serve(listener: TcpListener, table: Table) {
    for stream in listener.incoming().flatten() {
        let table = table.clone();
        let _ = std::thread::Builder::new().name("rendezvous-conn".into()).spawn(move || {
            let _ = serve_one(stream, &table);
        });
    }
}

fn serve_one(mut stream: TcpStream, table: &Table) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let (map, changed) = &**table;
    loop {
        let mut op = [0u8; 1];
        if stream.read(&mut op)? == 0 {
            return Ok(()); // the rank closed its connection
        }
        let key = String::from_utf8_lossy(&read_frame(&mut stream)?).into_owned();
        match op[0] {
            SET => {
                let value = read_frame(&mut stream)?;
                map.lock().expect("rendezvous table").insert(key, value);
                changed.notify_all();
            }
            GET => {
                let mut m = map.lock().expect("rendezvous table");
                let value = loop {
                    if let Some(v) = m.get(&key) {
                        break v.clone();
                    }
                    m = changed.wait(m).expect("rendezvous table");
                };
                drop(m);
                let mut out = Vec::with_capacity(4 + value.len());
                frame(&mut out, &value);
                stream.write_all(&out)?;
            }
            other => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("unknown rendezvous request {other}"),
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
    }

    #[test]
    fn ranks_meet_and_exchange_bytes_whoever_comes_first() {
        let port = free_port();
        // Rank 1 starts before rank 0 serves: it retries until the store is up.
        let late = std::thread::spawn(move || {
            let mut s = Store::connect("127.0.0.1", port, 1, Duration::from_secs(20)).unwrap();
            s.set("from-1", b"one").unwrap();
            s.get("from-0").unwrap()
        });
        std::thread::sleep(Duration::from_millis(300));
        let mut s0 = Store::connect("localhost", port, 0, Duration::from_secs(20)).unwrap();
        s0.set("from-0", &[7u8; 100_000]).unwrap();
        assert_eq!(s0.get("from-1").unwrap(), b"one");
        assert_eq!(late.join().unwrap(), vec![7u8; 100_000]);
    }

    #[test]
    fn an_unreachable_rendezvous_is_an_error_naming_rank_and_address_within_the_timeout() {
        let port = free_port(); // nobody serves it
        let t = Instant::now();
        let e = Store::connect("127.0.0.1", port, 3, Duration::from_secs(1)).err().unwrap().to_string();
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        assert!(
            e.contains("rank 3") && e.contains(&format!("127.0.0.1:{port}")) && e.contains("within 1 s"),
            "{e}"
        );
    }

    #[test]
    fn a_key_no_rank_sets_ends_the_wait_with_an_error() {
        let port = free_port();
        let mut s = Store::connect("127.0.0.1", port, 0, Duration::from_secs(1)).unwrap();
        let t = Instant::now();
        let e = s.get("never").unwrap_err().to_string();
        assert!(t.elapsed() < Duration::from_secs(5));
        assert!(e.contains("rank 0") && e.contains("`never`") && e.contains("did not get there"), "{e}");
    }
}
