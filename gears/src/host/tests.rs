//! Unit tests of the in-process host: dispatch, deadlines, limits, panics, events.

use std::{sync::Arc, time::Duration};

use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, mpsc};

use super::*;
use crate::{Arg, CallOptions, ErrorCode, PortSpec};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Add {
    a: i64,
    b: i64,
}

fn root(host: &Arc<Host>) -> Ctx {
    Ctx::new(host.clone() as Arc<dyn Dispatch>, Principal::user("tester", vec![]))
}

fn math() -> Gear {
    Gear::new("math").version("1.0.0").port("add", |_ctx: Ctx, req: Add| async move { Ok(req.a + req.b) }).port(
        "whoami",
        |ctx: Ctx, _: serde_json::Value| async move {
            Ok(serde_json::json!({
                "caller": ctx.caller().to_string(),
                "trace": ctx.trace_id().to_string(),
                "remaining_ms": ctx.remaining().map(|d| d.as_millis() as u64),
            }))
        },
    )
}

#[tokio::test]
async fn typed_local_call_returns_the_ports_result() {
    let host = Host::new(HostConfig::default(), None);
    host.add_gear(math()).expect("hosted");
    let sum: i64 = root(&host).call("math", "add", &Add { a: 2, b: 3 }).await.expect("call");
    assert_eq!(sum, 5);
    // A JSON caller reaches the same port.
    let p = host
        .call(Call {
            gear: "math",
            port: "add",
            arg: Arg::json(bytes::Bytes::from_static(br#"{"a":1,"b":1}"#)),
            meta: CallMeta::new(Principal::anonymous(), None),
        })
        .await
        .expect("json call");
    assert_eq!(p.into_wire().expect("wire"), crate::WireBody::Json(bytes::Bytes::from_static(b"2")));
}

#[tokio::test]
async fn gear_to_gear_call_carries_the_gear_identity_and_the_trace() {
    let host = Host::new(HostConfig::default(), None);
    host.add_gear(math()).expect("hosted");
    host.add_gear(Gear::new("front").port("ask", |ctx: Ctx, _: ()| async move {
        let inner: serde_json::Value = ctx.call("math", "whoami", &()).await?;
        Ok(serde_json::json!({"inner": inner, "my_trace": ctx.trace_id().to_string()}))
    }))
    .expect("hosted");
    let out: serde_json::Value = root(&host)
        .call_with("front", "ask", &(), CallOptions::default().timeout(Duration::from_secs(5)))
        .await
        .expect("call");
    assert_eq!(out["inner"]["caller"], "gear:front");
    assert_eq!(out["inner"]["trace"], out["my_trace"]);
    // The nested call inherits the caller's 5 s deadline rather than the 30 s default.
    let remaining = out["inner"]["remaining_ms"].as_u64().expect("has a deadline");
    assert!(remaining <= 5_000, "remaining {remaining} ms");
}

#[tokio::test]
async fn unknown_gear_and_port_are_not_found() {
    let host = Host::new(HostConfig::default(), None);
    host.add_gear(math()).expect("hosted");
    let e = root(&host).call::<_, i64>("nope", "add", &1).await.expect_err("no gear");
    assert_eq!(e.code(), ErrorCode::NotFound);
    let e = root(&host).call::<_, i64>("math", "nope", &1).await.expect_err("no port");
    assert_eq!(e.code(), ErrorCode::NotFound);
    let e = root(&host).call::<_, i64>("math", "add", &"not an Add").await.expect_err("bad input");
    assert_eq!(e.code(), ErrorCode::BadRequest);
}

#[tokio::test(start_paused = true)]
async fn a_port_past_its_deadline_is_dropped_and_the_caller_gets_timeout() {
    let dropped = Arc::new(Notify::new());
    let d2 = dropped.clone();
    let host = Host::new(HostConfig::default(), None);
    host.add_gear(Gear::new("slow").port_with(
        PortSpec::new("wait").timeout(Duration::from_millis(100)),
        move |_ctx: Ctx, _: ()| {
            let d = d2.clone();
            async move {
                struct OnDrop(Arc<Notify>);
                impl Drop for OnDrop {
                    fn drop(&mut self) {
                        self.0.notify_one();
                    }
                }
                let _guard = OnDrop(d);
                tokio::time::sleep(Duration::from_secs(3600)).await;
                Ok(())
            }
        },
    ))
    .expect("hosted");
    let e = root(&host).call::<_, ()>("slow", "wait", &()).await.expect_err("times out");
    assert_eq!(e.code(), ErrorCode::Timeout);
    dropped.notified().await;
    // The caller's own, shorter timeout wins over the port default.
    let t0 = Instant::now();
    let e = root(&host)
        .call_with::<_, ()>("slow", "wait", &(), CallOptions::default().timeout(Duration::from_millis(10)))
        .await
        .expect_err("times out");
    assert_eq!(e.code(), ErrorCode::Timeout);
    assert_eq!(t0.elapsed(), Duration::from_millis(10));
}

#[tokio::test(start_paused = true)]
async fn the_host_caps_every_deadline() {
    let config = HostConfig { max_timeout: Duration::from_millis(50), ..HostConfig::default() };
    let host = Host::new(config, None);
    host.add_gear(Gear::new("slow").port("wait", |_ctx: Ctx, _: ()| async move {
        tokio::time::sleep(Duration::from_secs(10)).await;
        Ok(())
    }))
    .expect("hosted");
    let t0 = Instant::now();
    let e = root(&host)
        .call_with::<_, ()>("slow", "wait", &(), CallOptions::default().timeout(Duration::from_secs(60)))
        .await
        .expect_err("capped");
    assert_eq!(e.code(), ErrorCode::Timeout);
    assert_eq!(t0.elapsed(), Duration::from_millis(50));
}

#[tokio::test]
async fn past_the_concurrency_limit_callers_get_overloaded_at_once() {
    let gate = Arc::new(Notify::new());
    let g2 = gate.clone();
    let host = Host::new(HostConfig::default(), None);
    host.add_gear(Gear::new("narrow").port_with(
        PortSpec::new("hold").max_concurrency(std::num::NonZeroUsize::MIN),
        move |_ctx: Ctx, _: ()| {
            let g = g2.clone();
            async move {
                g.notified().await;
                Ok("done")
            }
        },
    ))
    .expect("hosted");
    let h2 = host.clone();
    let first = tokio::spawn(async move { root(&h2).call::<_, String>("narrow", "hold", &()).await });
    while host.in_flight() == 0 {
        tokio::task::yield_now().await;
    }
    let e = root(&host).call::<_, String>("narrow", "hold", &()).await.expect_err("overloaded");
    assert_eq!(e.code(), ErrorCode::Overloaded);
    assert!(e.not_run(), "refused before the port ran: {e}");
    gate.notify_one();
    assert_eq!(first.await.expect("join").expect("first call"), "done");
    assert_eq!(host.in_flight(), 0);
    // The slot is free again.
    let h3 = host.clone();
    let again = tokio::spawn(async move { root(&h3).call::<_, String>("narrow", "hold", &()).await });
    while host.in_flight() == 0 {
        tokio::task::yield_now().await;
    }
    gate.notify_one();
    assert!(again.await.expect("join").is_ok());
}

#[tokio::test]
async fn a_panicking_port_fails_its_call_with_internal_and_others_go_on() {
    let host = Host::new(HostConfig::default(), None);
    host.add_gear(
        Gear::new("fragile")
            .port("boom", |_ctx: Ctx, _: ()| async move {
                if std::hint::black_box(true) {
                    panic!("kaboom");
                }
                Ok(())
            })
            .port("sync_boom", |_ctx: Ctx, _: ()| -> std::future::Ready<Result<(), CallError>> {
                panic!("before the future")
            })
            .port("fine", |_ctx: Ctx, _: ()| async move { Ok("ok") }),
    )
    .expect("hosted");
    let e = root(&host).call::<_, ()>("fragile", "boom", &()).await.expect_err("panicked");
    assert_eq!(e.code(), ErrorCode::Internal);
    let e = root(&host).call::<_, ()>("fragile", "sync_boom", &()).await.expect_err("panicked");
    assert_eq!(e.code(), ErrorCode::Internal);
    let ok: String = root(&host).call("fragile", "fine", &()).await.expect("still serving");
    assert_eq!(ok, "ok");
    assert_eq!(host.in_flight(), 0);
}

#[tokio::test]
async fn events_reach_every_local_listener() {
    let (tx, mut rx) = mpsc::unbounded_channel::<(String, String)>();
    let host = Host::new(HostConfig::default(), None);
    for name in ["audit", "mailer"] {
        let tx = tx.clone();
        host.add_gear(Gear::new(name).listen("orders.placed", move |ctx: Ctx, ev: Add| {
            let tx = tx.clone();
            async move {
                let _sent =
                    tx.send((ctx.gear().map(|g| g.to_string()).unwrap_or_default(), format!("{}", ev.a + ev.b)));
                Ok(())
            }
        }))
        .expect("hosted");
    }
    root(&host).notify("orders.placed", &Add { a: 40, b: 2 }).await.expect("published");
    let mut got = vec![rx.recv().await.expect("first"), rx.recv().await.expect("second")];
    got.sort();
    assert_eq!(got, vec![("audit".into(), "42".into()), ("mailer".into(), "42".into())]);
    // No listener: fine. Invalid topic: bad_request.
    root(&host).notify("nobody.listens", &1).await.expect("no listeners is not an error");
    let e = root(&host).notify("bad topic", &1).await.expect_err("invalid");
    assert_eq!(e.code(), ErrorCode::BadRequest);
}

#[tokio::test]
async fn a_slow_listener_never_blocks_the_publisher_and_drops_its_overflow() {
    let gate = Arc::new(Notify::new());
    let (tx, mut rx) = mpsc::unbounded_channel::<i64>();
    let config = HostConfig { listener_queue: std::num::NonZeroUsize::new(2).expect("2"), ..HostConfig::default() };
    let host = Host::new(config, None);
    let g = gate.clone();
    host.add_gear(Gear::new("slow").listen("t", move |_ctx: Ctx, n: i64| {
        let (g, tx) = (g.clone(), tx.clone());
        async move {
            g.notified().await;
            let _sent = tx.send(n);
            Ok(())
        }
    }))
    .expect("hosted");
    let publish = |n: i64| Publish {
        topic: "t".into(),
        event: Event::typed(n),
        publisher: Principal::anonymous(),
        trace_id: TraceId::random(),
    };
    // The first event is taken by the listener (which then waits on the gate); wait for that.
    assert_eq!(host.publish_local(&publish(0)).expect("publish"), 1);
    while host.topics.read().map(|t| t.values().all(|l| l[0].tx.capacity() < 2)).unwrap_or(false) {
        tokio::task::yield_now().await;
    }
    // Two more fill the queue; the rest are dropped, and publishing never waits.
    let delivered: usize = (1..=10).map(|n| host.publish_local(&publish(n)).expect("publish")).sum();
    assert_eq!(delivered, 2);
    for _ in 0..3 {
        gate.notify_one();
        tokio::task::yield_now().await;
    }
    let mut got = Vec::new();
    while got.len() < 3 {
        gate.notify_one();
        got.push(rx.recv().await.expect("event"));
    }
    assert_eq!(got, vec![0, 1, 2]);
}

#[tokio::test]
async fn removing_a_gear_withdraws_its_ports_and_listeners() {
    let host = Host::new(HostConfig::default(), None);
    host.add_gear(math().listen("t", |_c: Ctx, _e: serde_json::Value| async move { Ok(()) })).expect("hosted");
    assert!(host.has_gear("math"));
    assert_eq!(host.topics().len(), 1);
    assert!(host.remove_gear("math").is_some());
    assert!(!host.has_gear("math"));
    assert!(host.topics().is_empty());
    let e = root(&host).call::<_, i64>("math", "add", &Add { a: 1, b: 1 }).await.expect_err("gone");
    assert_eq!(e.code(), ErrorCode::NotFound);
}

#[test]
fn invalid_gears_are_refused_with_a_reason() {
    let host = Host::new(HostConfig::default(), None);
    let e = host.add_gear(Gear::new("bad name")).expect_err("invalid name");
    assert!(matches!(e, GearError::Name(_)));
    let e = host.add_gear(Gear::new("g").version("one")).expect_err("invalid version");
    assert!(matches!(e, GearError::Version { .. }));
    let twice = Gear::new("g")
        .port("p", |_c: Ctx, _: ()| async move { Ok(()) })
        .port("p", |_c: Ctx, _: ()| async move { Ok(()) });
    assert!(matches!(host.add_gear(twice), Err(GearError::DuplicatePort { .. })));
    host.add_gear(Gear::new("g")).expect("valid");
    assert!(matches!(host.add_gear(Gear::new("g")), Err(GearError::DuplicateGear(_))));
    let listens = Gear::new("l").listen("t", |_c: Ctx, _e: serde_json::Value| async move { Ok(()) });
    assert!(matches!(host.add_gear(listens), Err(GearError::NoRuntime(_))));
}

#[tokio::test]
async fn a_port_that_ran_never_says_it_did_not_run() {
    let host = Host::new(HostConfig::default(), None);
    // A call of the port's own was refused before it ran; the port passes that error on.
    host.add_gear(Gear::new("relay").port("pass", |_ctx: Ctx, _: ()| async move {
        Err::<(), _>(CallError::unavailable("no route to the next gear").mark_not_run())
    }))
    .expect("hosted");
    let e = root(&host).call::<_, ()>("relay", "pass", &()).await.expect_err("fails");
    assert_eq!(e.code(), ErrorCode::Unavailable);
    assert!(!e.not_run(), "relay/pass ran: its caller must not send the call again as if it had not");
}
