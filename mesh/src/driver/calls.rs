//! Remote calls and events: the outgoing call table (call ids, replies, cancellation, failing
//! fast when the callee's node goes away), calls from other nodes run on the local host, and
//! switching of frames addressed to other nodes.

use std::sync::{
    Arc, Mutex,
    atomic::{AtomicU64, Ordering},
};

use bytes::{Bytes, BytesMut};
use gearmesh_gears::{
    Arg, Call as GearCall, CallError, CallMeta, ErrorCode, Event as GearEvent, Payload, Principal, Publish, TraceId,
    WireBody, host::Start,
};
use gearmesh_transport::{
    BodyKind, Call, CallRef, Cancel, Event, Frame, FrameKind, LinkId, LinkSender, Reply, ReplyResult, Route, SendError,
    TrySendError,
    frame::{self, PeekedCall},
};
use tokio::{sync::oneshot, task::AbortHandle, time::Instant};

use super::{Counters, FastMap, Inner, Mesh, lock, to_core, to_link};
use crate::core::NodeId;

/// How a call to another node failed.
#[derive(Debug)]
pub(crate) struct RemoteError {
    pub(crate) error: CallError,
    /// The mesh on the way answered, not the called node: this node had no route, or a switch
    /// had none, met the hop limit or a congested link, or lost the link the call took. Such a
    /// failure says nothing of the called replica's health, so its circuit breaker does not
    /// count it (as Envoy's outlier detection counts only what a host itself answers).
    pub(crate) on_the_way: bool,
}

impl From<CallError> for RemoteError {
    fn from(error: CallError) -> Self {
        RemoteError { error, on_the_way: false }
    }
}

/// One outgoing call waiting for its reply.
#[derive(Debug)]
pub(crate) struct Pending {
    dst: NodeId,
    /// The link the call went out on.
    via: LinkId,
    tx: oneshot::Sender<Result<Payload, RemoteError>>,
}

/// Outgoing calls by id, and calls from other nodes running here.
#[derive(Debug, Default)]
pub(crate) struct CallTable {
    next_id: AtomicU64,
    pending: Mutex<FastMap<u64, Pending>>,
    inbound: Mutex<FastMap<(NodeId, u64), AbortHandle>>,
    /// Cancels that arrived before their call (over QUIC they travel on another stream and can
    /// overtake it): the call is dropped when it comes.
    early_cancels: Mutex<EarlyCancels>,
}

/// Remembered early cancels, bounded: at [`EarlyCancels::CAP`] the oldest is forgotten (a call
/// that late is then run and its reply ignored by a caller that gave up, as before). Ids are
/// unique per calling node, so a remembered id never matches another call.
#[derive(Debug, Default)]
pub(crate) struct EarlyCancels {
    set: std::collections::HashSet<(NodeId, u64), foldhash::fast::RandomState>,
    order: std::collections::VecDeque<(NodeId, u64)>,
}

impl EarlyCancels {
    /// How many early cancels are remembered at most.
    pub(crate) const CAP: usize = 4096;

    fn remember(&mut self, key: (NodeId, u64)) {
        if self.set.insert(key) {
            self.order.push_back(key);
            if self.order.len() > Self::CAP
                && let Some(old) = self.order.pop_front()
            {
                self.set.remove(&old);
            }
        }
    }

    /// Whether `key` was cancelled early (forgetting it: each call comes once).
    fn take(&mut self, key: &(NodeId, u64)) -> bool {
        // The order queue keeps the key until it ages out; the set decides.
        self.set.remove(key)
    }
}

impl CallTable {
    fn insert(
        &self,
        dst: NodeId,
        via: LinkId,
        max: usize,
    ) -> Result<(u64, oneshot::Receiver<Result<Payload, RemoteError>>), CallError> {
        let (tx, rx) = oneshot::channel();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let mut pending = lock(&self.pending);
        if pending.len() >= max {
            return Err(
                CallError::overloaded(format!("{max} remote calls are already waiting for replies")).mark_not_run()
            );
        }
        pending.insert(id, Pending { dst, via, tx });
        Ok((id, rx))
    }

    /// Removes a pending call; `true` if it was still pending.
    fn remove(&self, id: u64) -> Option<Pending> {
        lock(&self.pending).remove(&id)
    }

    fn complete(&self, id: u64, result: Result<Payload, CallError>) {
        if let Some(p) = self.remove(id) {
            // The caller may have given up already; then nobody wants the reply.
            let _delivered = p.tx.send(result.map_err(RemoteError::from));
        }
    }

    /// Completes call `id` with a reply that node `from` sent: the called node, or a switch on
    /// the way that answered an error for it (see [`RemoteError::on_the_way`]).
    fn complete_reply(&self, id: u64, from: NodeId, result: Result<Payload, CallError>) {
        if let Some(p) = self.remove(id) {
            let on_the_way = from != p.dst;
            let _delivered = p.tx.send(result.map_err(|error| RemoteError { error, on_the_way }));
        }
    }

