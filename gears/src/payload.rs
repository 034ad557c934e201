//! Values that cross a port: typed Rust in-process, JSON or raw bytes everywhere else.
//!
//! The rule that makes local calls cost about a function call: a typed value stays typed for as
//! long as both sides agree on its Rust type (checked by `TypeId`), and is converted through JSON
//! only when they do not (a `String` sent to a port that takes a struct, or a value that crossed a
//! socket). Raw bytes (`bytes::Bytes`) pass through untouched; `serde_json::Value` works like any
//! other serde type.
//!
//! - [`Arg`]: what a caller lends to a port (borrowed: the port gets its own copy, the only one made).
//! - [`Payload`]: what a port returns (owned; moved to the caller without copying when typed).
//! - [`Event`]: what `notify` hands to every listener (shared behind an `Arc`).

use std::{any::Any, fmt, sync::Arc};

use bytes::Bytes;
use serde::{Serialize, de::DeserializeOwned};

use crate::CallError;

/// A serializable value whose concrete type is known only at run time.
pub(crate) trait ErasedValue: Any + Send + Sync {
    fn as_any(&self) -> &dyn Any;
    fn into_any(self: Box<Self>) -> Box<dyn Any + Send>;
    fn to_json(&self) -> Result<Vec<u8>, serde_json::Error>;
    fn type_name(&self) -> &'static str;
}

impl<T: Serialize + Send + Sync + 'static> ErasedValue for T {
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn into_any(self: Box<Self>) -> Box<dyn Any + Send> {
        self
    }
    fn to_json(&self) -> Result<Vec<u8>, serde_json::Error> {
        serde_json::to_vec(self)
    }
    fn type_name(&self) -> &'static str {
        std::any::type_name::<T>()
    }
}

/// Moves `v` out as a `U` if `T` and `U` are the same type, else gives it back.
fn cast_owned<T: 'static, U: 'static>(v: T) -> Result<U, T> {
    let mut slot = Some(v);
    if let Some(u) = (&mut slot as &mut dyn Any).downcast_mut::<Option<U>>().and_then(Option::take) {
        return Ok(u);
    }
    // Not the same type, so `slot` was not touched.
    match slot {
        Some(v) => Err(v),
        None => unreachable!("slot is only emptied when the types agree"),
    }
}

/// Decodes JSON text into `T`, or hands raw bytes over when `T` is `Bytes`.
fn from_json<T: DeserializeOwned + 'static>(json: Bytes) -> Result<T, serde_json::Error> {
    match cast_owned::<Bytes, T>(json) {
        Ok(t) => Ok(t),
        Err(json) => serde_json::from_slice(&json),
    }
}

fn conversion_error(what: &str, to: &'static str, e: &serde_json::Error) -> String {
    format!("cannot convert {what} into {to}: {e}")
}

// === impl Arg ===

/// The input of one call, lent by the caller for the time it takes to start the port.
///
/// Cloning is cheap (a reference or a reference-counted buffer): strategies that try several
/// replicas lend the same input to each.
#[derive(Clone)]
pub struct Arg<'a> {
    repr: ArgRepr<'a>,
}

#[derive(Clone)]
enum ArgRepr<'a> {
    Typed(&'a dyn ErasedValue),
    Json(Bytes),
    Bytes(Bytes),
}

impl<'a> Arg<'a> {
    /// Lends a typed value. A `Bytes` value becomes a raw-bytes argument.
    pub fn typed<T: Serialize + Send + Sync + 'static>(v: &'a T) -> Self {
        if let Some(b) = (v as &dyn Any).downcast_ref::<Bytes>() {
            return Self { repr: ArgRepr::Bytes(b.clone()) };
        }
        Self { repr: ArgRepr::Typed(v) }
    }

    /// An argument given as JSON text (e.g. an HTTP body or a frame). It is not parsed here.
    pub fn json(json: Bytes) -> Arg<'static> {
        Arg { repr: ArgRepr::Json(json) }
    }

    /// An argument given as raw bytes.
    pub fn bytes(bytes: Bytes) -> Arg<'static> {
        Arg { repr: ArgRepr::Bytes(bytes) }
    }

    /// Converts into the port's input type: a clone when the types agree, otherwise through JSON.
    ///
    /// # Errors
    /// `bad_request` when the value does not decode into `T`.
    pub fn take<T: DeserializeOwned + Clone + Send + 'static>(self) -> Result<T, CallError> {
        match self.repr {
            ArgRepr::Typed(v) => {
                if let Some(t) = v.as_any().downcast_ref::<T>() {
                    return Ok(t.clone());
                }
                let json = v.to_json().map_err(|e| {
                    CallError::bad_request(conversion_error(v.type_name(), std::any::type_name::<T>(), &e))
                })?;
                from_json(Bytes::from(json)).map_err(|e| {
                    CallError::bad_request(conversion_error(v.type_name(), std::any::type_name::<T>(), &e))
                })
            }
            ArgRepr::Json(json) => from_json(json).map_err(|e| CallError::bad_request(format!("invalid request: {e}"))),
            ArgRepr::Bytes(b) => match cast_owned::<Bytes, T>(b) {
                Ok(t) => Ok(t),
                Err(b) => serde_json::from_slice(&b)
                    .map_err(|e| CallError::bad_request(format!("port takes JSON; raw bytes did not decode: {e}"))),
            },
        }
    }

    /// The argument as wire bytes: `(true, json)` or `(false, raw bytes)`, for sending elsewhere.
    ///
    /// # Errors
    /// `bad_request` when a typed value fails to serialize.
    pub fn to_wire(&self) -> Result<WireBody, CallError> {
        match &self.repr {
            ArgRepr::Typed(v) => v
                .to_json()
                .map(|j| WireBody::Json(Bytes::from(j)))
                .map_err(|e| CallError::bad_request(format!("request does not serialize: {e}"))),
            ArgRepr::Json(j) => Ok(WireBody::Json(j.clone())),
            ArgRepr::Bytes(b) => Ok(WireBody::Bytes(b.clone())),
        }
    }
}

