//! Faults on simulated meshes of a few hundred nodes: partitions that heal, 20% message loss, a
//! paused node that recovers within its suspicion window, graceful leave, and no-listen nodes.

mod sim;

use gearmesh_mesh::{Config, GearAd, NodeState};
use sim::{NetConfig, Sim};

fn mesh(seed: u64, n: usize, net: NetConfig) -> Sim {
    let mut sim = Sim::new(seed, net);
    let s = sim.add_node(Config::default(), true, Vec::new());
    let seed_addr = sim.nodes[s].addr.clone();
    for _ in 1..n {
        sim.add_node(Config::default(), true, vec![seed_addr.clone()]);
        sim.run_for(5);
    }
    sim.run_until_pred(100, 60_000, |s| s.converged()).expect("initial convergence");
    sim
}

#[test]
fn partition_in_two_halves_heals() {
    let n = 200;
    let mut sim = mesh(11, n, NetConfig::default());
    let groups: Vec<u32> = (0..n).map(|i| u32::from(i >= n / 2)).collect();
    sim.partition(&groups);
    let a: Vec<usize> = (0..n / 2).collect();
    let b: Vec<usize> = (n / 2..n).collect();
    let t = sim
        .run_until_pred(100, 30_000, |s| s.converged_among(&a) && s.converged_among(&b))
        .expect("each half converges on itself");
    eprintln!("BENCH partition: halves agree on themselves after {t} ms");
    assert!(sim.connected_among(&a) && sim.connected_among(&b), "each half stays connected");
    sim.heal();
    let t = sim.run_until_pred(200, 60_000, |s| s.converged()).expect("the partition heals");
    eprintln!("BENCH partition: healed {t} ms after connectivity returned");
    sim.run_for(5_000);
    let live = sim.live();
    assert!(sim.connected_among(&live));
    let (ok, _) = sim.check_routes(&live, 1_000);
    assert_eq!(ok, 1_000);
}

#[test]
fn twenty_percent_loss_still_converges() {
    let n = 200;
    let net = NetConfig { loss: 0.2, ..NetConfig::default() };
    let mut sim = Sim::new(12, net);
    let s = sim.add_node(Config::default(), true, Vec::new());
    let seed_addr = sim.nodes[s].addr.clone();
    for _ in 1..n {
        sim.add_node(Config::default(), true, vec![seed_addr.clone()]);
        sim.run_for(5);
    }
    let t = sim.run_until_pred(100, 60_000, |s| s.converged()).expect("converges under 20% loss");
    eprintln!("BENCH loss: {n} nodes under 20% loss converged {t} ms after the last join");
    sim.run_for(10_000);
    // False suspicions may happen under loss, but they are refuted: everyone is still up everywhere.
    let t = sim.run_until_pred(100, 20_000, |s| s.converged()).expect("stays converged");
    eprintln!(
        "BENCH loss: {} suspicions raised, {} false deaths, converged again within {t} ms",
        sim.stats.suspected.values().sum::<u64>(),
        sim.stats.declared_dead.values().sum::<u64>()
    );
    let live = sim.live();
    assert!(sim.connected_among(&live));
}

#[test]
fn paused_node_is_suspected_but_not_declared_dead() {
    let n = 100;
    let mut sim = mesh(13, n, NetConfig::default());
    sim.run_for(3_000);
    let victim = 37;
    let id = sim.id(victim);
    sim.pause(victim, 2_000);
    sim.run_for(2_000);
    assert!(sim.stats.suspected.get(&id).copied().unwrap_or(0) > 0, "the paused node is suspected");
    let t = sim.run_until_pred(50, 10_000, |s| s.seen_alive_by(id) == s.live().len() && s.converged());
    assert!(t.is_some(), "it refutes and everyone sees it alive");
    assert_eq!(sim.stats.declared_dead.get(&id), None, "never declared dead");
    let inc = sim.nodes[victim].core.node(id).map(|r| r.incarnation);
    assert!(inc > Some(0), "it refuted with a new incarnation");
}

