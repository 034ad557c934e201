//! The gearmesh gear SDK.
//!
//! A **gear** is a named service with named **ports** (async functions) and event **listeners**.
//! A gear author writes plain async Rust; whether a call lands on a gear in the same process or on
//! another node of the mesh is decided by whatever [`Dispatch`] backs the [`Ctx`] — the gear's
//! code never knows.
//!
//! ```
//! use gearmesh_gears::{Ctx, Gear, CallError};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Clone, Serialize, Deserialize)]
//! struct Charge { user_id: String, cents: u64 }
//! #[derive(Serialize, Deserialize)]
//! struct Receipt { id: String }
//!
//! let billing = Gear::new("billing")
//!     .version("1.2.0")
//!     .port("charge", |ctx: Ctx, req: Charge| async move {
//!         let user: serde_json::Value = ctx.call("users", "find", &req.user_id).await?;
//!         ctx.notify("billing.charged", &req).await?;
//!         Ok(Receipt { id: format!("r-{}", user["id"]) })
//!     })
//!     .listen("orders.cancelled", |_ctx: Ctx, _ev: serde_json::Value| async move { Ok(()) });
//! # let _ = billing;
//! ```
//!
//! What this crate holds, and what it does not:
//! - [`Gear`], [`PortSpec`] and the metadata types: what a gear declares.
//! - [`Ctx`], [`CallOptions`] and the [`Dispatch`] trait: how a gear reaches other gears.
//! - [`Arg`], [`Payload`], [`Event`]: values crossing a port, typed in-process and JSON or bytes
//!   elsewhere, converted only when the two sides disagree on the type.
//! - [`CallError`]: the one error of every call, with a stable [`ErrorCode`].
//! - [`host::Host`]: the in-process gear host (lookup, deadlines, concurrency limits, panic
//!   isolation, bounded event queues). It has no networking; the node and the mesh wrap it.

mod ctx;
mod error;
mod gear;
pub mod host;
mod names;
mod panic;
mod payload;
mod strategy;

pub use ctx::{Call, CallMeta, CallOptions, Ctx, Dispatch, Publish};
pub use error::{CallError, ErrorCode};
pub use gear::{Gear, GearError, GearMeta, ListenerMeta, PortMeta, PortOptions, PortSpec};
pub use names::{GearName, InvalidName, MAX_NAME_LEN, PortName, Principal, PrincipalKind, Topic, TraceId};
pub use panic::install_panic_hook;
pub use payload::{Arg, Event, Payload, WireBody};
pub use strategy::{Gather, Gathered, Reply, Retry, ShardKey, Strategy};

/// A boxed, sendable future, as returned by type-erased ports and [`Dispatch`].
pub type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;
