//! Several independent Redis servers, each holding some of the groups.
//!
//! For operators without Redis Cluster: `--redis-url` names several servers (separated by
//! spaces), and each group lives on one of them, chosen by `publisher_lib::contract::shard_of`
//! (a stable hash of the group's name over the number of servers) exactly as every publisher
//! chooses it. Each server gets a whole Redis broker of its own (subscriber, cursors, probes);
//! this module routes subscriptions, publishes and history reads to the group's server, and the
//! replica is ready only while every server is. With one server it is that server's broker.

use std::sync::Arc;

use publisher_lib::contract::{EventKind, Group, Position, shard_of};

use super::redis::{RedisBroker, RedisSettings};
use super::{
    BrokerError, Fanout, Handovers, History, Published, SUBSCRIPTION_QUEUE, SubscriptionRequest,
    SubscriptionRequests, subscriptions,
};
use crate::shutdown::Shutdown;

/// The Redis brokers of every server, in configuration order.
#[derive(Debug, Clone)]
pub struct RedisShards {
    brokers: Arc<[RedisBroker]>,
}

impl RedisShards {
    /// Starts one Redis broker per URL in `settings.url` (whitespace-separated; order matters:
    /// it decides which server holds which group), routing `requests` to them.
    ///
    /// # Errors
    /// When a URL is not a Redis URL, or the certificate authority is not PEM.
    pub fn start(
        settings: &RedisSettings,
        fanout: Arc<dyn Fanout>,
        handovers: Arc<dyn Handovers>,
        mut requests: SubscriptionRequests,
        shutdown: &Shutdown,
    ) -> Result<Self, BrokerError> {
        let urls: Vec<&str> = settings.url.split_whitespace().collect();
        if urls.len() <= 1 {
            let broker =
                RedisBroker::start(settings.clone(), fanout, handovers, requests, shutdown)?;
            return Ok(Self {
                brokers: Arc::from([broker]),
            });
        }
        let mut brokers = Vec::with_capacity(urls.len());
        let mut routes = Vec::with_capacity(urls.len());
        for url in urls {
            let (route, shard_requests) = subscriptions(SUBSCRIPTION_QUEUE);
            let settings = RedisSettings {
                url: url.to_owned(),
                ..settings.clone()
            };
            brokers.push(RedisBroker::start(
                settings,
                Arc::clone(&fanout),
                Arc::clone(&handovers),
                shard_requests,
                shutdown,
            )?);
            routes.push(route);
        }
        // Each request goes to its group's server, in the order the registry made them.
        let stop = shutdown.background_token().clone();
        shutdown.background().spawn(async move {
            loop {
                let request = tokio::select! {
                    () = stop.cancelled() => return,
                    request = requests.recv() => match request {
                        Some(request) => request,
                        None => return,
                    },
                };
                let shard = shard_of(request.group(), routes.len());
                routes[shard].forward(request).await;
            }
        });
        Ok(Self {
            brokers: Arc::from(brokers),
        })
    }

    /// The broker of the server that holds `group`.
    fn of(&self, group: &Group) -> &RedisBroker {
        if self.brokers.len() == 1 {
            return &self.brokers[0];
        }
        &self.brokers[shard_of(group, self.brokers.len())]
    }

    /// Publishes an event's bytes to each of `groups`, each on its own server; the answers come
    /// back in the order of `groups`.
    ///
    /// # Errors
    /// [`BrokerError::Unavailable`] when a server cannot take it (the groups on the others may
    /// have been published: the same idempotency key publishes them only once on a retry).
    pub async fn publish(
        &self,
        kind: EventKind,
        payload: &[u8],
        groups: &[Group],
        key: &str,
    ) -> Result<Vec<Published>, BrokerError> {
        if self.brokers.len() == 1 {
            return self.brokers[0].publish(kind, payload, groups, key).await;
        }
        let mut answers = Vec::with_capacity(groups.len());
        for (shard, broker) in self.brokers.iter().enumerate() {
            let mine: Vec<Group> = groups
                .iter()
                .filter(|group| shard_of(group, self.brokers.len()) == shard)
                .cloned()
                .collect();
            if !mine.is_empty() {
                answers.extend(broker.publish(kind, payload, &mine, key).await?);
            }
        }
        answers.sort_by_key(|answer| groups.iter().position(|group| *group == answer.group));
        Ok(answers)
    }

    /// `group`'s head and what a reader at `after` missed, from its server.
    ///
    /// # Errors
    /// [`BrokerError::Unavailable`] when its server cannot be read in time.
    pub async fn read_history(
        &self,
        group: &Group,
        after: Option<&Position>,
    ) -> Result<History, BrokerError> {
        self.of(group).read_history(group, after).await
    }

    /// The first server's broker, which keeps the replicas' bookkeeping of stateful
    /// connections (markers, carried state, handover requests).
    pub fn first(&self) -> &RedisBroker {
        &self.brokers[0]
    }

    /// Whether every server's round trip succeeded recently.
    pub fn is_healthy(&self) -> bool {
        self.brokers.iter().all(RedisBroker::is_healthy)
    }
}

impl SubscriptionRequest {
    /// The group the request is about.
    pub fn group(&self) -> &Group {
        match self {
            Self::Subscribe { group, .. } | Self::Unsubscribe { group, .. } => group,
        }
    }
}