impl fmt::Debug for Arg<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.repr {
            ArgRepr::Typed(v) => write!(f, "Arg::Typed({})", v.type_name()),
            ArgRepr::Json(j) => write!(f, "Arg::Json({} bytes)", j.len()),
            ArgRepr::Bytes(b) => write!(f, "Arg::Bytes({} bytes)", b.len()),
        }
    }
}

/// A value in wire form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WireBody {
    /// JSON text.
    Json(Bytes),
    /// Raw bytes.
    Bytes(Bytes),
}

// === impl Payload ===

/// The output of a port, owned and moved to the caller.
pub struct Payload {
    repr: PayloadRepr,
}

enum PayloadRepr {
    Typed(Box<dyn ErasedValue>),
    Json(Bytes),
    Bytes(Bytes),
}

impl Payload {
    /// Wraps a typed value. A `Bytes` value becomes a raw-bytes payload.
    pub fn typed<T: Serialize + Send + Sync + 'static>(v: T) -> Self {
        match cast_owned::<T, Bytes>(v) {
            Ok(b) => Self::bytes(b),
            Err(v) => Self { repr: PayloadRepr::Typed(Box::new(v)) },
        }
    }

    /// A payload of JSON text (not checked here).
    pub fn json(json: Bytes) -> Self {
        Self { repr: PayloadRepr::Json(json) }
    }

    /// A payload of raw bytes.
    pub fn bytes(bytes: Bytes) -> Self {
        Self { repr: PayloadRepr::Bytes(bytes) }
    }

    /// Converts into the caller's type: a move when the types agree, otherwise through JSON.
    ///
    /// # Errors
    /// `internal` when the reply does not decode into `T` (the two sides disagree on the port's
    /// contract, which is a bug, not a bad request).
    pub fn take<T: DeserializeOwned + Send + 'static>(self) -> Result<T, CallError> {
        let to = std::any::type_name::<T>();
        match self.repr {
            PayloadRepr::Typed(v) => {
                if v.as_any().is::<T>() {
                    // The same type: a move out of the box, nothing converted.
                    return match v.into_any().downcast::<T>() {
                        Ok(b) => Ok(*b),
                        Err(_) => Err(CallError::internal("typed reply changed type")),
                    };
                }
                let name = v.type_name();
                let json = v.to_json().map_err(|e| CallError::internal(conversion_error(name, to, &e)))?;
                from_json(Bytes::from(json)).map_err(|e| CallError::internal(conversion_error(name, to, &e)))
            }
            PayloadRepr::Json(j) => {
                from_json(j).map_err(|e| CallError::internal(conversion_error("the JSON reply", to, &e)))
            }
            PayloadRepr::Bytes(b) => match cast_owned::<Bytes, T>(b) {
                Ok(t) => Ok(t),
                Err(b) => serde_json::from_slice(&b)
                    .map_err(|e| CallError::internal(conversion_error("a raw-bytes reply", to, &e))),
            },
        }
    }

    /// The payload in wire form, serializing a typed value.
    ///
    /// # Errors
    /// `internal` when a typed value fails to serialize.
    pub fn into_wire(self) -> Result<WireBody, CallError> {
        match self.repr {
            PayloadRepr::Typed(v) => v
                .to_json()
                .map(|j| WireBody::Json(Bytes::from(j)))
                .map_err(|e| CallError::internal(format!("reply does not serialize: {e}"))),
            PayloadRepr::Json(j) => Ok(WireBody::Json(j)),
            PayloadRepr::Bytes(b) => Ok(WireBody::Bytes(b)),
        }
    }
}

impl fmt::Debug for Payload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.repr {
            PayloadRepr::Typed(v) => write!(f, "Payload::Typed({})", v.type_name()),
            PayloadRepr::Json(j) => write!(f, "Payload::Json({} bytes)", j.len()),
            PayloadRepr::Bytes(b) => write!(f, "Payload::Bytes({} bytes)", b.len()),
        }
    }
}

// === impl Event ===

