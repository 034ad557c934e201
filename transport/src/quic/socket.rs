//! The UDP socket under a QUIC endpoint, watched for reading only.
//!
//! quinn's own tokio socket registers with the reactor for reading *and* writing. A UDP socket
//! reports "writable" again every time the peer takes one of our datagrams off the queue and
//! the kernel frees its buffer, so with that registration every datagram we send comes back as
//! a wake-up of our reactor with nothing to do: an extra `epoll_wait` per packet (seen with
//! strace), and on a busy CPU a switch to our thread and back.
//!
//! This socket is registered for reading only. Sends go straight to the non-blocking socket;
//! only after a send found the socket buffer full (rare: the buffer is
//! [`super::UDP_BUFFER_BYTES`], and loopback never fills it) do senders wait for writability,
//! through a second, temporary registration of a duplicate descriptor, dropped as soon as it
//! fires.
//!
//! Datagrams may be as large as [`super::MAX_UDP_PAYLOAD`] where the path carries them (loopback
//! does). Two limits of the kernel's then need care, and this socket takes them:
//! - One `sendmsg` with segmentation offload (GSO) carries at most one UDP datagram's worth of
//!   bytes (65,507). quinn batches up to ten segments of the path's size, 89,520 bytes for 9 KB
//!   datagrams; the kernel refuses such a batch as "message too long", which
//!   quinn-udp takes for a lost path-MTU probe, so every datagram in it would vanish, again at
//!   every resend. A batch larger than the limit is sent in several calls here.
//! - quinn gives each receive slot room for "largest datagram × segments per receive", which for
//!   9 KB datagrams and the 64 segments of receive offload (GRO) would be 573 KB a slot, 18 MB
//!   an endpoint. A coalesced receive is no larger whatever the datagram size, so the segments
//!   per receive are reported as few as keep each slot at least the size quinn gives
//!   Ethernet-sized datagrams, which holds any coalesced receive. (A smaller slot would be worse
//!   than waste: a coalesced receive larger than its slot is cut short, and the link crawls on
//!   resends.)
//!
//! A receive that fills fewer slots than it offered has drained the socket, so the read
//! readiness is cleared at once instead of being learned from one more `EAGAIN` call. A datagram
//! that arrives after the receive raises a new edge in the reactor, so none is missed.

use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};

use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// A UDP socket for quinn, registered with the tokio reactor for reading only.
#[derive(Debug)]
pub(super) struct ReadWatchedSocket {
    io: AsyncFd<std::net::UdpSocket>,
    state: quinn::udp::UdpSocketState,
    /// A send found the socket buffer full, and no wait has seen it drain since.
    full: AtomicBool,
}

/// The most bytes one `sendmsg` may carry: the largest UDP payload over IPv4 (65,535 less the
/// IPv4 and UDP headers).
const SEND_MAX_BYTES: usize = 65_507;

/// The room a receive slot gets: what quinn gives Ethernet-sized datagrams (1,472 bytes) times
/// GRO's 64 segments, which holds any coalesced receive.
const RECV_SLOT_BYTES: usize = 1_472 * 64;

impl ReadWatchedSocket {
    /// Wraps a bound socket (made non-blocking here). Must run inside a tokio runtime.
    pub(super) fn new(socket: std::net::UdpSocket) -> io::Result<Self> {
        let state = quinn::udp::UdpSocketState::new((&socket).into())?;
        socket.set_nonblocking(true)?;
        let io = register(socket, Interest::READABLE)?;
        Ok(ReadWatchedSocket { io, state, full: AtomicBool::new(false) })
    }

    /// One `sendmsg` (or the batch quinn-udp makes of it); notes a full buffer for [`Writable`].
    fn send(&self, transmit: &Transmit<'_>) -> io::Result<()> {
        let sent = self.state.send(self.io.get_ref().into(), transmit);
        if matches!(&sent, Err(e) if e.kind() == io::ErrorKind::WouldBlock) {
            self.full.store(true, Ordering::Relaxed);
        }
        sent
    }
}