    /// Fails with `unavailable` every call `pred` picks; `on_the_way(p)`: see
    /// [`RemoteError::on_the_way`].
    fn fail_where(&self, message: &str, mut pred: impl FnMut(&Pending) -> bool, on_the_way: impl Fn(&Pending) -> bool) {
        let failed: Vec<Pending> = {
            let mut pending = lock(&self.pending);
            let ids: Vec<u64> = pending.iter().filter(|(_, p)| pred(p)).map(|(id, _)| *id).collect();
            ids.iter().filter_map(|id| pending.remove(id)).collect()
        };
        for p in failed {
            let error = RemoteError { error: CallError::unavailable(message), on_the_way: on_the_way(&p) };
            // The caller may have given up already.
            let _delivered = p.tx.send(Err(error));
        }
    }

    /// Fails every call to `dst` with `unavailable`.
    pub(crate) fn fail_to(&self, dst: NodeId, message: &str) {
        self.fail_where(message, |p| p.dst == dst, |_| false);
    }

    /// Fails every call that went out on `link`, a link to `peer`, with `unavailable`. For a
    /// call to another node than `peer`, the link was a switch's: a failure on the way.
    pub(crate) fn fail_via(&self, link: LinkId, peer: NodeId, message: &str) {
        self.fail_where(message, |p| p.via == link, |p| p.dst != peer);
    }

    /// Notes that call `id`, if anyone still waits for it, was sent again on `via`.
    fn resent(&self, id: u64, via: LinkId) {
        if let Some(p) = lock(&self.pending).get_mut(&id) {
            p.via = via;
        }
    }

    /// Whether call `id` still waits for its reply.
    fn is_pending(&self, id: u64) -> bool {
        lock(&self.pending).contains_key(&id)
    }

    /// Fails every call whose destination has no route any more.
    pub(crate) fn fail_unroutable(&self, mut routable: impl FnMut(NodeId) -> bool) {
        // The node itself is gone (declared dead, or cut off): counted against it.
        self.fail_where("no route to the node running the call", |p| !routable(p.dst), |_| false);
    }

    /// Fails every pending call.
    pub(crate) fn fail_all(&self, message: &str) {
        self.fail_where(message, |_| true, |_| false);
    }
}

/// Removes a pending call when its caller stops waiting, and tells the callee to stop.
struct PendingGuard {
    inner: Arc<Inner>,
    id: u64,
    dst: NodeId,
    armed: bool,
}

impl Drop for PendingGuard {
    fn drop(&mut self) {
        if self.armed && self.inner.calls.remove(self.id).is_some() {
            let route = Route { src: to_link(self.inner.id), dst: to_link(self.dst), hops: 0 };
            if let Some(tx) = self.inner.route_to(self.dst) {
                // Best effort: if the link is congested the callee's own deadline still stops it.
                let _sent = tx.try_send(&Frame::Cancel(Cancel { route, call_id: self.id }));
            }
        }
    }
}

fn wire_to_kind(w: WireBody) -> (BodyKind, Bytes) {
    match w {
        WireBody::Json(b) => (BodyKind::Json, b),
        WireBody::Bytes(b) => (BodyKind::Bytes, b),
    }
}

fn principal_to_wire(p: &Principal) -> String {
    p.to_string()
}

fn principal_from_wire(s: &str, scopes: Vec<String>) -> Principal {
    match s.split_once(':') {
        Some(("user", id)) => Principal::user(id, scopes),
        Some(("gear", id)) => match gearmesh_gears::GearName::new(id) {
            Ok(g) => Principal::gear(&g),
            Err(_) => Principal::anonymous(),
        },
        Some(("node", id)) => Principal::node(id),
        _ => Principal::anonymous(),
    }
}

