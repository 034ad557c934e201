//! The internal seam between the link driver and a transport: a sink and a source of encoded
//! frames. Each transport implements it; nothing here is public.

use std::future::Future;

use bytes::Bytes;

use crate::frame::{DecodeError, FrameKind};

/// A transport failure seen by the driver.
#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum WireError {
    /// The connection failed.
    #[error("{0}")]
    Io(String),
    /// The transport's framing saw an invalid or oversized frame.
    #[error("{0}")]
    Decode(#[from] DecodeError),
    /// The peer sent something that is not a frame at all (e.g. a text message).
    #[error("{0}")]
    Protocol(String),
}

/// Sends encoded frames.
pub(crate) trait WireTx: Send + 'static {
    /// `feed` and `flush` are cancel-safe: a future dropped part-way leaves the stream
    /// consistent (what was not written yet stays buffered for the next call). Senders may then
    /// write directly when the link is idle, instead of through the driver's queue.
    const DIRECT: bool = false;

    /// Sends one complete encoded frame of the given kind.
    fn send(&mut self, frame: Bytes, kind: FrameKind) -> impl Future<Output = Result<(), WireError>> + Send;

    /// Queues one frame without necessarily writing it out; [`WireTx::flush`] must follow.
    /// Transports without buffering send it at once.
    fn feed(&mut self, frame: Bytes, kind: FrameKind) -> impl Future<Output = Result<(), WireError>> + Send {
        self.send(frame, kind)
    }

    /// Writes out frames queued by [`WireTx::feed`].
    fn flush(&mut self) -> impl Future<Output = Result<(), WireError>> + Send {
        std::future::ready(Ok(()))
    }

    /// Flushes and closes the sending direction (best effort).
    fn shutdown(&mut self) -> impl Future<Output = ()> + Send;

    /// The feature bits of the peer's hello (`frame::FEATURE_*`), once it has arrived.
    fn peer_features(&mut self, _features: u32) {}
}

/// Receives encoded frames.
pub(crate) trait WireRx: Send + 'static {
    /// The next complete frame; `Ok(None)` when the peer ended the connection cleanly.
    fn recv(&mut self) -> impl Future<Output = Result<Option<Bytes>, WireError>> + Send;
}
