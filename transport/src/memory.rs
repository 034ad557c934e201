//! In-memory links: two [`Link`]s joined by bounded channels of encoded frames, for tests of the
//! layers above. Same codec, limits, hello exchange, heartbeats and close semantics as the
//! network transports; no sockets.

use bytes::Bytes;
use tokio::sync::mpsc;

use crate::frame::FrameKind;
use crate::link::handshake::{self, HandshakeError, LinkSetup, Role};
use crate::link::wire::{WireError, WireRx, WireTx};
use crate::link::{Link, LinkConfig, PeerInfo, TransportKind, driver};
use crate::{Hello, NodeId};

/// Frames in flight per direction before the sender waits.
const CHANNEL_FRAMES: usize = 64;

struct MemTx {
    tx: Option<mpsc::Sender<Bytes>>,
    max_frame_len: usize,
}

impl WireTx for MemTx {
    async fn send(&mut self, frame: Bytes, _kind: FrameKind) -> Result<(), WireError> {
        if frame.len() > self.max_frame_len {
            return Err(WireError::Io("frame over the size limit".into()));
        }
        match &self.tx {
            Some(tx) => tx.send(frame).await.map_err(|_| WireError::Io("peer gone".into())),
            None => Err(WireError::Io("shut down".into())),
        }
    }

    async fn shutdown(&mut self) {
        self.tx = None;
    }
}

struct MemRx {
    rx: mpsc::Receiver<Bytes>,
}

impl WireRx for MemRx {
    async fn recv(&mut self) -> Result<Option<Bytes>, WireError> {
        Ok(self.rx.recv().await)
    }
}

fn wires(config: &LinkConfig) -> ((MemTx, MemRx), (MemTx, MemRx)) {
    let (a_tx, b_rx) = mpsc::channel(CHANNEL_FRAMES);
    let (b_tx, a_rx) = mpsc::channel(CHANNEL_FRAMES);
    let side = |tx, rx| (MemTx { tx: Some(tx), max_frame_len: config.max_frame_len }, MemRx { rx });
    (side(a_tx, a_rx), side(b_tx, b_rx))
}

/// Connects two in-memory links with a full hello exchange: `a` dials, `b` accepts; each side's
/// check judges the other's hello. Each side uses its own setup's config.
pub async fn connect(a: &LinkSetup, b: &LinkSetup) -> Result<(Link, Link), HandshakeError> {
    let ((mut a_tx, mut a_rx), (mut b_tx, mut b_rx)) = wires(&a.config);
    b_tx.max_frame_len = b.config.max_frame_len;
    let peer = || PeerInfo::connecting(TransportKind::Memory, None, None);
    let timeout = a.config.handshake_timeout.max(b.config.handshake_timeout);
    let both = async {
        tokio::join!(
            handshake::exchange(&mut a_tx, &mut a_rx, a, Role::Dialer, peer()),
            handshake::exchange(&mut b_tx, &mut b_rx, b, Role::Acceptor, peer()),
        )
    };
    let (pa, pb) = tokio::time::timeout(timeout, both).await.map_err(|_| HandshakeError::Timeout)?;
    let (pa, pb) = (pa?, pb?);
    Ok((driver::start(a_tx, a_rx, pa, &a.config, None), driver::start(b_tx, b_rx, pb, &b.config, None)))
}

/// Two connected links with random node ids and no hello on the wire (see [`Link::pair`]).
pub(crate) fn pair_unchecked(config: &LinkConfig) -> (Link, Link) {
    let ((a_tx, a_rx), (b_tx, b_rx)) = wires(config);
    let info = |h: &Hello| PeerInfo {
        node_id: h.node_id,
        incarnation: h.incarnation,
        listen_addrs: Vec::new(),
        features: 0,
        transport: TransportKind::Memory,
        remote_addr: None,
        local_addr: None,
    };
    let ha = Hello { node_id: NodeId::random(), ..Hello::default() };
    let hb = Hello { node_id: NodeId::random(), ..Hello::default() };
    (driver::start(a_tx, a_rx, info(&hb), config, None), driver::start(b_tx, b_rx, info(&ha), config, None))
}