impl Mesh {
    /// Sends a call to the gear on node `dst` along the shortest path and waits for the reply
    /// until `deadline`. Dropping the future cancels the remote work.
    ///
    /// # Errors
    /// `unavailable` when `dst` cannot be reached (or goes away during the call), `timeout`,
    /// `overloaded`, or the callee's own error.
    pub(crate) async fn call_node(
        &self,
        dst: NodeId,
        call: GearCall<'_>,
        deadline: Instant,
    ) -> Result<Payload, RemoteError> {
        let inner = &self.inner;
        let now = Instant::now();
        let remaining_ms = deadline.saturating_duration_since(now).as_millis();
        if remaining_ms == 0 {
            return Err(CallError::timeout("the deadline passed before the call was sent").into());
        }
        let (kind, body) = wire_to_kind(call.arg.to_wire()?);
        let Some(tx) = inner.route_to(dst) else {
            let error = CallError::unavailable(format!("no route to node {dst}")).mark_not_run();
            return Err(RemoteError { error, on_the_way: true });
        };
        inner.count_for_shortcut(dst, tx.peer().node_id != to_link(dst), now);
        let (id, rx) = inner.calls.insert(dst, tx.id(), inner.config.max_pending_calls)?;
        let mut guard = PendingGuard { inner: inner.clone(), id, dst, armed: true };
        // Encoded straight from the call's parts: no owned copies of its strings first.
        let caller = principal_to_wire(&call.meta.caller);
        let frame = CallRef {
            route: Route { src: to_link(inner.id), dst: to_link(dst), hops: 0 },
            call_id: id,
            deadline_ms: u32::try_from(remaining_ms).unwrap_or(u32::MAX),
            trace_id: call.meta.trace_id.as_u128(),
            caller: &caller,
            scopes: call.meta.caller.scopes(),
            gear: call.gear,
            port: call.port,
            body_kind: kind,
            body: &body,
        };
        let mut buf = BytesMut::with_capacity(frame.encoded_len());
        // Too big for a frame, or a field too long: the same anywhere, so not worth a retry.
        frame
            .encode(&mut buf, tx.max_frame_len())
            .map_err(|e| CallError::bad_request(format!("the call does not fit in a frame: {e}")))?;
        let frame = buf.freeze();
        Counters::bump(&inner.counters.calls_sent);
        let outcome = tokio::time::timeout_at(deadline, async {
            tx.send_raw(frame)
                .await
                .map_err(|e| CallError::unavailable(format!("link towards node {dst} failed: {e}")))?;
            rx.await.unwrap_or_else(|_| Err(CallError::unavailable(format!("node {dst} went away")).into()))
        })
        .await;
        match outcome {
            Ok(result) => {
                guard.armed = inner.calls.remove(id).is_some();
                result
            }
            Err(_elapsed) => Err(CallError::timeout(format!(
                "{}/{} on node {dst} did not reply in time (call {id})",
                call.gear, call.port
            ))
            .into()),
        }
    }

    /// Sends an event to every other node with a listener for its topic (never to the others).
    /// At-most-once: a node whose link is congested misses it.
    pub fn publish(&self, p: &Publish) {
        let targets = self.inner.interested_in(&p.topic);
        if targets.is_empty() {
            return;
        }
        let (kind, body) = match p.event.as_arg().to_wire() {
            Ok(w) => wire_to_kind(w),
            Err(e) => {
                tracing::warn!(topic = %p.topic, error = %e, "event does not serialize; not sent to other nodes");
                return;
            }
        };
        for dst in targets {
            let frame = Frame::Event(Event {
                route: Route { src: to_link(self.inner.id), dst: to_link(dst), hops: 0 },
                topic: p.topic.clone(),
                publisher: principal_to_wire(&p.publisher),
                trace_id: p.trace_id.as_u128(),
                body_kind: kind,
                body: body.clone(),
            });
            let counters = &self.inner.counters;
            match self.inner.route_to(dst) {
                Some(tx) => match tx.try_send(&frame) {
                    Ok(()) => Counters::bump(&counters.events_sent),
                    Err(e) => {
                        Counters::bump(&counters.frames_dropped);
                        tracing::debug!(node = %dst, error = %e, "event dropped");
                    }
                },
                None => {
                    Counters::bump(&counters.frames_dropped);
                    tracing::debug!(node = %dst, "no route for an event");
                }
            }
        }
    }
}

/// Why a switch did not pass a routed frame on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unforwarded {
    /// No link or route towards the destination (it left, died, or routes are still forming).
    NoRoute,
    /// The link towards the destination has a full send queue.
    Congested,
}

/// How long a switch holds a reply for a congested link before dropping it.
const HOLD_REPLY_FOR: std::time::Duration = std::time::Duration::from_secs(2);
/// Bytes of replies a switch holds for congested links at once, at most (see
/// [`Inner::forward_reply`]).
const MAX_HELD_REPLY_BYTES: usize = 64 * 1024 * 1024;

impl Inner {
    /// Sends a routed frame one hop further. Never waits: a switch must not hold up the link the
    /// frame came on.
    /// `answer`: the frame answers a call (a reply, or a cancel), so a lingering link may carry
    /// it (see [`Inner::route_or_lingering`]); `came_from`: the peer it came from, if switched.
    fn forward(&self, route: &Route, frame: Frame, answer: bool, came_from: Option<NodeId>) -> Result<(), Unforwarded> {
        let dst = to_core(route.dst);
        if let Frame::Cancel(c) = &frame {
            // Its caller gave up on it: a link that breaks now owes the caller nothing.
            self.settle_switched(to_core(c.route.src), c.call_id);
        }
        let next = if answer { self.route_or_lingering(dst, came_from) } else { self.route_to(dst) };
        let result = match next {
            Some(tx) => {
                let sent = if answer {
                    self.try_answer(tx, &frame, dst, came_from).1
                } else {
                    let sent = tx.try_send(&frame);
                    if let (Ok(()), Frame::Call(c)) = (&sent, &frame) {
                        self.note_switched(route, c.call_id, c.deadline_ms, &tx);
                    }
                    sent
                };
                sent.map_err(|e| match e {
                    TrySendError::Full => Unforwarded::Congested,
                    _ => Unforwarded::NoRoute,
                })
            }
            None => Err(Unforwarded::NoRoute),
        };
        let counter = if result.is_ok() { &self.counters.frames_forwarded } else { &self.counters.frames_dropped };
        Counters::bump(counter);
        if let Err(e) = &result {
            tracing::debug!(node = %dst, reason = ?e, "routed frame not forwarded");
        }
        result
    }

