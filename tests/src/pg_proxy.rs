//! A TCP proxy in front of Postgres that can lose the answer to what
//! commits a transaction (a COMMIT, or a statement outside any transaction,
//! which commits on its own): the server commits, and the client sees its
//! connection drop instead of the answer, as when a network or a server process fails at the worst
//! moment. It forwards everything else untouched.
//!
//! It reads the server's side of the protocol as messages (a type byte and
//! a length); the client must not use TLS (`sslmode=disable`).

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use anyhow::Result;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    task::JoinHandle,
};

/// The proxy; it stops when dropped.
pub struct CommitAnswerLoser {
    addr: SocketAddr,
    armed: Arc<AtomicUsize>,
    lost: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

/// Which transactions may lose their answer: those whose statements (as the
/// client sent them since the connection was last idle, outside any
/// transaction) carry `marker` at least `at_least` times.
#[derive(Clone)]
pub struct Target {
    pub marker: &'static [u8],
    pub at_least: usize,
}

impl CommitAnswerLoser {
    /// A proxy to `upstream` on a free loopback port, not armed yet.
    pub async fn start(upstream: SocketAddr, target: Target) -> Result<CommitAnswerLoser> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let armed = Arc::new(AtomicUsize::new(0));
        let lost = Arc::new(AtomicUsize::new(0));
        let (a, l) = (armed.clone(), lost.clone());
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (armed, lost, target) = (a.clone(), l.clone(), target.clone());
                tokio::spawn(async move {
                    if let Ok(server) = TcpStream::connect(upstream).await {
                        relay(client, server, target, armed, lost).await;
                    }
                });
            }
        });
        Ok(CommitAnswerLoser {
            addr,
            armed,
            lost,
            task,
        })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The next `n` answers that commit a targeted transaction are lost.
    pub fn arm(&self, n: usize) {
        self.armed.store(n, Ordering::SeqCst);
    }

    /// Answers lost so far.
    pub fn lost(&self) -> usize {
        self.lost.load(Ordering::SeqCst)
    }
}

impl Drop for CommitAnswerLoser {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Carries one connection both ways until either side closes, or the
/// answer that commits a targeted transaction is to be lost: then both
/// sides are closed instead of passing it on.
async fn relay(
    client: TcpStream,
    server: TcpStream,
    target: Target,
    armed: Arc<AtomicUsize>,
    lost: Arc<AtomicUsize>,
) {
    let (mut from_client, mut to_client) = client.into_split();
    let (mut from_server, mut to_server) = server.into_split();
    // Times the marker was sent since the connection was last idle.
    let seen = Arc::new(AtomicUsize::new(0));
    let counting = seen.clone();
    let upstream = tokio::spawn(async move {
        let mut buf = vec![0u8; 64 * 1024];
        let mut tail: Vec<u8> = Vec::new();
        loop {
            let n = match from_client.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            // A marker split across two reads is counted too.
            let mut window = std::mem::take(&mut tail);
            window.extend_from_slice(&buf[..n]);
            counting.fetch_add(occurrences(&window, target.marker), Ordering::SeqCst);
            let keep = target.marker.len().saturating_sub(1).min(window.len());
            tail = window[window.len() - keep..].to_vec();
            if to_server.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    });
    let mut pending: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    // Before the first message, the server answers a request for TLS (or
    // GSS encryption) with one byte: `N`, refused (the client then goes on
    // in plain text; `S` would start TLS, which this proxy cannot read).
    let mut started = false;
    // Until the first ReadyForQuery the connection is starting up: its
    // messages go through as they come.
    let mut ready = false;
    // The answer to the exchange under way (everything since the last
    // ReadyForQuery), held back until its own ReadyForQuery says how the
    // exchange ended; whether it ran a statement; whether it failed or
    // rolled back.
    let mut exchange: Vec<u8> = Vec::new();
    let (mut completed, mut failed) = (false, false);
    'reading: loop {
        let n = match from_server.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        pending.extend_from_slice(&buf[..n]);
        let mut out = Vec::new();
        while !started && pending.first() == Some(&b'N') && pending.len() < 5 {
            out.push(pending.remove(0));
        }
        while pending.len() >= 5 {
            started = true;
            let len = u32::from_be_bytes([pending[1], pending[2], pending[3], pending[4]]) as usize;
            if pending.len() < 1 + len {
                break;
            }
            let message: Vec<u8> = pending.drain(..1 + len).collect();
            if !ready {
                ready = message[0] == b'Z';
                out.extend_from_slice(&message);
                continue;
            }
            let body = &message[5..];
            match message[0] {
                b'C' => {
                    completed = true;
                    failed |= body.starts_with(b"ROLLBACK\0");
                }
                b'E' => failed = true,
                b'Z' => {
                    // Idle after it: the exchange ended a transaction, by a
                    // COMMIT or as a statement outside any (which commits
                    // on its own), unless it failed or rolled back.
                    let committed = body.first() == Some(&b'I') && completed && !failed;
                    let targeted = body.first() == Some(&b'I')
                        && seen.swap(0, Ordering::SeqCst) >= target.at_least
                        && committed;
                    if targeted
                        && armed
                            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                            .is_ok()
                    {
                        // What came before the exchange's answer goes
                        // through; the answer, and the connection, do not.
                        let _ = to_client.write_all(&out).await;
                        lost.fetch_add(1, Ordering::SeqCst);
                        break 'reading;
                    }
                    (completed, failed) = (false, false);
                    out.append(&mut exchange);
                    out.extend_from_slice(&message);
                    continue;
                }
                _ => {}
            }
            exchange.extend_from_slice(&message);
        }
        if to_client.write_all(&out).await.is_err() {
            break;
        }
    }
    upstream.abort();
    let _ = to_client.shutdown().await;
}

fn occurrences(haystack: &[u8], needle: &[u8]) -> usize {
    if needle.is_empty() || haystack.len() < needle.len() {
        return 0;
    }
    haystack
        .windows(needle.len())
        .filter(|w| *w == needle)
        .count()
}
