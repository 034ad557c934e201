//! The floor a QUIC driver of our own could reach: quinn's protocol state machine
//! (`quinn-proto`, under `quinn`) driven from one task per side, with no channels and no task
//! switches between the socket, the connection and the stream. quinn moves a datagram from its
//! endpoint task to its connection task to the stream's reader, and a write from the writer to
//! its connection task; this row shows what those hops cost, next to the raw quinn row of the
//! same run (bench `link_rtt`, interleaved mode, row `raw-proto`).
//!
//! Only what a ping-pong needs: connections with one bidirectional stream each,
//! length-prefixed messages. The socket is quinn's own UDP layer (`quinn::udp`, with
//! segmentation offload both ways, so a 4 KiB message is one send and one receive), registered
//! with the reactor for reading only, as the QUIC link's socket is. Timers are armed lazily:
//! the sleep is reset only when a connection's next deadline comes earlier than the one armed
//! (quinn-proto moves its loss timer later with almost every packet, and resetting a tokio
//! timer each time costs).

use std::io::IoSliceMut;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use bytes::BytesMut;
use quinn::udp::{RecvMeta, Transmit, UdpSocketState};
use quinn_proto::{self as proto, ConnectionHandle, DatagramEvent, Dir, Endpoint, StreamId};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::time::Sleep;

use crate::turns::RoundTrip;

/// One connection of a side, with its stream and the bytes read from it so far.
struct Conn {
    handle: ConnectionHandle,
    conn: proto::Connection,
    stream: Option<StreamId>,
    got: Vec<u8>,
}

impl Conn {
    /// Reads what the stream holds into `self.got`, up to `want` bytes in all.
    fn read(&mut self, want: usize) {
        let Some(id) = self.stream else { return };
        let mut stream = self.conn.recv_stream(id);
        let Ok(mut chunks) = stream.read(true) else { return };
        while self.got.len() < want {
            match chunks.next(want - self.got.len()) {
                Ok(Some(chunk)) => self.got.extend_from_slice(&chunk.bytes),
                _ => break,
            }
        }
        // Whether a flow-control update is due shows in the next transmit.
        let _ = chunks.finalize();
    }

    fn write(&mut self, bytes: &[u8]) {
        if let Some(id) = self.stream {
            let n = self.conn.send_stream(id).write(bytes).expect("stream write");
            assert_eq!(n, bytes.len(), "a ping fits the stream's window");
        }
    }
}

/// One side: its socket, endpoint and connections (the dialing side has one).
pub(crate) struct ProtoSide {
    /// The socket, watched for reading; written to directly (non-blocking: a full buffer
    /// drops the datagram, and QUIC sends it again).
    socket: AsyncFd<std::net::UdpSocket>,
    udp: UdpSocketState,
    endpoint: Endpoint,
    server: Option<Arc<proto::ServerConfig>>,
    conns: Vec<Conn>,
    timer: Pin<Box<Sleep>>,
    armed: Option<Instant>,
    out: Vec<u8>,
    /// Two receive buffers: a receive that fills one has drained the socket.
    received: [Vec<u8>; 2],
}

impl ProtoSide {
    /// A side on a new socket on loopback; `server`: it accepts connections with that config.
    pub(crate) fn bind(server: Option<Arc<proto::ServerConfig>>) -> Self {
        let std_socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp bind");
        let udp = UdpSocketState::new((&std_socket).into()).expect("udp state");
        std_socket.set_nonblocking(true).expect("non-blocking");
        // The safe constructor tokio deprecated for descriptors that may change: an owned
        // socket cannot (as in `gearmesh_transport::quic`'s socket).
        #[allow(deprecated)]
        let socket = AsyncFd::with_interest(std_socket, Interest::READABLE).expect("reactor");
        let endpoint = Endpoint::new(Arc::new(super::raw_quic_endpoint_config()), server.clone(), true, None);
        let timer = Box::pin(tokio::time::sleep(std::time::Duration::from_secs(3600)));
        ProtoSide {
            socket,
            udp,
            endpoint,
            server,
            conns: Vec::new(),
            timer,
            armed: None,
            out: Vec::with_capacity(1500),
            received: [vec![0; 65536], vec![0; 65536]],
        }
    }

    pub(crate) fn local_addr(&self) -> SocketAddr {
        self.socket.get_ref().local_addr().expect("udp address")
    }

    /// Connects to `addr` and opens the stream: the dialing side's end of the floor.
    pub(crate) async fn connect(mut self, addr: SocketAddr, client: proto::ClientConfig) -> Self {
        let (handle, conn) = self.endpoint.connect(Instant::now(), client, addr, "localhost").expect("connect");
        self.conns.push(Conn { handle, conn, stream: None, got: Vec::new() });
        self.transmit();
        while self.conns[0].conn.is_handshaking() {
            self.step().await;
        }
        self.conns[0].stream = self.conns[0].conn.streams().open(Dir::Bi);
        assert!(self.conns[0].stream.is_some(), "stream");
        self
    }