    /// Passes a reply for another node on. A reply that meets a full send queue is held (in a
    /// task of its own, so the link it came in on reads on) until there is room, for at most
    /// [`HOLD_REPLY_FOR`] and [`MAX_HELD_REPLY_BYTES`] over all held replies: a burst then delays
    /// replies instead of losing them, which would leave their callers waiting for their
    /// deadlines. Beyond those bounds it is dropped and counted.
    fn forward_reply(self: &Arc<Self>, r: Reply, came_from: Option<NodeId>) {
        let dst = to_core(r.route.dst);
        self.settle_switched(dst, r.call_id);
        let frame = Frame::Reply(r);
        let tx = match self.route_or_lingering(dst, came_from) {
            Some(tx) => tx,
            None => {
                Counters::bump(&self.counters.frames_dropped);
                tracing::debug!(node = %dst, "reply not forwarded: no route");
                return;
            }
        };
        match self.try_answer(tx, &frame, dst, came_from) {
            (_, Ok(())) => Counters::bump(&self.counters.frames_forwarded),
            (tx, Err(TrySendError::Full)) => self.hold_reply(tx, frame, true),
            (_, Err(e)) => {
                Counters::bump(&self.counters.frames_dropped);
                tracing::debug!(node = %dst, error = %e, "reply not forwarded");
            }
        }
    }

    /// Queues `frame`, an answer for `dst`, on `tx` without waiting; if `tx` turns out to be
    /// closing (chosen a moment before its close: a lingering link, say), once more on the link
    /// chosen afresh, which passes it over. Returns the link last tried and how it went.
    fn try_answer(
        &self,
        tx: LinkSender,
        frame: &Frame,
        dst: NodeId,
        came_from: Option<NodeId>,
    ) -> (LinkSender, Result<(), TrySendError>) {
        match tx.try_send(frame) {
            Err(TrySendError::Send(SendError::Closed)) => match self.route_or_lingering(dst, came_from) {
                Some(next) if next.id() != tx.id() => {
                    tracing::debug!(node = %dst, "an answer's link closed as it was sent; another takes it");
                    let sent = next.try_send(frame);
                    (next, sent)
                }
                _ => (tx, Err(TrySendError::Send(SendError::Closed))),
            },
            other => (tx, other),
        }
    }

    /// Holds `frame`, a reply, until `tx` has room (see [`Inner::forward_reply`]). `switched`:
    /// the reply is another node's, counted as forwarded or dropped.
    fn hold_reply(self: &Arc<Self>, tx: LinkSender, frame: Frame, switched: bool) {
        let size = frame.encoded_len();
        let held = self.held_reply_bytes.fetch_add(size, Ordering::AcqRel);
        if held + size > MAX_HELD_REPLY_BYTES {
            self.held_reply_bytes.fetch_sub(size, Ordering::AcqRel);
            if switched {
                Counters::bump(&self.counters.frames_dropped);
            }
            tracing::debug!("reply dropped: the next link is congested and the held replies are at their bound");
            return;
        }
        let inner = self.clone();
        tokio::spawn(async move {
            let sent = matches!(tokio::time::timeout(HOLD_REPLY_FOR, tx.send(&frame)).await, Ok(Ok(())));
            inner.held_reply_bytes.fetch_sub(size, Ordering::AcqRel);
            if !sent {
                tracing::debug!("held reply dropped: the next link stayed congested or closed");
            }
            if switched {
                Counters::bump(if sent { &inner.counters.frames_forwarded } else { &inner.counters.frames_dropped });
            }
        });
    }

