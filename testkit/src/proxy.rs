//! A TCP proxy that breaks connections on demand, like toxiproxy: it counts
//! the bytes each way (what a metered link would bill), cuts every connection
//! after a given number of downstream bytes or takes the link down and up, and
//! notices HTTP Range requests.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// A running proxy on 127.0.0.1; stops, closing its connections, when dropped.
/// Needs a tokio runtime that keeps running while it is used.
pub struct CuttingProxy {
    addr: SocketAddr,
    state: Arc<State>,
    accept: JoinHandle<()>,
}

#[derive(Default)]
struct Plan {
    /// Downstream bytes still allowed before the next cut.
    remaining: Option<u64>,
    /// Re-arm with this many bytes after each cut.
    every: Option<u64>,
}

struct State {
    downstream: AtomicU64,
    upstream: AtomicU64,
    range_seen: AtomicBool,
    strip_range: AtomicBool,
    cuts: AtomicU64,
    /// While set, new connections are closed at once: the link is down.
    down: AtomicBool,
    plan: Mutex<Plan>,
    /// Bumped at each cut; every connection watches it.
    cut: watch::Sender<u64>,
}

impl CuttingProxy {
    /// Listens on 127.0.0.1 (a free port) and forwards to `upstream`.
    pub async fn start(upstream: SocketAddr) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State {
            downstream: AtomicU64::new(0),
            upstream: AtomicU64::new(0),
            range_seen: AtomicBool::new(false),
            strip_range: AtomicBool::new(false),
            cuts: AtomicU64::new(0),
            down: AtomicBool::new(false),
            plan: Mutex::new(Plan::default()),
            cut: watch::channel(0).0,
        });
        let accept = tokio::spawn(accept_loop(listener, upstream, state.clone()));
        Ok(Self { addr, state, accept })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `127.0.0.1:PORT`, as image references and `insecure_registries` name it.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// Cuts every connection once `bytes` more bytes have gone downstream; once.
    pub fn cut_after(&self, bytes: u64) {
        *self.state.plan.lock().expect("proxy plan") = Plan { remaining: Some(bytes), every: None };
    }

    /// Cuts every connection each time `bytes` more bytes have gone downstream.
    pub fn cut_every(&self, bytes: u64) {
        *self.state.plan.lock().expect("proxy plan") = Plan { remaining: Some(bytes), every: Some(bytes) };
    }

    /// Takes the link down (every connection cut, new ones closed at once)
    /// or brings it back up.
    pub fn set_link_down(&self, down: bool) {
        self.state.down.store(down, Ordering::SeqCst);
        if down {
            self.state.cuts.fetch_add(1, Ordering::SeqCst);
            self.state.cut.send_modify(|g| *g += 1);
        }
    }

    /// Renames the `Range:` header of requests from now on, so the upstream
    /// answers with the whole content, as a server without range support does.
    /// (A header split across two reads escapes; requests on loopback come whole.)
    pub fn ignore_range_requests(&self) {
        self.state.strip_range.store(true, Ordering::SeqCst);
    }

    /// Bytes sent to the client so far (the registry's responses).
    pub fn downstream_bytes(&self) -> u64 {
        self.state.downstream.load(Ordering::SeqCst)
    }

    /// Bytes sent to the upstream so far (the client's requests).
    pub fn upstream_bytes(&self) -> u64 {
        self.state.upstream.load(Ordering::SeqCst)
    }

    /// Whether any request carried a `Range:` header.
    pub fn saw_range_request(&self) -> bool {
        self.state.range_seen.load(Ordering::SeqCst)
    }

    /// How many times connections were cut.
    pub fn cuts(&self) -> u64 {
        self.state.cuts.load(Ordering::SeqCst)
    }
}

impl Drop for CuttingProxy {
    fn drop(&mut self) {
        self.accept.abort();
        // Connections end as if cut.
        self.state.cut.send_modify(|g| *g += 1);
    }
}

async fn accept_loop(listener: TcpListener, upstream: SocketAddr, state: Arc<State>) {
    while let Ok((client, _)) = listener.accept().await {
        let state = state.clone();
        if state.down.load(Ordering::SeqCst) {
            continue;
        }
        tokio::spawn(async move {
            // An unreachable upstream looks to the client like a closed connection.
            if let Ok(server) = TcpStream::connect(upstream).await {
                connection(client, server, state).await;
            }
        });
    }
}

async fn connection(client: TcpStream, server: TcpStream, state: Arc<State>) {
    let mut cut = state.cut.subscribe();
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    // Whichever ends first ends the connection: both sockets are dropped.
    tokio::select! {
        _ = up(client_read, server_write, &state) => {}
        _ = down(server_read, client_write, &state) => {}
        _ = cut.changed() => {}
    }
}

const RANGE: &[u8] = b"\nrange:";

/// Client to server: counted, and scanned for a Range header.
async fn up(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, state: &State) {
    let mut buf = vec![0u8; 1 << 16];
    // The end of the previous read, so a header split across reads is seen.
    let mut tail: Vec<u8> = Vec::new();
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        tail.extend(buf[..n].iter().map(u8::to_ascii_lowercase));
        if tail.windows(RANGE.len()).any(|w| w == RANGE) {
            state.range_seen.store(true, Ordering::SeqCst);
        }
        tail.drain(..tail.len().saturating_sub(RANGE.len()));
        if state.strip_range.load(Ordering::SeqCst) {
            for i in 0..n.saturating_sub(RANGE.len() - 1) {
                if buf[i..i + RANGE.len()].eq_ignore_ascii_case(RANGE) {
                    // Same length, so nothing else in the request moves.
                    buf[i..i + RANGE.len()].copy_from_slice(b"\nx-rng:");
                }
            }
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
        state.upstream.fetch_add(n as u64, Ordering::SeqCst);
    }
}

/// Server to client: counted, and cut when the plan says so.
async fn down(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, state: &State) {
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let (allowed, cut_now) = state.allow(n as u64);
        let allowed = allowed as usize;
        if to.write_all(&buf[..allowed]).await.is_err() {
            return;
        }
        state.downstream.fetch_add(allowed as u64, Ordering::SeqCst);
        if cut_now {
            // A close mid-response: the client sees a transfer that ended
            // early. Not a reset, which would also discard what the client had
            // received but not yet read, making the byte counts meaningless.
            state.cuts.fetch_add(1, Ordering::SeqCst);
            state.cut.send_modify(|g| *g += 1);
            return;
        }
    }
}

impl State {
    /// How many of `n` bytes may pass, and whether to cut right after them.
    fn allow(&self, n: u64) -> (u64, bool) {
        let mut plan = self.plan.lock().expect("proxy plan");
        match plan.remaining {
            Some(remaining) if n >= remaining => {
                plan.remaining = plan.every;
                (remaining, true)
            }
            Some(remaining) => {
                plan.remaining = Some(remaining - n);
                (n, false)
            }
            None => (n, false),
        }
    }
}
