//! Gears served by WebSocket clients ("external gears", in any language).
//!
//! A client registers a gear; the node hosts a stand-in whose ports forward each call to the
//! client as a `call` message and wait for its `reply`. The mesh advertises the stand-in like any
//! other gear, so calls reach it from every node, with the same deadlines and errors. When the
//! caller gives up (deadline, cancellation) the client gets a `cancel`. When the connection ends,
//! the gears are withdrawn at once and calls in flight fail with `unavailable`.
//!
//! Bounds: `interface.max_served_calls` calls in flight per connection (one more is refused
//! `overloaded`), and a `call` message that does not fit the connection's outgoing queue is
//! refused `overloaded` too (the client is not reading).

use std::{
    collections::HashMap,
    num::NonZeroUsize,
    sync::{
        Arc, Mutex, Weak,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use gearmesh_gears::{Arg, BoxFuture, CallError, Ctx, Gear, Payload, PortSpec, WireBody, host::Host};
use gearmesh_mesh::Mesh;
use serde::Serialize;
use serde_json::value::RawValue;
use tokio::sync::{mpsc, oneshot};

use super::proto::{PortDecl, VERSION};

type Waiter = oneshot::Sender<Result<Payload, CallError>>;

/// Gears one connection may serve at once; one more is refused `overloaded`.
pub(crate) const MAX_GEARS: usize = 64;

/// The gears one connection serves and the calls waiting for its replies.
pub(crate) struct Served {
    me: Weak<Served>,
    out: mpsc::Sender<String>,
    host: Arc<Host>,
    mesh: Mesh,
    max_calls: usize,
    next: AtomicU64,
    pending: Mutex<HashMap<u64, Waiter>>,
    gears: Mutex<Vec<String>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Each critical section is one map or vector operation: a poisoned lock is still consistent.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[derive(Serialize)]
struct CallOut<'a> {
    v: u64,
    #[serde(rename = "type")]
    kind: &'static str,
    call: u64,
    gear: &'a str,
    port: &'a str,
    arg: &'a RawValue,
    #[serde(skip_serializing_if = "Option::is_none")]
    timeout_ms: Option<u64>,
    caller: String,
    trace_id: String,
}

impl Served {
    pub(crate) fn new(out: mpsc::Sender<String>, host: Arc<Host>, mesh: Mesh, max_calls: usize) -> Arc<Self> {
        Arc::new_cyclic(|me| Self {
            me: me.clone(),
            out,
            host,
            mesh,
            max_calls,
            next: AtomicU64::new(1),
            pending: Mutex::default(),
            gears: Mutex::default(),
        })
    }

    /// Hosts a stand-in for the client's gear and advertises it.
    pub(crate) fn register(
        &self,
        gear: &str,
        version: &str,
        description: Option<&str>,
        ports: &[PortDecl],
    ) -> Result<(), CallError> {
        if ports.is_empty() {
            return Err(CallError::bad_request("a gear needs at least one port"));
        }
        if lock(&self.gears).len() >= MAX_GEARS {
            return Err(CallError::overloaded(format!("a connection serves {MAX_GEARS} gears at most")));
        }
        let mut g = Gear::new(gear).version(version);
        if let Some(d) = description {
            g = g.describe(d);
        }
        for p in ports {
            let mut spec = PortSpec::new(&p.name).idempotent(p.idempotent);
            if let Some(d) = &p.description {
                spec = spec.describe(d);
            }
            if let Some(ms) = p.timeout_ms {
                spec = spec.timeout(Duration::from_millis(ms));
            }
            if let Some(n) = p.max_concurrency {
                let n = NonZeroUsize::new(n).ok_or_else(|| CallError::bad_request("max_concurrency must be > 0"))?;
                spec = spec.max_concurrency(n);
            }
            let me = self.me.clone();
            let (gear, port) = (gear.to_owned(), p.name.clone());
            g = g.port_raw(spec, move |ctx: Ctx, arg: Arg<'_>| match me.upgrade() {
                Some(served) => served.forward(&ctx, &gear, &port, &arg),
                None => Err(CallError::unavailable(format!("the client serving {gear:?} disconnected"))),
            });
        }
        self.host.add_gear(g).map_err(|e| CallError::bad_request(e.to_string()))?;
        lock(&self.gears).push(gear.to_owned());
        self.mesh.refresh_local();
        tracing::info!(gear, version, "external gear registered");
        Ok(())
    }

    /// Withdraws one of this connection's gears (calls in flight to it still get their replies).
    pub(crate) fn unregister(&self, gear: &str) -> Result<(), CallError> {
        let mut gears = lock(&self.gears);
        let Some(i) = gears.iter().position(|g| g == gear) else {
            return Err(CallError::not_found(format!("this connection does not serve {gear:?}")));
        };
        gears.swap_remove(i);
        drop(gears);
        self.host.remove_gear(gear);
        self.mesh.refresh_local();
        tracing::info!(gear, "external gear unregistered");
        Ok(())
    }

    /// Delivers the client's reply to call `id`.
    pub(crate) fn reply(&self, id: u64, result: Result<Payload, CallError>) -> Result<(), CallError> {
        match lock(&self.pending).remove(&id) {
            // The caller may have given up in the meantime: then nobody waits, which is fine.
            Some(waiter) => {
                let _caller_gone = waiter.send(result);
                Ok(())
            }
            None => Err(CallError::bad_request(format!(
                "no call {id} is waiting for a reply on this connection (already answered, cancelled or timed out)"
            ))),
        }
    }

    /// The connection ended: withdraws every gear and fails the calls in flight.
    pub(crate) fn close(&self) {
        let gears = std::mem::take(&mut *lock(&self.gears));
        for g in &gears {
            self.host.remove_gear(g);
        }
        if !gears.is_empty() {
            self.mesh.refresh_local();
            tracing::info!(gears = ?gears, "external gears withdrawn: their connection ended");
        }
        let pending = std::mem::take(&mut *lock(&self.pending));
        for (_, waiter) in pending {
            let _caller_gone = waiter.send(Err(CallError::unavailable("the client serving this gear disconnected")));
        }
    }

    fn forward(
        &self,
        ctx: &Ctx,
        gear: &str,
        port: &str,
        arg: &Arg<'_>,
    ) -> Result<BoxFuture<'static, Result<Payload, CallError>>, CallError> {
        let json = match arg.to_wire()? {
            WireBody::Json(b) => b,
            WireBody::Bytes(_) => {
                return Err(CallError::bad_request("external gears take JSON; this call carries raw bytes"));
            }
        };
        let text = std::str::from_utf8(&json).map_err(|e| CallError::bad_request(format!("argument: {e}")))?;
        let raw: &RawValue =
            serde_json::from_str(text).map_err(|e| CallError::bad_request(format!("argument is not JSON: {e}")))?;
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut pending = lock(&self.pending);
            if pending.len() >= self.max_calls {
                return Err(CallError::overloaded(format!("{gear}: too many calls in flight to its client")));
            }
            pending.insert(id, tx);
        }
        let msg = CallOut {
            v: VERSION,
            kind: "call",
            call: id,
            gear,
            port,
            arg: raw,
            timeout_ms: ctx.remaining().map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            caller: ctx.caller().to_string(),
            trace_id: ctx.trace_id().to_string(),
        };
        let sent = serde_json::to_string(&msg).map_err(|e| CallError::internal(e.to_string())).and_then(|t| {
            self.out.try_send(t).map_err(|_| CallError::overloaded(format!("{gear}: its client is not keeping up")))
        });
        if let Err(e) = sent {
            lock(&self.pending).remove(&id);
            return Err(e);
        }
        let guard = CancelOnDrop { served: self.me.clone(), id, armed: true };
        Ok(Box::pin(async move {
            // Moved in whole (not just the field), so that dropping this future cancels the call.
            let mut guard = guard;
            let result = rx.await;
            guard.armed = false;
            result.unwrap_or_else(|_| Err(CallError::unavailable("the client serving this gear disconnected")))
        }))
    }
}

/// Tells the client to stop working on a call whose caller gave up.
struct CancelOnDrop {
    served: Weak<Served>,
    id: u64,
    armed: bool,
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let Some(served) = self.served.upgrade() else { return };
        if lock(&served.pending).remove(&self.id).is_some() {
            let msg = serde_json::json!({ "v": VERSION, "type": "cancel", "call": self.id });
            // Best effort: a client that is not reading will see the call time out instead.
            let _full = served.out.try_send(msg.to_string());
        }
    }
}

/// A client's `ok` value as a call result.
pub(crate) fn payload_of(ok: &serde_json::Value) -> Result<Payload, CallError> {
    serde_json::to_vec(ok).map(|v| Payload::json(Bytes::from(v))).map_err(|e| CallError::internal(e.to_string()))
}
