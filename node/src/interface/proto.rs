//! The interface's messages: what clients send (parsed here, with a clear error for anything
//! else) and helpers to build what the node sends. `docs/interface.md` and
//! `docs/interface.schema.json` are the specification; keep them in step with this file.

use gearmesh_gears::CallError;
use serde::Deserialize;
use serde_json::{Value, json};

/// The protocol version this node speaks.
pub(crate) const VERSION: u64 = 1;

/// Topics under this prefix are the mesh's own (traces, stats): clients cannot publish to them
/// or subscribe to them by name.
pub(crate) const SYSTEM_TOPIC_PREFIX: &str = "gearmesh.";

/// What a client may send.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub(crate) enum ClientMsg {
    /// Authenticates (only as the first message, when the upgrade request carried no token).
    Auth {
        #[serde(default)]
        v: Option<u64>,
        /// Read by `gearmesh_auth::token_from_auth_message` before the connection starts; here
        /// an `auth` after that is only recognized (and refused as repeated).
        #[serde(rename = "token")]
        _token: String,
    },
    /// Starts (or replaces) the client's subscription; answered with a snapshot.
    Subscribe {
        #[serde(default)]
        v: Option<u64>,
        #[serde(default)]
        id: Option<Value>,
        /// Mesh changes: nodes, links, gears, routes (default true).
        #[serde(default = "yes")]
        mesh: bool,
        /// Sampled call traces from every node.
        #[serde(default)]
        traces: bool,
        /// Periodic stats from every node.
        #[serde(default)]
        stats: bool,
        /// Pipeline runs starting and ending on every node.
        #[serde(default)]
        pipelines: bool,
        /// Event topics.
        #[serde(default)]
        topics: Vec<String>,
    },
    /// Stops the subscription.
    Unsubscribe {
        #[serde(default)]
        v: Option<u64>,
        #[serde(default)]
        id: Option<Value>,
    },
    /// Calls a port.
    Call {
        #[serde(default)]
        v: Option<u64>,
        id: Value,
        gear: String,
        port: String,
        #[serde(default)]
        arg: Value,
        #[serde(default)]
        timeout_ms: Option<u64>,
        /// As the HTTP API's query: `local-first`, `spread`, `shard`, `scatter`, `broadcast`.
        #[serde(default)]
        strategy: Option<String>,
        /// The shard key.
        #[serde(default)]
        key: Option<String>,
        /// `all`, `quorum` or K, for `scatter`.
        #[serde(default)]
        gather: Option<String>,
        /// `auto`, `yes` or `no`.
        #[serde(default)]
        retry: Option<String>,
        /// A bound on each attempt, in milliseconds.
        #[serde(default)]
        per_try_timeout_ms: Option<u64>,
        /// Hedge after this many milliseconds.
        #[serde(default)]
        hedge_ms: Option<u64>,
    },
    /// Publishes an event.
    Publish {
        #[serde(default)]
        v: Option<u64>,
        #[serde(default)]
        id: Option<Value>,
        topic: String,
        #[serde(default)]
        event: Value,
    },
    /// Asks for this node's status.
    Status {
        #[serde(default)]
        v: Option<u64>,
        #[serde(default)]
        id: Option<Value>,
    },
    /// Serves a gear over this connection.
    Register {
        #[serde(default)]
        v: Option<u64>,
        #[serde(default)]
        id: Option<Value>,
        gear: String,
        #[serde(default = "default_version")]
        version: String,
        #[serde(default)]
        description: Option<String>,
        ports: Vec<PortDecl>,
    },
    /// Stops serving a gear.
    Unregister {
        #[serde(default)]
        v: Option<u64>,
        #[serde(default)]
        id: Option<Value>,
        gear: String,
    },
    /// Answers a call the node sent to one of the client's gears.
    Reply {
        #[serde(default)]
        v: Option<u64>,
        /// Ignored (replies are matched by `call`); allowed for clients that number everything.
        #[serde(default)]
        #[allow(dead_code)]
        id: Option<Value>,
        call: u64,
        #[serde(default)]
        ok: Option<Value>,
        #[serde(default)]
        error: Option<CallError>,
    },
}

