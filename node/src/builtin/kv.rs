//! `kv`: an in-memory key-value store with bounded size.
//!
//! Limits (see [`KvLimits`]): a `put` of a new key into a full store fails with `overloaded`;
//! an oversized key or value fails with `bad_request`. Nothing is evicted silently.

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
};

use gearmesh_gears::{CallError, Ctx, Gear, PortSpec};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Bounds of a `kv` store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvLimits {
    /// The most keys held.
    pub max_entries: usize,
    /// The longest key, in bytes.
    pub max_key_bytes: usize,
    /// The largest value, in bytes of JSON.
    pub max_value_bytes: usize,
}

impl Default for KvLimits {
    fn default() -> Self {
        Self { max_entries: 100_000, max_key_bytes: 1024, max_value_bytes: 64 * 1024 }
    }
}

#[derive(Debug, Clone, Deserialize)]
struct KeyReq {
    key: String,
}

#[derive(Debug, Clone, Deserialize)]
struct PutReq {
    key: String,
    value: Value,
}

#[derive(Debug, Clone, Serialize)]
struct Entry {
    key: String,
    value: Value,
}

#[derive(Debug, Default)]
struct Store {
    map: RwLock<HashMap<String, Value>>,
}

impl Store {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Value>> {
        self.map.read().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, Value>> {
        self.map.write().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The `kv` gear with default limits.
pub fn kv() -> Gear {
    kv_with(KvLimits::default())
}

/// The `kv` gear: `get {"key"}` → `{"key","value"}` (or `not_found`), `put {"key","value"}` →
/// `{"key","value"}`, `delete {"key"}` → `{"key","deleted": bool}`.
pub fn kv_with(limits: KvLimits) -> Gear {
    let store = Arc::new(Store::default());
    let (s_get, s_put, s_del) = (store.clone(), store.clone(), store);
    let check_key = move |key: &str| {
        if key.len() > limits.max_key_bytes {
            Err(CallError::bad_request(format!("key is longer than {} bytes", limits.max_key_bytes)))
        } else {
            Ok(())
        }
    };
    Gear::new("kv")
        .version(env!("CARGO_PKG_VERSION"))
        .describe("An in-memory key-value store")
        .port_with(PortSpec::new("get").describe("Reads {\"key\"}").idempotent(true), move |_ctx: Ctx, r: KeyReq| {
            let value = s_get.read().get(&r.key).cloned();
            async move {
                match value {
                    Some(value) => Ok(Entry { key: r.key, value }),
                    None => Err(CallError::not_found(format!("no key {:?}", r.key))),
                }
            }
        })
        .port_with(
            PortSpec::new("put").describe("Writes {\"key\",\"value\"}").idempotent(true),
            move |_ctx: Ctx, r: PutReq| {
                let result = (|| {
                    check_key(&r.key)?;
                    let size = serde_json::to_vec(&r.value).map(|v| v.len()).unwrap_or(usize::MAX);
                    if size > limits.max_value_bytes {
                        return Err(CallError::bad_request(format!(
                            "value is larger than {} bytes of JSON",
                            limits.max_value_bytes
                        )));
                    }
                    let mut map = s_put.write();
                    if map.len() >= limits.max_entries && !map.contains_key(&r.key) {
                        return Err(CallError::overloaded(format!("kv is full ({} keys)", limits.max_entries)));
                    }
                    map.insert(r.key.clone(), r.value.clone());
                    Ok(Entry { key: r.key, value: r.value })
                })();
                std::future::ready(result)
            },
        )
        .port_with(
            PortSpec::new("delete").describe("Deletes {\"key\"}").idempotent(true),
            move |_ctx: Ctx, r: KeyReq| {
                let deleted = s_del.write().remove(&r.key).is_some();
                std::future::ready(Ok(serde_json::json!({ "key": r.key, "deleted": deleted })))
            },
        )
}

#[cfg(test)]
mod tests {
    use gearmesh_gears::{Dispatch, ErrorCode, Principal, host::Host};

    use super::*;

    #[tokio::test]
    async fn put_get_delete_and_limits() {
        let host = Host::new(Default::default(), None);
        host.add_gear(kv_with(KvLimits { max_entries: 1, max_key_bytes: 4, max_value_bytes: 8 })).expect("hosted");
        let ctx = Ctx::new(host.clone() as std::sync::Arc<dyn Dispatch>, Principal::anonymous());
        let put = |k: &str, v: Value| serde_json::json!({"key": k, "value": v});
        let _: Value = ctx.call("kv", "put", &put("a", 1.into())).await.expect("put");
        let got: Value = ctx.call("kv", "get", &serde_json::json!({"key": "a"})).await.expect("get");
        assert_eq!(got["value"], 1);
        let e = ctx.call::<_, Value>("kv", "put", &put("b", 2.into())).await.expect_err("full");
        assert_eq!(e.code(), ErrorCode::Overloaded);
        let e = ctx.call::<_, Value>("kv", "put", &put("a", "0123456789".into())).await.expect_err("big");
        assert_eq!(e.code(), ErrorCode::BadRequest);
        let e = ctx.call::<_, Value>("kv", "put", &put("toolong", 1.into())).await.expect_err("key");
        assert_eq!(e.code(), ErrorCode::BadRequest);
        let d: Value = ctx.call("kv", "delete", &serde_json::json!({"key": "a"})).await.expect("delete");
        assert_eq!(d["deleted"], true);
        let e = ctx.call::<_, Value>("kv", "get", &serde_json::json!({"key": "a"})).await.expect_err("gone");
        assert_eq!(e.code(), ErrorCode::NotFound);
    }
}