/// An event published to a topic, shared by every listener that receives it.
#[derive(Clone)]
pub struct Event {
    repr: EventRepr,
}

#[derive(Clone)]
enum EventRepr {
    Typed(Arc<dyn ErasedValue>),
    Json(Bytes),
    Bytes(Bytes),
}

impl Event {
    /// Wraps a typed value. A `Bytes` value becomes a raw-bytes event.
    pub fn typed<T: Serialize + Send + Sync + 'static>(v: T) -> Self {
        match cast_owned::<T, Bytes>(v) {
            Ok(b) => Self::bytes(b),
            Err(v) => Self { repr: EventRepr::Typed(Arc::new(v)) },
        }
    }

    /// An event of JSON text (not checked here).
    pub fn json(json: Bytes) -> Self {
        Self { repr: EventRepr::Json(json) }
    }

    /// An event of raw bytes.
    pub fn bytes(bytes: Bytes) -> Self {
        Self { repr: EventRepr::Bytes(bytes) }
    }

    /// Lends the event as a port-style argument (for conversion into a listener's type).
    pub fn as_arg(&self) -> Arg<'_> {
        match &self.repr {
            EventRepr::Typed(v) => Arg { repr: ArgRepr::Typed(&**v) },
            EventRepr::Json(j) => Arg::json(j.clone()),
            EventRepr::Bytes(b) => Arg::bytes(b.clone()),
        }
    }
}

impl fmt::Debug for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Event({:?})", self.as_arg())
    }
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    use super::*;

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct Point {
        x: i32,
        y: i32,
    }

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct OtherPoint {
        x: i64,
        y: i64,
    }

    #[test]
    fn same_type_arg_is_cloned_not_serialized() {
        let p = Point { x: 1, y: 2 };
        let arg = Arg::typed(&p);
        assert!(format!("{arg:?}").contains("Typed"));
        assert_eq!(arg.take::<Point>().expect("same type"), p);
    }

    #[test]
    fn different_type_arg_goes_through_json() {
        let p = Point { x: 3, y: 4 };
        let q: OtherPoint = Arg::typed(&p).take().expect("compatible shape");
        assert_eq!(q, OtherPoint { x: 3, y: 4 });
        let v: serde_json::Value = Arg::typed(&p).take().expect("to value");
        assert_eq!(v, serde_json::json!({"x": 3, "y": 4}));
        let e = Arg::typed(&"text").take::<Point>().expect_err("incompatible");
        assert_eq!(e.code(), crate::ErrorCode::BadRequest);
    }

    #[test]
    fn json_and_bytes_args() {
        let p: Point = Arg::json(Bytes::from_static(br#"{"x":5,"y":6}"#)).take().expect("json");
        assert_eq!(p, Point { x: 5, y: 6 });
        let raw: Bytes = Arg::json(Bytes::from_static(b"[1]")).take().expect("json as bytes");
        assert_eq!(&raw[..], b"[1]");
        let b: Bytes = Arg::bytes(Bytes::from_static(b"\x00\xff")).take().expect("bytes");
        assert_eq!(&b[..], b"\x00\xff");
        let e = Arg::bytes(Bytes::from_static(b"\x00\xff")).take::<Point>().expect_err("not json");
        assert_eq!(e.code(), crate::ErrorCode::BadRequest);
        let e = Arg::json(Bytes::from_static(b"{")).take::<Point>().expect_err("malformed");
        assert_eq!(e.code(), crate::ErrorCode::BadRequest);
    }

    #[test]
    fn typed_bytes_stay_raw() {
        let b = Bytes::from_static(b"raw");
        assert!(matches!(Arg::typed(&b).to_wire(), Ok(WireBody::Bytes(x)) if x == b));
        assert!(matches!(Payload::typed(b.clone()).into_wire(), Ok(WireBody::Bytes(x)) if x == b));
    }

    #[test]
    fn payload_moves_when_types_agree_and_converts_otherwise() {
        let p = Payload::typed(Point { x: 7, y: 8 });
        assert_eq!(p.take::<Point>().expect("same"), Point { x: 7, y: 8 });
        let o: OtherPoint = Payload::typed(Point { x: 1, y: 1 }).take().expect("convert");
        assert_eq!(o.x, 1);
        let w = Payload::typed(Point { x: 1, y: 2 }).into_wire().expect("wire");
        assert_eq!(w, WireBody::Json(Bytes::from_static(br#"{"x":1,"y":2}"#)));
        let e = Payload::json(Bytes::from_static(b"\"s\"")).take::<Point>().expect_err("mismatch");
        assert_eq!(e.code(), crate::ErrorCode::Internal);
    }

    #[test]
    fn events_are_shared_and_convertible() {
        let ev = Event::typed(Point { x: 1, y: 2 });
        let a: Point = ev.as_arg().take().expect("typed");
        let b: serde_json::Value = ev.clone().as_arg().take().expect("json");
        assert_eq!(a, Point { x: 1, y: 2 });
        assert_eq!(b["y"], 2);
    }
}
