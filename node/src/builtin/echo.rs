//! `echo`: a gear for trying things out and for tests.

use std::time::Duration;

use gearmesh_gears::{CallError, Ctx, ErrorCode, Gear, PortSpec};
use serde::Deserialize;
use serde_json::{Value, json};

#[derive(Debug, Clone, Deserialize)]
struct Sleep {
    ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
struct Fail {
    code: String,
    #[serde(default)]
    message: Option<String>,
}

/// `echo.echo` returns its input; `echo.sleep {"ms"}` waits that long (cancelled by the deadline);
/// `echo.fail {"code","message"?}` fails with that error code (`panic` panics, to show isolation;
/// any other unknown code becomes an `app` error with that code).
pub fn echo() -> Gear {
    Gear::new("echo")
        .version(env!("CARGO_PKG_VERSION"))
        .describe("Returns, delays or fails on request: for trying things out")
        .port_with(
            PortSpec::new("echo").describe("Returns its input unchanged").idempotent(true),
            |_ctx: Ctx, v: Value| async move { Ok(v) },
        )
        .port_with(
            PortSpec::new("sleep").describe("Sleeps {\"ms\"} milliseconds, then returns {\"slept_ms\"}").input_schema(
                json!({"type":"object","required":["ms"],"properties":{"ms":{"type":"integer","minimum":0}}}),
            ),
            |_ctx: Ctx, s: Sleep| async move {
                tokio::time::sleep(Duration::from_millis(s.ms)).await;
                Ok(json!({ "slept_ms": s.ms }))
            },
        )
        .port_with(
            PortSpec::new("fail").describe("Fails with {\"code\"}: an error code, \"panic\", or an app code"),
            |_ctx: Ctx, f: Fail| async move {
                let message = f.message.unwrap_or_else(|| format!("failed on request with {}", f.code));
                if f.code == "panic" {
                    panic!("echo.fail asked to panic");
                }
                Err::<Value, _>(match ErrorCode::parse(&f.code) {
                    Some(ErrorCode::App) | None => CallError::app(f.code, message),
                    Some(code) => CallError::new(code, message),
                })
            },
        )
}