    /// Sends what the connections have to send, hands their endpoint events over, and arms
    /// the timer if a next deadline came earlier than the one armed.
    fn transmit(&mut self) {
        let now = Instant::now();
        for c in &mut self.conns {
            while let Some(t) = c.conn.poll_transmit(now, self.udp.max_gso_segments(), &mut self.out) {
                send(&self.udp, &self.socket, &t, &self.out);
                self.out.clear();
            }
            while let Some(e) = c.conn.poll_endpoint_events() {
                if let Some(back) = self.endpoint.handle_event(c.handle, e) {
                    c.conn.handle_event(back);
                }
            }
            if let Some(deadline) = c.conn.poll_timeout()
                && self.armed.is_none_or(|armed| deadline < armed)
            {
                self.armed = Some(deadline);
                self.timer.as_mut().reset(deadline.into());
            }
        }
    }

    /// Waits for datagrams or the timer, feeds every datagram waiting to its connection, and
    /// sends what follows.
    async fn step(&mut self) {
        let readable = tokio::select! {
            r = self.socket.readable() => Some(r.expect("reactor")),
            () = &mut self.timer, if self.armed.is_some() => None,
        };
        let now = Instant::now();
        match readable {
            Some(mut ready) => {
                let [a, b] = &mut self.received;
                let mut bufs = [IoSliceMut::new(a), IoSliceMut::new(b)];
                let mut meta = [RecvMeta::default(); 2];
                let (udp, socket) = (&self.udp, &self.socket);
                let got = ready.try_io(|_| udp.recv(socket.get_ref().into(), &mut bufs, &mut meta));
                let n = match got {
                    Ok(r) => r.expect("udp recv"),
                    Err(_would_block) => 0,
                };
                if n > 0 && n < bufs.len() {
                    // Fewer than offered: the socket is drained (saves an `EAGAIN` call).
                    ready.clear_ready();
                }
                for (i, m) in meta.iter().enumerate().take(n) {
                    // With receive offload one buffer holds several datagrams, `stride` apart.
                    for at in (0..m.len).step_by(m.stride.max(1)) {
                        let end = (at + m.stride).min(m.len);
                        let data = BytesMut::from(&self.received[i][at..end]);
                        self.datagram_in(now, data, m.addr);
                    }
                }
            }
            None => {
                // The armed deadline passed: the connections' own may have moved later.
                self.armed = None;
                for c in &mut self.conns {
                    if c.conn.poll_timeout().is_some_and(|d| d <= now) {
                        c.conn.handle_timeout(now);
                    }
                }
            }
        }
        for c in &mut self.conns {
            while c.conn.poll().is_some() {}
            if c.stream.is_none() {
                c.stream = c.conn.streams().accept(Dir::Bi);
            }
        }
        self.transmit();
    }

    /// Hands one datagram to the endpoint.
    fn datagram_in(&mut self, now: Instant, data: BytesMut, from: SocketAddr) {
        match self.endpoint.handle(now, from, None, None, data, &mut self.out) {
            Some(DatagramEvent::ConnectionEvent(h, e)) => {
                if let Some(c) = self.conns.iter_mut().find(|c| c.handle == h) {
                    c.conn.handle_event(e);
                }
            }
            Some(DatagramEvent::NewConnection(incoming)) => {
                if let Ok((handle, conn)) = self.endpoint.accept(incoming, now, &mut self.out, self.server.clone()) {
                    self.conns.push(Conn { handle, conn, stream: None, got: Vec::new() });
                }
            }
            Some(DatagramEvent::Response(t)) => send(&self.udp, &self.socket, &t, &self.out),
            None => {}
        }
        self.out.clear();
    }

    /// Echoes length-prefixed messages (a little-endian `u32` length, then the bytes) on every
    /// connection, forever: the accepting side's end of the floor.
    pub(crate) async fn serve_echo(mut self) {
        loop {
            self.step().await;
            for c in &mut self.conns {
                loop {
                    c.read(4);
                    if c.got.len() < 4 {
                        break;
                    }
                    let len = u32::from_le_bytes([c.got[0], c.got[1], c.got[2], c.got[3]]) as usize;
                    c.read(4 + len);
                    if c.got.len() < 4 + len {
                        break;
                    }
                    let msg = std::mem::take(&mut c.got);
                    c.write(&msg);
                }
            }
            self.transmit();
        }
    }
}

/// Sends `t`, the first `t.size` bytes of `out`, at once; one the socket buffer has no room for
/// is dropped (QUIC sends it again).
fn send(udp: &UdpSocketState, socket: &AsyncFd<std::net::UdpSocket>, t: &proto::Transmit, out: &[u8]) {
    let transmit = Transmit {
        destination: t.destination,
        ecn: None,
        contents: &out[..t.size],
        segment_size: t.segment_size,
        src_ip: t.src_ip,
    };
    let _dropped_if_full = udp.send(socket.get_ref().into(), &transmit);
}

/// The dialing side's round trip on a [`ProtoSide`]: a length-prefixed message and its echo.
pub(crate) struct ProtoPing {
    side: ProtoSide,
    msg: Vec<u8>,
}

impl ProtoPing {
    pub(crate) fn new(side: ProtoSide, size: usize) -> Self {
        let mut msg = vec![0xabu8; size];
        msg[..4].copy_from_slice(&((size - 4) as u32).to_le_bytes());
        ProtoPing { side, msg }
    }
}

impl RoundTrip for ProtoPing {
    async fn once(&mut self) {
        let want = self.msg.len();
        self.side.conns[0].got.clear();
        self.side.conns[0].write(&self.msg);
        self.side.transmit();
        while self.side.conns[0].got.len() < want {
            self.side.step().await;
            self.side.conns[0].read(want);
        }
    }
}
