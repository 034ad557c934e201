//! The interleaved mode of the link bench (`GEARMESH_BENCH_TURNS=N`): every system keeps one
//! connection open and the systems take turns, a slice of round trips each, N times over, with
//! the order rotating from turn to turn. Each system's p50 then comes from samples spread over
//! the whole run, so a ratio between two systems is not skewed by the machine speeding up or
//! slowing down between rows (on this VM the same row moves 10-25% between runs; measuring the
//! systems alternately is what ../shared/TESTING.md asks for a comparison).

use std::future::Future;
use std::time::Instant;

use gearmesh_transport::{Frame, Link};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};

/// One round trip of a system, on a connection it keeps.
pub(crate) trait RoundTrip: Send + 'static {
    fn once(&mut self) -> impl Future<Output = ()> + Send;
}

/// A length-prefixed ping-pong on a byte stream (the raw TLS and raw quinn floors).
pub(crate) struct StreamPing<S> {
    stream: S,
    msg: Vec<u8>,
    back: Vec<u8>,
}

impl<S> StreamPing<S> {
    pub(crate) fn new(stream: S, size: usize) -> Self {
        let mut msg = vec![0xabu8; size];
        msg[..4].copy_from_slice(&((size - 4) as u32).to_le_bytes());
        StreamPing { stream, msg, back: vec![0u8; size] }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> RoundTrip for StreamPing<S> {
    async fn once(&mut self) {
        self.stream.write_all(&self.msg).await.expect("write");
        self.stream.flush().await.expect("flush");
        self.stream.read_exact(&mut self.back).await.expect("read");
    }
}

/// A frame sent on a link and its echo received.
pub(crate) struct LinkPing {
    pub(crate) link: Link,
    pub(crate) frame: Frame,
}

impl RoundTrip for LinkPing {
    async fn once(&mut self) {
        self.link.send(&self.frame).await.expect("send");
        self.link.recv().await.expect("open").expect("frame");
    }
}

type Slice = (usize, oneshot::Sender<Vec<u64>>);

/// A system whose round trips run in a task of its own (as a node's callers run), one slice
/// at a time, on request.
pub(crate) struct Turns {
    pub(crate) system: &'static str,
    pub(crate) size: usize,
    go: mpsc::Sender<Slice>,
}

impl Turns {
    pub(crate) fn spawn(system: &'static str, size: usize, mut rt: impl RoundTrip) -> Self {
        let (go, mut slices) = mpsc::channel::<Slice>(1);
        tokio::spawn(async move {
            while let Some((n, done)) = slices.recv().await {
                let mut samples = Vec::with_capacity(n);
                for _ in 0..n {
                    let started = Instant::now();
                    rt.once().await;
                    samples.push(started.elapsed().as_nanos() as u64);
                }
                let _ = done.send(samples);
            }
        });
        Turns { system, size, go }
    }

    /// `n` round trips; their times in nanoseconds.
    async fn run(&self, n: usize) -> Vec<u64> {
        let (done, samples) = oneshot::channel();
        self.go.send((n, done)).await.expect("round-trip task");
        samples.await.expect("round-trip task")
    }
}

/// `warmup` untimed round trips per system, then `turns` turns of `rounds / turns` timed round
/// trips each, the first system of a turn rotating. Returns each system's samples, sorted.
pub(crate) async fn take_turns(systems: &[Turns], warmup: usize, rounds: usize, turns: usize) -> Vec<Vec<u64>> {
    for s in systems {
        s.run(warmup).await;
    }
    let per_turn = (rounds / turns.max(1)).max(1);
    let mut samples = vec![Vec::with_capacity(rounds); systems.len()];
    for turn in 0..turns {
        for k in 0..systems.len() {
            let i = (turn + k) % systems.len();
            samples[i].extend(systems[i].run(per_turn).await);
        }
    }
    for s in &mut samples {
        s.sort_unstable();
    }
    samples
}