    /// Sends on the frames a closed link never wrote ([`LinkSender::take_unsent`]): none reached
    /// the link's peer, so none is lost for want of a resend. A call of this node's goes out
    /// again on the route there is now, or fails `unavailable` at once (it surely did not run);
    /// another node's call goes on, or its caller is answered `unavailable` at once; replies,
    /// cancels and events go on as a switch passes them. Gossip is left: the core sends its
    /// state again.
    pub(super) fn send_unsent(self: &Arc<Self>, frames: Vec<Bytes>) {
        for raw in frames {
            let frame = match frame::decode(&raw, usize::MAX) {
                Ok(f) => f,
                Err(e) => {
                    tracing::debug!(error = %e, "an unsent frame does not decode");
                    continue;
                }
            };
            match frame {
                Frame::Call(c) if to_core(c.route.src) == self.id => self.resend_call(&c.route, c.call_id, raw),
                Frame::Call(c) => {
                    let (route, call_id) = (c.route, c.call_id);
                    if self.forward(&route, Frame::Call(c), false, None).is_err()
                        && let Some(back) = self.route_or_lingering(to_core(route.src), None)
                    {
                        let e =
                            CallError::unavailable("the link towards the called node closed before the call went on")
                                .mark_not_run();
                        self.reply(&route, &back, call_id, Err(e));
                    }
                }
                Frame::Reply(r) => self.forward_reply(r, None),
                Frame::Cancel(c) => {
                    let route = c.route;
                    let _best_effort = self.forward(&route, Frame::Cancel(c), true, None);
                }
                Frame::Event(e) => {
                    let route = e.route;
                    let _at_most_once = self.forward(&route, Frame::Event(e), false, None);
                }
                _ => {}
            }
        }
    }

    /// Sends this node's call `call_id` again, as `raw`, on the route towards `route.dst` there
    /// is now; fails it `unavailable` if there is none or it has no room.
    fn resend_call(&self, route: &Route, call_id: u64, raw: Bytes) {
        if !self.calls.is_pending(call_id) {
            return;
        }
        let dst = to_core(route.dst);
        if let Some(tx) = self.route_to(dst)
            && tx.try_send_raw(raw).is_ok()
        {
            self.calls.resent(call_id, tx.id());
            tracing::debug!(node = %dst, call = call_id, "a call its link never sent went out on another");
            return;
        }
        let e = format!("the link towards node {dst} closed before the call was sent, and no other route has room");
        self.calls.complete(call_id, Err(CallError::unavailable(e).mark_not_run()));
    }

    /// Switches a routed frame for another node on as the bytes it came in (its hop count
    /// raised), without decoding and encoding it again: what a switch does with almost every
    /// frame. One that cannot go on (hop limit, no route, a congested link) takes the decoding
    /// path instead, which counts it and answers a call with an error at once.
    /// `next`: the link towards `route.dst`'s next hop.
    /// `call`: what [`frame::peek_call`] read from `raw` (`None` for an event).
    pub(super) fn switch_raw(
        self: &Arc<Self>,
        peer: NodeId,
        from: &LinkSender,
        next: Option<&LinkSender>,
        route: Route,
        call: Option<PeekedCall>,
        raw: Bytes,
    ) {
        let hops = route.hops.saturating_add(1);
        if hops <= self.config.max_hops
            && let Some(tx) = next
        {
            let mut bytes = BytesMut::from(&raw[..]);
            if frame::set_hops(&mut bytes, hops) && tx.try_send_raw(bytes.freeze()).is_ok() {
                Counters::bump(&self.counters.frames_forwarded);
                match call {
                    Some(PeekedCall { kind: FrameKind::Call, call_id, deadline_ms }) => {
                        self.note_switched(&route, call_id, deadline_ms.unwrap_or(0), tx);
                    }
                    Some(PeekedCall { kind: FrameKind::Reply, call_id, .. }) => {
                        self.settle_switched(to_core(route.dst), call_id);
                    }
                    Some(PeekedCall { kind: FrameKind::Cancel, call_id, .. }) => {
                        self.settle_switched(to_core(route.src), call_id);
                    }
                    _ => {}
                }
                return;
            }
        }
        // The link checked the frame (`validate_routed`), so it decodes.
        match frame::decode(&raw, usize::MAX) {
            Ok(f) => self.on_frame(peer, from, f),
            Err(e) => tracing::debug!(%peer, error = %e, "routed frame does not decode"),
        }
    }

    /// Notes a call for another node that went out on `via` (see [`super::switched`]).
    fn note_switched(&self, route: &Route, call_id: u64, deadline_ms: u32, via: &LinkSender) {
        let caller = to_core(route.src);
        if caller == self.id {
            // This node's own call: its call table knows the link (`CallTable::fail_via`).
            return;
        }
        let deadline = std::time::Duration::from_millis(u64::from(deadline_ms));
        let tracked =
            lock(&self.switched).note(caller, to_core(route.dst), call_id, via.id(), deadline, Instant::now());
        if !tracked {
            Counters::bump(&self.counters.switched_calls_untracked);
            tracing::debug!(%caller, call = call_id, "switched call not tracked: the table is full");
        }
    }

    /// A switched call was answered or cancelled.
    fn settle_switched(&self, caller: NodeId, call_id: u64) {
        lock(&self.switched).settle(caller, call_id);
    }

