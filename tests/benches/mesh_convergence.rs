//! Mesh convergence: 20 nodes in one process (real TLS WebSocket and QUIC links over loopback,
//! default mesh config: at most 8 links each, so most pairs are reached through switching nodes),
//! each hosting a gear of its own and joining through the first node. Measured: the time from the
//! last node's start until every node sees every gear (and the time from the first start), and
//! until every node is back within its link bound (joining through one seed first links many
//! nodes to it; pruning then spreads them out).
//!
//!     cargo bench -p gearmesh-tests --bench mesh_convergence
//!
//! `GEARMESH_BENCH_QUICK=1` runs one round instead of five.

use std::time::{Duration, Instant};

use gearmesh::{
    Node, NodeConfig, RunningNode,
    gears::{CallError, Ctx, Gear},
};

const NODES: usize = 20;

fn gear(i: usize) -> Gear {
    Gear::new(format!("g{i}")).port("ping", |_ctx: Ctx, v: u64| async move { Ok::<_, CallError>(v) })
}

/// Whether every node sees all `NODES` gears on alive nodes.
fn converged(nodes: &[RunningNode]) -> bool {
    nodes.iter().all(|n| {
        let view = n.mesh().view();
        (0..NODES).all(|i| {
            let name = format!("g{i}");
            view.nodes.iter().any(|x| x.state == "alive" && x.gears.iter().any(|g| g.name == name))
        })
    })
}

/// One round's figures.
struct Round {
    /// Ms from the last start until every node sees every gear.
    from_last: f64,
    /// The same, from the first start.
    from_first: f64,
    /// The most links any node held then.
    links_at_convergence: usize,
    /// Ms from the last start until no node holds more than `max_links` links.
    bounded: f64,
}

async fn round(dir: &std::path::Path) -> Round {
    let t_first = Instant::now();
    let mut nodes: Vec<RunningNode> = Vec::with_capacity(NODES);
    for i in 0..NODES {
        let mut c = NodeConfig {
            name: Some(format!("n{i}")),
            listen: "127.0.0.1:0".parse().expect("addr"),
            insecure_dev: true,
            ..NodeConfig::default()
        };
        c.tls.data_dir = Some(dir.to_owned());
        if let Some(first) = nodes.first() {
            c.seeds = vec![first.link_addrs()[0].clone()];
        }
        let node = Node::builder().config(c).gear(gear(i)).build().expect("valid").start().await.expect("started");
        nodes.push(node);
    }
    let t_last = Instant::now();
    let deadline = t_last + Duration::from_secs(60);
    while !converged(&nodes) {
        assert!(Instant::now() < deadline, "20 nodes did not converge within 60 s");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let from_last = t_last.elapsed().as_secs_f64() * 1e3;
    let from_first = t_first.elapsed().as_secs_f64() * 1e3;
    let most_links = |nodes: &[RunningNode]| nodes.iter().map(|n| n.mesh().stats().links).max().unwrap_or(0);
    let links_at_convergence = most_links(&nodes);
    let bound = NodeConfig::default().mesh.max_links;
    while most_links(&nodes) > bound {
        assert!(Instant::now() < deadline, "links did not come back within their bound");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let bounded = t_last.elapsed().as_secs_f64() * 1e3;
    let mut stopping = tokio::task::JoinSet::new();
    for n in nodes {
        stopping.spawn(n.shutdown());
    }
    while stopping.join_next().await.is_some() {}
    Round { from_last, from_first, links_at_convergence, bounded }
}

fn main() {
    gearmesh::install_crypto_provider();
    let rounds = if std::env::var_os("GEARMESH_BENCH_QUICK").is_some() { 1 } else { 5 };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    rt.block_on(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut results = Vec::new();
        for r in 0..rounds {
            let x = round(dir.path()).await;
            println!(
                "round {r}: every node saw every gear {:.0} ms after the last join ({:.0} ms after the first), \
                 when the busiest node had {} links; every node within its link bound after {:.0} ms",
                x.from_last, x.from_first, x.links_at_convergence, x.bounded
            );
            results.push(x.from_last);
        }
        results.sort_by(f64::total_cmp);
        println!(
            "mesh_convergence: {NODES} nodes, median {:.0} ms after the last join (min {:.0}, max {:.0})",
            results[results.len() / 2],
            results[0],
            results[results.len() - 1]
        );
    });
}