impl AsyncUdpSocket for ReadWatchedSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Box::pin(Writable { socket: self, watch: None })
    }

    fn try_send(&self, transmit: &Transmit<'_>) -> io::Result<()> {
        let segment = match transmit.segment_size {
            Some(segment) if segment > 0 && transmit.contents.len() > SEND_MAX_BYTES => segment,
            _ => return self.send(transmit),
        };
        // A batch too large for one call: as many whole segments per call as fit.
        let per_call = (SEND_MAX_BYTES / segment).max(1) * segment;
        for (i, contents) in transmit.contents.chunks(per_call).enumerate() {
            let part = Transmit {
                destination: transmit.destination,
                ecn: transmit.ecn,
                contents,
                segment_size: Some(segment),
                src_ip: transmit.src_ip,
            };
            match self.send(&part) {
                Ok(()) => {}
                // Part of the batch is out: the rest counts as lost (QUIC sends it again) rather
                // than having quinn send the whole batch again, the part that went out included.
                Err(e) if i > 0 && e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn poll_recv(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let offered = bufs.len().min(meta.len());
        loop {
            let mut ready = ready!(self.io.poll_read_ready(cx))?;
            // `try_io` clears the readiness itself when the socket has nothing (WouldBlock).
            match ready.try_io(|io| self.state.recv(io.get_ref().into(), bufs, meta)) {
                Ok(Ok(n)) => {
                    if n < offered {
                        ready.clear_ready();
                    }
                    return Poll::Ready(Ok(n));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.io.get_ref().local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.state.max_gso_segments()
    }

    fn max_receive_segments(&self) -> usize {
        // quinn allots min(largest datagram, 64 KiB) × this to each receive slot.
        let datagram = usize::from(super::MAX_UDP_PAYLOAD).min(64 * 1024);
        self.state.gro_segments().min(RECV_SLOT_BYTES.div_ceil(datagram)).max(1)
    }

    fn may_fragment(&self) -> bool {
        self.state.may_fragment()
    }
}

/// Registers an owned socket with the reactor for `interest`.
///
/// tokio 1.54 deprecated the safe constructor in favour of an `unsafe` one whose condition is that
/// the descriptor stays open and the same while registered (it was unsound for types whose
/// `as_raw_fd` can change). An owned `std::net::UdpSocket` meets that by construction, and this
/// crate forbids `unsafe`, so the safe one stays.
#[allow(deprecated)]
fn register(socket: std::net::UdpSocket, interest: Interest) -> io::Result<AsyncFd<std::net::UdpSocket>> {
    AsyncFd::with_interest(socket, interest)
}

/// Tells one quinn task when it may send: at once, unless a send found the socket buffer full;
/// then when the buffer has drained.
#[derive(Debug)]
struct Writable {
    socket: Arc<ReadWatchedSocket>,
    /// A duplicate of the socket's descriptor registered for writability while a send waits.
    watch: Option<AsyncFd<std::net::UdpSocket>>,
}

impl UdpPoller for Writable {
    fn poll_writable(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        // quinn asks before every send: answer from the flag, with no system call, until a send
        // has found the buffer full.
        if !this.socket.full.load(Ordering::Relaxed) {
            this.watch = None;
            return Poll::Ready(Ok(()));
        }
        let watch = match &mut this.watch {
            Some(w) => w,
            None => {
                let dup = this.socket.io.get_ref().try_clone()?;
                this.watch.insert(register(dup, Interest::WRITABLE)?)
            }
        };
        ready!(watch.poll_write_ready(cx))?.clear_ready();
        // Writable again: stop watching, so that sent datagrams do not wake the reactor.
        this.watch = None;
        this.socket.full.store(false, Ordering::Relaxed);
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bound() -> Arc<ReadWatchedSocket> {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        Arc::new(ReadWatchedSocket::new(s).expect("socket"))
    }

    fn transmit<'a>(to: SocketAddr, contents: &'a [u8]) -> Transmit<'a> {
        Transmit { destination: to, ecn: None, contents, segment_size: None, src_ip: None }
    }

    /// A wake-up the socket misses shows as this timing out, not as a test that hangs.
    const WAKE: std::time::Duration = std::time::Duration::from_secs(10);

    async fn recv_one(s: &ReadWatchedSocket) -> Vec<u8> {
        let mut buf = [0u8; 2048];
        let mut meta = [RecvMeta::default()];
        let recv = std::future::poll_fn(|cx| s.poll_recv(cx, &mut [IoSliceMut::new(&mut buf)], &mut meta));
        let n = tokio::time::timeout(WAKE, recv).await.expect("woken for the datagram").expect("recv");
        assert_eq!(n, 1);
        buf[..meta[0].len].to_vec()
    }

    #[tokio::test]
    async fn datagrams_sent_one_at_a_time_or_queued_all_arrive() {
        let (a, b) = (bound(), bound());
        let to = b.local_addr().expect("addr");
        for i in 0..50u8 {
            a.try_send(&transmit(to, &[i; 100])).expect("send");
            // One slot offered and one datagram taken: the socket may not be drained, so the
            // readiness stays; then a later datagram must still wake the receiver.
            assert_eq!(recv_one(&b).await, vec![i; 100]);
        }
        // Several queued datagrams, read one per call.
        for i in 0..5u8 {
            a.try_send(&transmit(to, &[i; 10])).expect("send");
        }
        for i in 0..5u8 {
            assert_eq!(recv_one(&b).await, vec![i; 10]);
        }
    }

    #[tokio::test]
    async fn a_short_batch_clears_readiness_and_the_next_datagram_still_wakes() {
        let (a, b) = (bound(), bound());
        let to = b.local_addr().expect("addr");
        for round in 0..20u8 {
            a.try_send(&transmit(to, &[round; 32])).expect("send");
            let mut bufs = [[0u8; 256]; 4];
            let mut meta = [RecvMeta::default(); 4];
            let recv = std::future::poll_fn(|cx| {
                let [b0, b1, b2, b3] = &mut bufs;
                let mut slices = [IoSliceMut::new(b0), IoSliceMut::new(b1), IoSliceMut::new(b2), IoSliceMut::new(b3)];
                b.poll_recv(cx, &mut slices, &mut meta)
            });
            let n = tokio::time::timeout(WAKE, recv).await.expect("woken after a cleared readiness").expect("recv");
            assert_eq!(n, 1, "one datagram was sent");
            assert_eq!(&bufs[0][..meta[0].len], &[round; 32]);
        }
    }

    #[tokio::test]
    async fn senders_wait_for_writability_only_after_a_full_buffer() {
        let (a, b) = (bound(), bound());
        let to = b.local_addr().expect("addr");
        let mut poller = Arc::clone(&a).create_io_poller();
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        assert!(poller.as_mut().poll_writable(&mut cx).is_ready(), "nothing was ever full");
        // A full buffer cannot be provoked on loopback (the kernel drops datagrams at a receiver
        // that does not read instead of holding them against the sender), so the flag a
        // `WouldBlock` send sets is set by hand: the wait then goes through the reactor.
        for i in 0..3u8 {
            a.full.store(true, Ordering::Relaxed);
            tokio::time::timeout(WAKE, std::future::poll_fn(|cx| poller.as_mut().poll_writable(cx)))
                .await
                .expect("an idle socket is writable")
                .expect("no error");
            assert!(!a.full.load(Ordering::Relaxed), "the drained buffer is remembered");
            a.try_send(&transmit(to, &[i; 8])).expect("send");
            assert_eq!(recv_one(&b).await, vec![i; 8]);
        }
    }

    #[tokio::test]
    async fn a_batch_larger_than_one_send_carries_arrives_whole() {
        let (a, b) = (bound(), bound());
        if a.max_transmit_segments() < 3 {
            eprintln!("no segmentation offload here: quinn never hands this socket a batch");
            return;
        }
        let to = b.local_addr().expect("addr");
        // Three 30,000-byte datagrams in one batch: 90,000 bytes, more than one sendmsg takes.
        let segment = 30_000;
        let contents: Vec<u8> = (0..3 * segment).map(|i| u8::try_from(i / segment + 1).expect("small")).collect();
        let batch =
            Transmit { destination: to, ecn: None, contents: &contents, segment_size: Some(segment), src_ip: None };
        a.try_send(&batch).expect("send");
        let mut got: Vec<Vec<u8>> = Vec::new();
        while got.len() < 3 {
            let mut buf = vec![0u8; 128 * 1024];
            let mut meta = [RecvMeta::default()];
            let recv = std::future::poll_fn(|cx| b.poll_recv(cx, &mut [IoSliceMut::new(&mut buf)], &mut meta));
            tokio::time::timeout(WAKE, recv).await.expect("every datagram of the batch arrives").expect("recv");
            // Receive offload may hand several datagrams over as one, `stride` bytes each.
            got.extend(buf[..meta[0].len].chunks(meta[0].stride).map(<[u8]>::to_vec));
        }
        let want: Vec<Vec<u8>> = (1..=3u8).map(|i| vec![i; segment]).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn receive_slots_hold_any_coalesced_receive_without_growing_with_the_datagram_size() {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let rt = tokio::runtime::Builder::new_current_thread().enable_io().build().expect("runtime");
        let _guard = rt.enter();
        let socket = ReadWatchedSocket::new(s).expect("socket");
        let slot = socket.max_receive_segments() * usize::from(super::super::MAX_UDP_PAYLOAD);
        if socket.state.gro_segments() > 1 {
            assert!(slot >= RECV_SLOT_BYTES, "a slot of {slot} bytes may not hold a coalesced receive");
        } else {
            // Without receive offload nothing is coalesced: a slot holds one datagram.
            assert!(slot >= usize::from(super::super::MAX_UDP_PAYLOAD), "a slot of {slot} bytes");
        }
        assert!(slot <= 2 * RECV_SLOT_BYTES, "a slot of {slot} bytes: 32 of them per endpoint");
    }
}