    /// Forgets the switched calls that went out on `link`, which closed in order: the peer read
    /// everything written on it, and answers come back some other way.
    pub(super) fn forget_switched(&self, link: LinkId) {
        drop(lock(&self.switched).take_link(link, Instant::now()));
    }

    /// Fails the calls that went out on `link`, a link to `peer` given up on as broken (it may
    /// have lost them or their replies; see `LINK_BROKE`): this node's own, and those it
    /// switched for others.
    pub(super) fn fail_calls_over(self: &Arc<Self>, link: LinkId, peer: NodeId) {
        self.calls.fail_via(link, peer, super::LINK_BROKE);
        self.fail_switched(link, peer);
    }

    /// Answers `unavailable` at once, to their callers, the switched calls that went out on
    /// `link`, which broke on its way to `peer`: the call or its reply may have been lost with
    /// it, and the callers, who do not see this link, would otherwise wait for their deadlines.
    fn fail_switched(self: &Arc<Self>, link: LinkId, peer: NodeId) {
        let calls = lock(&self.switched).take_link(link, Instant::now());
        if !calls.is_empty() {
            tracing::debug!(%peer, calls = calls.len(), "switched calls fail: their link broke");
        }
        for s in calls {
            Counters::bump(&self.counters.switched_calls_failed);
            let Some(back) = self.route_or_lingering(s.caller, None) else {
                tracing::debug!(caller = %s.caller, call = s.call_id, "no way back to tell a caller its link broke");
                continue;
            };
            let e = CallError::unavailable(format!(
                "the link from node {} towards node {peer}, which the call to node {} took, broke; \
                 the call may or may not have run",
                self.id, s.callee
            ));
            let route = Route { src: to_link(s.caller), dst: to_link(s.callee), hops: 0 };
            self.reply(&route, &back, s.call_id, Err(e));
        }
    }

    fn hop(&self, route: &mut Route) -> bool {
        route.hops = route.hops.saturating_add(1);
        let ok = route.hops <= self.config.max_hops;
        if !ok {
            Counters::bump(&self.counters.frames_dropped);
            tracing::debug!(src = %to_core(route.src), dst = %to_core(route.dst), "routed frame dropped at the hop limit");
        }
        ok
    }

    /// Answers a call at once (an error: refused, or not passed on), without waiting: a reply
    /// that meets a full queue is held as a switched one is ([`Inner::forward_reply`]).
    fn reply(self: &Arc<Self>, to: &Route, via: &LinkSender, call_id: u64, result: Result<Payload, CallError>) {
        let (tx, frame) = self.reply_frame(to, via, call_id, result);
        match self.try_answer(tx, &frame, to_core(to.src), None) {
            (_, Ok(())) => {}
            (tx, Err(TrySendError::Full)) => self.hold_reply(tx, frame, false),
            (_, Err(e)) => tracing::debug!(error = %e, "reply dropped; the caller will time out"),
        }
    }

    /// Sends the reply of a call that ran here, waiting for room on a congested link (never
    /// dropping it) until the caller's deadline, after which nobody waits for it.
    async fn reply_when_room(
        &self,
        to: &Route,
        via: &LinkSender,
        call_id: u64,
        result: Result<Payload, CallError>,
        deadline: Instant,
    ) {
        let (tx, frame) = self.reply_frame(to, via, call_id, result);
        // The common case needs no timer.
        let tx = match self.try_answer(tx, &frame, to_core(to.src), None) {
            (_, Ok(())) => return,
            (tx, Err(TrySendError::Full)) => tx,
            (_, Err(e)) => {
                tracing::debug!(error = %e, "reply not sent: the link closed");
                return;
            }
        };
        match tokio::time::timeout_at(deadline, tx.send(&frame)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::debug!(error = %e, "reply not sent: the link closed"),
            Err(_) => tracing::debug!(call = call_id, "reply not sent before the caller's deadline"),
        }
    }

    /// The reply frame, and the link towards the caller (the one the call came on if there is no
    /// route).
    fn reply_frame(
        &self,
        to: &Route,
        via: &LinkSender,
        call_id: u64,
        result: Result<Payload, CallError>,
    ) -> (LinkSender, Frame) {
        let result = match result.and_then(Payload::into_wire) {
            Ok(w) => {
                let (kind, body) = wire_to_kind(w);
                ReplyResult::Ok { kind, body }
            }
            Err(e) => ReplyResult::Err(Bytes::from(serde_json::to_vec(&e).unwrap_or_default())),
        };
        let route = Route { src: to_link(self.id), dst: to.src, hops: 0 };
        let frame = Frame::Reply(Reply { route, call_id, result });
        // Back the way the call came, while that link is in the table: the call just crossed
        // it, and the caller's own choice of path says which of our links to it it still trusts.
        // A caller that has given up on its direct link to us (it broke, as the caller saw it)
        // sends through a switch, and a reply on that link, which this node may not yet know to
        // be broken, would be lost. Otherwise (the link is being let go of) the way answers go
        // (`route_or_lingering`: a lingering link to the caller first), and the link the call
        // came on when there is none.
        let tx = if self.is_current(via) {
            via.clone()
        } else {
            let tx = self.route_or_lingering(to_core(to.src), None).unwrap_or_else(|| via.clone());
            tracing::debug!(caller = %to_core(to.src), call = call_id, next = %tx.peer().node_id, "reply not on the call's own link (let go of)");
            tx
        };
        (tx, frame)
    }

