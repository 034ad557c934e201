//! Taps: event consumers that are not gears (the node's WebSocket observers, for example).
//!
//! A tap is a listener slot without a handler: it gets the same bounded queue and the same
//! at-most-once delivery as a gear's listener, and its topic counts among the host's topics (so
//! a mesh sends the topic's events to this node). Dropping the [`Tap`] unsubscribes it.

use std::{
    num::NonZeroUsize,
    sync::{
        Arc, Weak,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
};

use metrics::Counter;
use tokio::sync::mpsc;

use super::{Host, ListenerSlot, write};
use crate::{CallError, Event, GearName, Principal, Topic, TraceId};

/// Tap ids; zero is reserved for gears' listeners.
static NEXT_TAP: AtomicU64 = AtomicU64::new(1);

/// One topic's events for a consumer that is not a gear. See [`Host::tap`].
#[derive(Debug)]
pub struct Tap {
    host: Weak<Host>,
    topic: Topic,
    id: u64,
    rx: mpsc::Receiver<(Event, Principal, TraceId)>,
}

impl Tap {
    /// The topic.
    pub fn topic(&self) -> &Topic {
        &self.topic
    }

    /// The next event, with its publisher and trace; `None` once the host is gone.
    pub async fn recv(&mut self) -> Option<(Event, Principal, TraceId)> {
        self.rx.recv().await
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        let Some(host) = self.host.upgrade() else { return };
        let mut topics = write(&host.topics);
        if let Some(list) = topics.get_mut(&self.topic) {
            *list = list.iter().filter(|s| s.tap != self.id).cloned().collect();
            if list.is_empty() {
                topics.remove(&self.topic);
            }
        }
    }
}

impl Host {
    /// Subscribes a consumer that is not a gear to `topic`, with a queue of `queue` events (when
    /// it is full, new events for this tap are dropped, as for a listener). The topic counts among
    /// [`Host::topics`] until the tap is dropped; a mesh must be told to re-read them.
    ///
    /// # Errors
    /// `bad_request` for an invalid topic name.
    pub fn tap(&self, topic: &str, queue: NonZeroUsize) -> Result<Tap, CallError> {
        let topic = Topic::new(topic).map_err(|e| CallError::bad_request(e.to_string()))?;
        let id = NEXT_TAP.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(queue.get());
        // Taps are not gears; the slot's gear name only labels log lines.
        let gear = GearName::new("tap").map_err(|e| CallError::internal(e.to_string()))?;
        let slot =
            Arc::new(ListenerSlot { gear, tap: id, tx, lagging: AtomicBool::new(false), dropped: Counter::noop() });
        let mut topics = write(&self.topics);
        let list = topics.entry(topic.clone()).or_insert_with(|| Arc::from(Vec::new()));
        *list = list.iter().cloned().chain(std::iter::once(slot)).collect();
        Ok(Tap { host: self.me.clone(), topic, id, rx })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Gear, Publish, host::HostConfig};

    fn publish(topic: &str, n: u64) -> Publish {
        Publish {
            topic: topic.into(),
            event: Event::typed(n),
            publisher: Principal::anonymous(),
            trace_id: TraceId::random(),
        }
    }

    #[tokio::test]
    async fn a_tap_receives_its_topic_counts_as_a_topic_and_unsubscribes_on_drop() {
        let host = Host::new(HostConfig::default(), None);
        let mut tap = host.tap("orders.placed", NonZeroUsize::MIN.saturating_add(7)).expect("valid topic");
        assert_eq!(host.topics().iter().map(Topic::as_str).collect::<Vec<_>>(), ["orders.placed"]);
        assert_eq!(host.publish_local(&publish("orders.placed", 1)).expect("published"), 1);
        assert_eq!(host.publish_local(&publish("other", 2)).expect("published"), 0);
        let (event, _, _) = tap.recv().await.expect("an event");
        assert_eq!(event.as_arg().take::<u64>().expect("a number"), 1);
        drop(tap);
        assert!(host.topics().is_empty());
        assert_eq!(host.publish_local(&publish("orders.placed", 3)).expect("published"), 0);
    }

    #[tokio::test]
    async fn removing_a_gear_keeps_taps_and_a_full_tap_drops_only_its_own_events() {
        let host = Host::new(HostConfig::default(), None);
        let gear = Gear::new("tap").listen("t", |_ctx, _ev: u64| async { Ok(()) });
        host.add_gear(gear).expect("hosted");
        let mut tap = host.tap("t", NonZeroUsize::MIN).expect("valid");
        assert_eq!(host.publish_local(&publish("t", 1)).expect("published"), 2);
        // The tap's queue holds one event: the second is dropped for it, not for the gear.
        assert_eq!(host.publish_local(&publish("t", 2)).expect("published"), 1);
        host.remove_gear("tap");
        assert_eq!(host.topics().len(), 1, "the tap still listens");
        let (event, _, _) = tap.recv().await.expect("the first event");
        assert_eq!(event.as_arg().take::<u64>().expect("a number"), 1);
        assert!(host.tap("not a topic", NonZeroUsize::MIN).is_err());
    }
}
