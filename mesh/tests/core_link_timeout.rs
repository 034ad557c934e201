//! Two bare cores on a virtual clock: a link whose peer falls silent is given up exactly
//! `link_timeout` after the last thing heard on it, not at the next gossip tick after that, so
//! suspicion (and with it the death of a frozen node) starts as early as the timeout allows.

use std::time::Duration;

use gearmesh_mesh::{Action, Config, Core, DisconnectReason, LinkInfo, NodeId, Time};

fn id(n: u8) -> NodeId {
    NodeId::from_bytes([n; 16])
}

/// Hands every message `from` has for `to` over to it; how many there were.
fn deliver(from: &mut Core, to: &mut Core, now: Time) -> usize {
    let mut n = 0;
    while let Some((peer, bytes)) = from.poll_transmit() {
        if peer == to.id() {
            to.handle_message(now, from.id(), &bytes).expect("a message of the core's own");
            n += 1;
        }
    }
    n
}

fn timed_out(core: &mut Core, peer: NodeId) -> bool {
    std::iter::from_fn(|| core.poll_action())
        .any(|a| a == Action::Disconnect { peer, reason: DisconnectReason::Timeout })
}

#[test]
fn a_silent_link_is_given_up_link_timeout_after_it_fell_silent_not_at_the_next_tick() {
    let config = Config::default();
    let mut now = Time::ZERO;
    let mut a = Core::new(now, id(1), vec!["wss://a:443".into()], config.clone());
    let mut b = Core::new(now, id(2), vec!["wss://b:443".into()], config.clone());
    let info = |addr: &str| LinkInfo { addrs: vec![addr.to_owned()], dialed: None };
    a.handle_link_up(now, b.id(), info("wss://b:443"));
    b.handle_link_up(now, a.id(), info("wss://a:443"));

    // Both run for a while, every message delivered at once.
    let mut last_heard = now;
    while now < Time::from_millis(3_000) {
        now = a.poll_timeout().expect("a timer").min(b.poll_timeout().expect("a timer"));
        a.handle_timeout(now);
        b.handle_timeout(now);
        deliver(&mut a, &mut b, now);
        if deliver(&mut b, &mut a, now) > 0 {
            last_heard = now;
        }
    }
    assert!(!timed_out(&mut a, b.id()), "a healthy link is kept");

    // From now on b is frozen: a runs alone and hears nothing more.
    let deadline = last_heard + config.link_timeout + Duration::from_millis(1);
    let given_up = loop {
        let t = a.poll_timeout().expect("a timer");
        assert!(t <= deadline, "a wakes no later than the silent link's deadline ({t:?} > {deadline:?})");
        now = t;
        a.handle_timeout(now);
        while a.poll_transmit().is_some() {}
        if timed_out(&mut a, b.id()) {
            break now;
        }
    };
    assert_eq!(given_up, deadline, "given up at the deadline itself");
    assert!(a.links().is_empty());
    let ticks = config.gossip_interval.as_millis();
    assert_ne!(
        u128::from(given_up.as_millis()) % ticks,
        u128::from(last_heard.as_millis()) % ticks,
        "the deadline is not a gossip tick (the check is its own)"
    );
}
