//! Two bare cores, wired by hand: how a pruned link is let go on both ends.
//!
//! The node that prunes a link (or refuses it as full) tells its peer with a `Prune` message
//! and keeps reading the link for a while. The peer must stop sending on it as soon as it hears,
//! so nothing is in flight when the link finally closes.

use gearmesh_mesh::{Action, Config, Core, DisconnectReason, LinkInfo, NodeId, Time};

fn id(n: u8) -> NodeId {
    NodeId::from_bytes([n; 16])
}

fn actions(core: &mut Core) -> Vec<Action> {
    std::iter::from_fn(|| core.poll_action()).collect()
}

/// Hands every message `from` has for `to` over to it.
fn deliver(from: &mut Core, to: &mut Core, now: Time) {
    while let Some((peer, bytes)) = from.poll_transmit() {
        if peer == to.id() {
            to.handle_message(now, from.id(), &bytes).expect("a message of the core's own");
        }
    }
}

#[test]
fn a_peer_refused_as_full_is_told_to_stop_sending_on_the_link() {
    let now = Time::ZERO;
    // The refusing node has room for one link, which a third node holds.
    let full = Config { max_links: 1, min_links: 1, hard_max_links: 1, ..Config::default() };
    let mut refuser = Core::new(now, id(1), vec!["wss://refuser:443".into()], full);
    let mut dialer = Core::new(now, id(2), vec!["wss://dialer:443".into()], Config::default());
    let info = |addr: &str| LinkInfo { addrs: vec![addr.to_owned()], dialed: None };
    refuser.handle_link_up(now, id(3), info("wss://third:443"));
    let _third_link: Vec<Action> = actions(&mut refuser);

    dialer.handle_link_up(now, refuser.id(), info("wss://refuser:443"));
    refuser.handle_link_up(now, dialer.id(), info("wss://dialer:443"));
    assert!(
        actions(&mut refuser).contains(&Action::Disconnect { peer: dialer.id(), reason: DisconnectReason::Full }),
        "the refuser lets the link go"
    );
    assert_eq!(dialer.links().len(), 1);
    let _before: Vec<Action> = actions(&mut dialer);

    deliver(&mut refuser, &mut dialer, now);
    assert!(dialer.links().is_empty(), "the dialer no longer counts the link");
    assert!(
        actions(&mut dialer)
            .contains(&Action::Disconnect { peer: refuser.id(), reason: DisconnectReason::PrunedByPeer }),
        "the dialer is told to stop sending on the link"
    );
}