    pub(super) fn on_call(self: &Arc<Self>, from: &LinkSender, mut c: Call) {
        if to_core(c.route.dst) != self.id {
            if !self.hop(&mut c.route) {
                // Dropped at the hop limit (routes still settling): fail fast, not at the deadline.
                let e = CallError::unavailable("no stable route to the node yet (hop limit reached)").mark_not_run();
                self.reply(&c.route, from, c.call_id, Err(e));
            } else {
                let route = c.route;
                let call_id = c.call_id;
                if let Err(why) = self.forward(&route, Frame::Call(c), false, None) {
                    Counters::bump(&self.counters.calls_refused);
                    // The caller hears at once instead of waiting for its deadline.
                    let e = match why {
                        Unforwarded::Congested => CallError::overloaded("a switch on the way is congested"),
                        Unforwarded::NoRoute => CallError::unavailable(format!(
                            "node {} has no route to node {} right now",
                            self.id,
                            to_core(route.dst)
                        )),
                    }
                    .mark_not_run();
                    self.reply(&route, from, call_id, Err(e));
                }
            }
            return;
        }
        let src = to_core(c.route.src);
        let key = (src, c.call_id);
        if lock(&self.calls.early_cancels).take(&key) {
            // Its caller gave up before the call arrived: nobody waits for a reply.
            tracing::debug!(call = c.call_id, "call cancelled before it arrived; not run");
            return;
        }
        if lock(&self.calls.inbound).len() >= self.config.max_inbound_calls {
            Counters::bump(&self.counters.calls_refused);
            let e = CallError::overloaded("this node runs too many calls from other nodes").mark_not_run();
            self.reply(&c.route, from, c.call_id, Err(e));
            return;
        }
        Counters::bump(&self.counters.calls_received);
        let inner = self.clone();
        let from = from.clone();
        let mut serve = Box::pin(async move {
            let route = c.route;
            let caller = principal_from_wire(&c.caller, std::mem::take(&mut c.scopes));
            let started = Instant::now();
            let deadline = started + std::time::Duration::from_millis(u64::from(c.deadline_ms));
            let meta = CallMeta::continuing(caller, Some(deadline), TraceId::from_u128(c.trace_id));
            let arg = match c.body_kind {
                BodyKind::Json => Arg::json(c.body),
                BodyKind::Bytes => Arg::bytes(c.body),
            };
            let call = GearCall { gear: &c.gear, port: &c.port, arg, meta };
            let allowed = inner.authorizer.get().map_or(Ok(()), |a| a.authorize_call(&call));
            let result = match allowed.map(|()| inner.host.start(call)) {
                Err(e) => Err(e),
                Ok(Start::Running(fut)) => fut.await,
                // The caller's strategy routes around a busy replica.
                Ok(Start::Busy(_, e)) => Err(e),
                Ok(Start::NotHosted(call)) => {
                    // Gone from here (a graceful leave); another replica may take it.
                    Err(CallError::not_found(format!("gear {:?} is not hosted on node {}", call.gear, inner.id))
                        .mark_not_run())
                }
            };
            let observer = inner.call_observer.read().ok().and_then(|o| o.clone());
            if let Some(o) = observer {
                o.served(to_link(src), &c.gear, &c.port, started, result.as_ref().map(|_| ()));
            }
            inner.reply_when_room(&route, &from, c.call_id, result, deadline).await;
        });
        // Polled once here first, on the link's task: a port that answers at once (most do)
        // replies with no task spawned and no task switch. Ports run isolated, so a panicking
        // port fails its own call and not the link. One that must wait goes on in a task of
        // its own (polled again there, as the Future contract allows).
        let mut first = std::task::Context::from_waker(std::task::Waker::noop());
        if serve.as_mut().poll(&mut first).is_ready() {
            return;
        }
        let inner = self.clone();
        let task = tokio::spawn(async move {
            serve.await;
            // Counted until its reply is sent, so replies waiting for a congested link stay
            // within `max_inbound_calls`.
            lock(&inner.calls.inbound).remove(&key);
        });
        lock(&self.calls.inbound).insert(key, task.abort_handle());
        // The task may have finished before we registered it; then drop the stale entry. A
        // cancel handled meanwhile (from another stream) found no entry: honour it now.
        if task.is_finished() || lock(&self.calls.early_cancels).take(&key) {
            lock(&self.calls.inbound).remove(&key);
            task.abort();
        }
    }

