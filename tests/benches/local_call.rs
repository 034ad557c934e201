//! The cost of a typed gear-to-gear call on one node, next to a direct `.await` of the same async
//! function, measured in the same run.
//!
//! Run: `cargo bench -p gearmesh-tests --bench local_call` (add `taskset -c 0` to pin).
//! Prints ns per call: the median of several batches of many calls each.
//! `GEARMESH_BENCH_BATCH=N` sets the calls per batch (default 200,000; a small value makes a quick
//! run under `valgrind --tool=callgrind`, whose instruction counts are steady on a busy machine).

use std::{hint::black_box, sync::Arc, time::Instant};

use gearmesh::{Node, NodeConfig};
use gearmesh_gears::{Arg, Call, CallMeta, Ctx, Dispatch, Gear, Principal, host::Host};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Add {
    a: u64,
    b: u64,
}

async fn add(req: Add) -> Result<u64, gearmesh_gears::CallError> {
    Ok(req.a.wrapping_add(req.b))
}

fn math() -> Gear {
    Gear::new("math").port("add", |_ctx: Ctx, req: Add| add(req))
}

/// A gear whose port makes `n` typed calls to `math.add` from inside the gear, as gears do.
fn caller() -> Gear {
    Gear::new("caller").port("loop", |ctx: Ctx, n: u64| async move {
        let mut acc = 0u64;
        for i in 0..n {
            acc = acc.wrapping_add(ctx.call::<_, u64>("math", "add", &Add { a: i, b: 1 }).await?);
        }
        Ok(acc)
    })
}

/// ns per gear-to-gear call: the median over batches of `caller.loop`.
async fn measure_gear_to_gear(ctx: &Ctx) -> f64 {
    let n = batch();
    let mut per_call = Vec::with_capacity(BATCHES);
    for _ in 0..BATCHES {
        let t0 = Instant::now();
        let acc: u64 = ctx.call("caller", "loop", &n).await.expect("loop ran");
        black_box(acc);
        per_call.push(t0.elapsed().as_nanos() as f64 / n as f64);
    }
    per_call.sort_by(f64::total_cmp);
    per_call[BATCHES / 2]
}

const BATCHES: usize = 9;

/// Calls per batch: `GEARMESH_BENCH_BATCH`, else 200,000.
fn batch() -> u64 {
    std::env::var("GEARMESH_BENCH_BATCH").ok().and_then(|v| v.parse().ok()).filter(|n| *n > 0).unwrap_or(200_000)
}

/// Runs `f` in batches and returns the median ns per iteration.
async fn measure<F, Fut>(mut f: F) -> f64
where
    F: FnMut(u64) -> Fut,
    Fut: std::future::Future<Output = u64>,
{
    let n = batch();
    let mut per_call = Vec::with_capacity(BATCHES);
    for _ in 0..BATCHES {
        let t0 = Instant::now();
        let mut acc = 0u64;
        for i in 0..n {
            acc = acc.wrapping_add(f(i).await);
        }
        black_box(acc);
        per_call.push(t0.elapsed().as_nanos() as f64 / n as f64);
    }
    per_call.sort_by(f64::total_cmp);
    per_call[BATCHES / 2]
}

fn main() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        // 1. The floor: a direct `.await` of the port's async function.
        let direct = measure(|i| async move { add(black_box(Add { a: i, b: 1 })).await.unwrap_or(0) }).await;

        // 2. Gear to gear through a bare host (no router).
        let host = Host::new(Default::default(), None);
        host.add_gear(math()).expect("hosted");
        host.add_gear(caller()).expect("hosted");
        let ctx = Ctx::new(host.clone() as Arc<dyn Dispatch>, Principal::anonymous());
        let bare = measure_gear_to_gear(&ctx).await;

        // 3. Through a real node (router + Prometheus metrics per port), as gears call each other.
        let node = Node::builder()
            .config(NodeConfig { listen: "127.0.0.1:0".parse().expect("addr"), ..NodeConfig::default() })
            .insecure_dev(true)
            .gear(math())
            .gear(caller())
            .build()
            .expect("valid")
            .start()
            .await
            .expect("started");
        let nctx = node.ctx(Principal::anonymous());
        let node_g2g = measure_gear_to_gear(&nctx).await;
        // 4. From outside any gear (an embedding application's root context: no inherited deadline).
        let node_typed = measure(|i| {
            let ctx = &nctx;
            async move { ctx.call::<_, u64>("math", "add", &Add { a: i, b: 1 }).await.unwrap_or(0) }
        })
        .await;

        // 5. The same port called with JSON (what a caller with another type, or a socket, pays).
        let dispatch = node.dispatch();
        let json = measure(|i| {
            let d = &dispatch;
            async move {
                let body = bytes::Bytes::from(format!("{{\"a\":{i},\"b\":1}}"));
                let call = Call {
                    gear: "math",
                    port: "add",
                    arg: Arg::json(body),
                    meta: CallMeta::new(Principal::anonymous(), None),
                };
                d.call(call).await.and_then(|p| p.take::<u64>()).unwrap_or(0)
            }
        })
        .await;
        node.shutdown().await;

        println!("local_call: ns per call, median of {BATCHES} batches of {}", batch());
        println!("  direct .await of the async fn      {direct:8.1} ns");
        println!("  gear-to-gear typed, bare Host      {bare:8.1} ns  ({:.1}x direct)", bare / direct);
        println!("  gear-to-gear typed, Node           {node_g2g:8.1} ns  ({:.1}x direct)", node_g2g / direct);
        println!("  root ctx typed, Node               {node_typed:8.1} ns  ({:.1}x direct)", node_typed / direct);
        println!("  root ctx JSON, Node                {json:8.1} ns  ({:.1}x direct)", json / direct);
    });
}
