//! The in-process broker: publications go straight to this replica's fan-out.
//!
//! The default when no Redis is configured, and what a newcomer gets from one command. It keeps
//! the same contract as a networked broker (subscriptions are acknowledged, publications carry
//! their publish time) so the rest of the gateway cannot tell the difference.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use publisher_lib::contract::{EventKind, Group};

use super::{Fanout, Publication, SubscriptionRequest, SubscriptionRequests};
use crate::shutdown::Shutdown;

/// Handle of the in-process broker.
#[derive(Clone)]
pub struct MemoryBroker {
    fanout: Arc<dyn Fanout>,
}

impl std::fmt::Debug for MemoryBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MemoryBroker")
    }
}

impl MemoryBroker {
    /// Starts the task that acknowledges subscriptions.
    pub fn start(
        fanout: Arc<dyn Fanout>,
        mut requests: SubscriptionRequests,
        shutdown: &Shutdown,
    ) -> Self {
        let stop = shutdown.background_token().clone();
        shutdown.background().spawn(async move {
            // Subscribed groups and their generation; kept so the memory broker follows the
            // same rules as a networked one (and so its behaviour can be tested).
            let mut subscribed: HashMap<Group, u64> = HashMap::new();
            loop {
                let request = tokio::select! {
                    biased;
                    () = stop.cancelled() => break,
                    request = requests.recv() => match request {
                        Some(request) => request,
                        None => break,
                    },
                };
                match request {
                    SubscriptionRequest::Subscribe {
                        group,
                        generation,
                        ack,
                    } => {
                        subscribed.insert(group, generation);
                        let _ = ack.send(Ok(()));
                    }
                    SubscriptionRequest::Unsubscribe { group, generation } => {
                        if subscribed.get(&group) == Some(&generation) {
                            subscribed.remove(&group);
                        }
                    }
                }
            }
        });
        Self { fanout }
    }

    /// Delivers an event to each group's local members.
    pub fn publish(&self, kind: EventKind, payload: Bytes, groups: &[Group]) {
        let published_at = SystemTime::now();
        for group in groups {
            self.fanout.fan_out(&Publication {
                group: group.clone(),
                kind,
                payload: payload.clone(),
                published_at,
            });
        }
    }
}