fn yes() -> bool {
    true
}

fn default_version() -> String {
    "0.1.0".to_owned()
}

/// A port of an external gear.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PortDecl {
    pub(crate) name: String,
    #[serde(default)]
    pub(crate) description: Option<String>,
    #[serde(default)]
    pub(crate) timeout_ms: Option<u64>,
    #[serde(default)]
    pub(crate) max_concurrency: Option<usize>,
    #[serde(default)]
    pub(crate) idempotent: bool,
}

impl ClientMsg {
    fn version(&self) -> Option<u64> {
        match self {
            ClientMsg::Auth { v, .. }
            | ClientMsg::Subscribe { v, .. }
            | ClientMsg::Unsubscribe { v, .. }
            | ClientMsg::Call { v, .. }
            | ClientMsg::Publish { v, .. }
            | ClientMsg::Status { v, .. }
            | ClientMsg::Register { v, .. }
            | ClientMsg::Unregister { v, .. }
            | ClientMsg::Reply { v, .. } => *v,
        }
    }
}

/// Parses one text message. On failure: the `id` the client gave (if any could be read) and a
/// `bad_request` naming what is wrong.
pub(crate) fn parse(text: &str) -> Result<ClientMsg, (Option<Value>, CallError)> {
    let value: Value =
        serde_json::from_str(text).map_err(|e| (None, CallError::bad_request(format!("invalid JSON: {e}"))))?;
    let id = value.get("id").cloned();
    if !value.is_object() {
        return Err((id, CallError::bad_request("a message is a JSON object with a \"type\"")));
    }
    let kind = value.get("type").and_then(Value::as_str).map(str::to_owned);
    let msg: ClientMsg = serde_json::from_value(value).map_err(|e| {
        let what = match kind {
            Some(k) => format!("invalid {k:?} message: {e}"),
            None => format!("invalid message: {e}"),
        };
        (id.clone(), CallError::bad_request(what))
    })?;
    match msg.version() {
        Some(VERSION) => Ok(msg),
        Some(other) => Err((id, CallError::bad_request(format!("unsupported version {other}; this node speaks v1")))),
        None => Err((id, CallError::bad_request("every message carries \"v\": 1"))),
    }
}

/// `{"v":1,"type":"error","id":..,"error":{..}}`.
pub(crate) fn error(id: Option<&Value>, e: &CallError) -> Value {
    json!({ "v": VERSION, "type": "error", "id": id, "error": e })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_messages_and_names_what_is_wrong() {
        let m = parse(r#"{"v":1,"type":"call","id":7,"gear":"echo","port":"echo","arg":{"a":1}}"#).expect("valid");
        assert!(matches!(m, ClientMsg::Call { ref gear, .. } if gear == "echo"));
        let m = parse(r#"{"v":1,"type":"subscribe","topics":["t"]}"#).expect("valid");
        assert!(matches!(m, ClientMsg::Subscribe { mesh: true, traces: false, .. }));

        let (id, e) = parse("{nope").expect_err("not JSON");
        assert!(id.is_none() && e.message().contains("invalid JSON"), "{e}");
        let (id, e) = parse(r#"{"v":1,"type":"teleport","id":"x"}"#).expect_err("unknown type");
        assert_eq!(id, Some(json!("x")));
        assert!(e.message().contains("teleport"), "{e}");
        let (_, e) = parse(r#"{"v":2,"type":"status"}"#).expect_err("version");
        assert!(e.message().contains("version 2"), "{e}");
        let (_, e) = parse(r#"{"type":"status"}"#).expect_err("no version");
        assert!(e.message().contains("\"v\""), "{e}");
        let (_, e) = parse(r#"[1,2]"#).expect_err("not an object");
        assert!(e.message().contains("object"), "{e}");
        let (_, e) = parse(r#"{"v":1,"type":"call","id":1,"gear":"g"}"#).expect_err("missing port");
        assert!(e.message().contains("port"), "{e}");
    }
}
