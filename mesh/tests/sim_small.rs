//! Small simulated meshes: joining, full mesh while small, gossip of gears and topics, leave.

mod sim;

use gearmesh_mesh::Config;
use sim::{NetConfig, Sim};

fn mesh(seed: u64, n: usize) -> Sim {
    let mut sim = Sim::new(seed, NetConfig::default());
    let s = sim.add_node(Config::default(), true, Vec::new());
    let seed_addr = sim.nodes[s].addr.clone();
    for _ in 1..n {
        sim.add_node(Config::default(), true, vec![seed_addr.clone()]);
        sim.run_for(10);
    }
    sim
}

#[test]
fn small_mesh_is_a_full_mesh() {
    let mut sim = mesh(1, 6);
    let t = sim.run_until_pred(100, 20_000, |s| s.converged());
    assert!(t.is_some(), "6 nodes converge");
    sim.run_for(3_000);
    for i in sim.live() {
        assert_eq!(sim.nodes[i].core.links().len(), 5, "full mesh while small");
    }
}

#[test]
fn fifty_nodes_converge_with_bounded_links() {
    let mut sim = mesh(2, 50);
    let t = sim.run_until_pred(100, 30_000, |s| s.converged());
    eprintln!("converged after {t:?} ms");
    assert!(t.is_some());
    sim.run_for(5_000);
    assert!(sim.converged());
    let live = sim.live();
    assert!(sim.connected_among(&live));
    assert!(sim.max_degree() <= 16, "hard link bound");
    eprintln!("max degree {} max core links {}", sim.max_degree(), sim.max_core_links());
    let (ok, hops) = sim.check_routes(&live, 500);
    eprintln!("routes ok {ok}/500 max hops {hops}");
    assert_eq!(ok, 500);
    assert!(sim.stats.declared_dead.is_empty(), "nobody declared dead: {:?}", sim.stats.declared_dead);
}

#[test]
fn oversized_catalogue_is_refused_and_nothing_changes() {
    use gearmesh_mesh::{Core, GearAd, NodeId, SetLocalError, Time};
    let mut core = Core::new(Time::ZERO, NodeId::from_bytes([1; 16]), vec!["wss://a:1".into()], Config::default());
    let gears: Vec<GearAd> = (0..2_000)
        .map(|i| GearAd {
            name: format!("gear-{i}"),
            version: "1.0.0".into(),
            ports: vec!["run".into()],
            idempotent: vec![],
        })
        .collect();
    let err = core.set_local(gears, Vec::new()).expect_err("too large for one record");
    assert!(matches!(err, SetLocalError::RecordTooLarge { .. }));
    assert!(core.node(core.id()).expect("own record").gears.is_empty());
}

#[test]
fn garbage_input_is_an_error_not_a_panic() {
    let mut sim = mesh(3, 2);
    sim.run_for(1_000);
    let peer = sim.id(1);
    let now = sim.now;
    let core = &mut sim.nodes[0].core;
    assert!(core.links().contains(&peer));
    assert!(core.handle_message(now, peer, b"not gossip").is_err());
    assert!(core.handle_message(now, peer, &[b'g', b'm', 9, 1]).is_err());
}

#[test]
fn shortcut_links_make_a_direct_route() {
    let mut sim = mesh(4, 60);
    sim.run_until_pred(100, 30_000, |s| s.converged()).expect("converges");
    sim.run_for(3_000);
    // Find a node several hops away from node 1 and ask for a shortcut to it.
    let far = (2..60)
        .max_by_key(|&d| sim.nodes[1].core.routes().iter().find(|(id, _)| *id == sim.id(d)).map_or(0, |(_, r)| r.hops))
        .expect("some node");
    let far_id = sim.id(far);
    assert!(sim.nodes[1].core.add_shortcut(far_id));
    sim.run_for(15_000);
    assert!(sim.nodes[1].core.links().contains(&far_id), "shortcut link is up");
    assert_eq!(sim.nodes[1].core.next_hop(far_id), Some(far_id));
    assert!(sim.max_degree() <= 16);
}

#[test]
fn no_shortcut_to_a_node_that_cannot_be_dialed() {
    let mut sim = mesh(5, 6);
    let seed_addr = sim.nodes[0].addr.clone();
    let hidden = sim.add_node(Config::default(), false, vec![seed_addr]);
    sim.run_until_pred(100, 30_000, |s| s.converged()).expect("converges");
    let hidden_id = sim.id(hidden);
    let unknown = gearmesh_mesh::NodeId::from_bytes([0xee; 16]);
    assert!(!sim.nodes[1].core.add_shortcut(hidden_id), "a --no-listen node advertises no address");
    assert!(!sim.nodes[1].core.add_shortcut(unknown), "a node this one has no record of");
    let (me, listening) = (sim.id(1), sim.id(2));
    assert!(!sim.nodes[1].core.add_shortcut(me), "itself");
    assert!(sim.nodes[1].core.add_shortcut(listening), "a listening node");
}