#[test]
fn graceful_leave_reroutes_at_once() {
    let n = 60;
    let mut sim = mesh(14, n, NetConfig::default());
    sim.run_for(3_000);
    let leaver = 5;
    let id = sim.id(leaver);
    let now = sim.now;
    sim.nodes[leaver].core.leave(now);
    // Within a few network latencies, nobody routes through it any more, and nobody offers it
    // a new call (it hosts nothing any more, for everyone). Nodes still reach it while a path of
    // links to it stays up (it answers the calls it runs).
    sim.run_for(300);
    let live = sim.live();
    for &i in &live {
        assert_eq!(sim.nodes[i].core.state_of(id), Some(NodeState::Left), "node {i} saw the leave");
        let routes = sim.nodes[i].core.routes();
        assert!(routes.iter().all(|(d, r)| *d == id || r.next_hop != id), "node {i} routes through it");
    }
    assert_eq!(sim.stats.declared_dead.get(&id), None);
    // Its links stay up past the linger (for the calls it still runs), until its node stops.
    sim.run_for(700);
    let linked = live.iter().filter(|&&i| sim.nodes[i].core.links().contains(&id)).count();
    assert!(linked > 0, "the leaver's links closed before it stopped");
    // Once they close and the records without them have spread, nobody reaches it.
    sim.stop_after_leave(leaver);
    sim.run_for(3_000);
    for &i in &live {
        assert!(sim.nodes[i].core.next_hop(id).is_none(), "node {i} still routes to the node that left");
    }
    assert!(sim.converged());
    assert!(sim.connected_among(&live));
}

#[test]
fn gears_and_interests_spread_to_everyone() {
    let n = 100;
    let mut sim = mesh(15, n, NetConfig::default());
    let gear =
        GearAd { name: "billing".into(), version: "1.2.0".into(), ports: vec!["charge".into()], idempotent: vec![] };
    for &i in &[3usize, 50, 99] {
        sim.nodes[i].core.set_local(vec![gear.clone()], vec!["orders.cancelled".into()]).expect("small record");
    }
    sim.run_for(1_000);
    let mut hosts: Vec<_> = [3usize, 50, 99].iter().map(|&i| sim.id(i)).collect();
    hosts.sort();
    for i in sim.live() {
        let mut r = sim.nodes[i].core.replicas_of("billing");
        r.sort();
        assert_eq!(r, hosts);
        let mut t = sim.nodes[i].core.interested_in("orders.cancelled");
        t.sort();
        assert_eq!(t, hosts);
        assert!(sim.nodes[i].core.interested_in("nobody.listens").is_empty());
    }
}

#[test]
fn no_listen_nodes_join_and_are_reachable() {
    let mut sim = Sim::new(16, NetConfig::default());
    let s = sim.add_node(Config::default(), true, Vec::new());
    let seed_addr = sim.nodes[s].addr.clone();
    for i in 1..40 {
        sim.add_node(Config::default(), i % 4 != 0, vec![seed_addr.clone()]);
        sim.run_for(5);
    }
    sim.run_until_pred(100, 30_000, |s| s.converged()).expect("converges");
    sim.run_for(5_000);
    let live = sim.live();
    assert!(sim.connected_among(&live));
    let (ok, _) = sim.check_routes(&live, 1_000);
    assert_eq!(ok, 1_000, "no-listen nodes reachable through the nodes they linked to");
}

#[test]
fn simulation_is_deterministic() {
    let run = || {
        let mut sim = mesh(17, 40, NetConfig { loss: 0.05, ..NetConfig::default() });
        sim.kill(7);
        sim.run_for(5_000);
        (sim.stats.messages, sim.stats.bytes, sim.nodes[0].core.routes())
    };
    assert_eq!(run(), run());
}