    /// A reply that came from `peer`: this node's own, or one to switch on.
    pub(super) fn on_reply(self: &Arc<Self>, peer: NodeId, mut r: Reply) {
        if to_core(r.route.dst) != self.id {
            if self.hop(&mut r.route) {
                self.forward_reply(r, Some(peer));
            }
            return;
        }
        let result = match r.result {
            ReplyResult::Ok { kind: BodyKind::Json, body } => Ok(Payload::json(body)),
            ReplyResult::Ok { kind: BodyKind::Bytes, body } => Ok(Payload::bytes(body)),
            ReplyResult::Err(bytes) => Err(serde_json::from_slice::<CallError>(&bytes)
                .unwrap_or_else(|_| CallError::new(ErrorCode::Internal, "the remote error did not decode"))),
        };
        self.calls.complete_reply(r.call_id, to_core(r.route.src), result);
    }

    /// A cancel that came from `peer`: for a call running here, or one to switch on.
    pub(super) fn on_cancel(&self, peer: NodeId, mut c: Cancel) {
        if to_core(c.route.dst) != self.id {
            if self.hop(&mut c.route) {
                let route = c.route;
                let _dropped = self.forward(&route, Frame::Cancel(c), true, Some(peer));
            }
            return;
        }
        let key = (to_core(c.route.src), c.call_id);
        let running = lock(&self.calls.inbound).remove(&key);
        match running {
            Some(task) => task.abort(),
            // Not here yet (it may have overtaken its call), or already finished.
            None => lock(&self.calls.early_cancels).remember(key),
        }
    }

    pub(super) fn on_event(&self, mut e: Event) {
        if to_core(e.route.dst) != self.id {
            if self.hop(&mut e.route) {
                let route = e.route;
                let _dropped = self.forward(&route, Frame::Event(e), false, None);
            }
            return;
        }
        Counters::bump(&self.counters.events_received);
        let event = match e.body_kind {
            BodyKind::Json => GearEvent::json(e.body),
            BodyKind::Bytes => GearEvent::bytes(e.body),
        };
        let publisher = principal_from_wire(&e.publisher, Vec::new());
        let p = Publish { topic: e.topic, event, publisher, trace_id: TraceId::from_u128(e.trace_id) };
        if let Err(err) = self.host.publish_local(&p) {
            tracing::debug!(error = %err, "event from another node rejected");
        }
    }
}

#[cfg(test)]
mod fail_via_tests {
    use super::*;

    #[tokio::test]
    async fn a_broken_link_to_a_switch_fails_its_calls_as_failures_on_the_way() {
        let (switch, callee) = (NodeId::from_bytes([1; 16]), NodeId::from_bytes([2; 16]));
        let (link, _peer) = gearmesh_transport::Link::pair();
        let (other, _peer2) = gearmesh_transport::Link::pair();
        let (via, elsewhere) = (link.sender().id(), other.sender().id());
        let table = CallTable::default();
        let (_, through) = table.insert(callee, via, 10).expect("room");
        let (_, to_switch) = table.insert(switch, via, 10).expect("room");
        let (_, untouched) = table.insert(callee, elsewhere, 10).expect("room");
        table.fail_via(via, switch, "broke");
        let on_the_way = |r: Result<Result<Payload, RemoteError>, _>| match r {
            Ok(Err(f)) => (f.error.code(), f.on_the_way),
            other => panic!("not failed: {other:?}"),
        };
        assert_eq!(on_the_way(through.await), (ErrorCode::Unavailable, true), "the call went through the switch");
        assert_eq!(on_the_way(to_switch.await), (ErrorCode::Unavailable, false), "the call was to the switch itself");
        assert_eq!(lock(&table.pending).len(), 1, "the call on another link still waits");
        drop(untouched);
    }
}

#[cfg(test)]
mod early_cancel_tests {
    use super::*;

    #[test]
    fn an_early_cancel_is_taken_once_and_the_oldest_is_forgotten_at_the_bound() {
        let node = NodeId::from_bytes([1; 16]);
        let mut e = EarlyCancels::default();
        e.remember((node, 1));
        e.remember((node, 1));
        assert!(e.take(&(node, 1)));
        assert!(!e.take(&(node, 1)), "each call comes once");
        for id in 0..=EarlyCancels::CAP as u64 {
            e.remember((node, 100 + id));
        }
        assert!(!e.take(&(node, 100)), "the oldest was forgotten");
        assert!(e.take(&(node, 101)));
        assert!(e.set.len() <= EarlyCancels::CAP && e.order.len() <= EarlyCancels::CAP);
    }
}
