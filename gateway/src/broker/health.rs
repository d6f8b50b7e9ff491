//! The Redis broker's readiness round trip, as state: which health channels a session probes
//! (one, or one per cluster master) and when each last came back.

use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;

/// The health channels of one subscriber session and their last round trips.
#[derive(Debug)]
pub(super) struct RoundTrips {
    /// Each channel with the time its probe last came back, or since it is probed.
    channels: HashMap<String, Trip>,
}

#[derive(Debug, Clone, Copy)]
struct Trip {
    /// Since when it is probed.
    watched: Instant,
    /// Its last round trip.
    last: Option<Instant>,
    /// Added to a healthy session (a new master): it counts as healthy for the grace period
    /// before its first round trip, so the replica does not flap out of the load balancer.
    /// The channels a session starts with must come back before it is ready.
    grace_first: bool,
}

impl RoundTrips {
    /// Probing `channels` from `now`.
    pub(super) fn new(channels: &[String], now: Instant) -> Self {
        let mut trips = Self {
            channels: HashMap::new(),
        };
        trips.replace(channels, now);
        for trip in trips.channels.values_mut() {
            trip.grace_first = false;
        }
        trips
    }

    /// The channels to probe.
    pub(super) fn channels(&self) -> impl Iterator<Item = &String> {
        self.channels.keys()
    }

    /// Whether `channel` is one of them.
    pub(super) fn is_health(&self, channel: &[u8]) -> bool {
        std::str::from_utf8(channel).is_ok_and(|name| self.channels.contains_key(name))
    }

    /// `channel`'s probe came back at `now`.
    pub(super) fn came_back(&mut self, channel: &[u8], now: Instant) {
        if let Some(trip) = std::str::from_utf8(channel)
            .ok()
            .and_then(|name| self.channels.get_mut(name))
        {
            trip.last = Some(now);
        }
    }

    /// Probes `channels` from now on: new ones are watched from `now`, kept ones keep their
    /// history. Returns the channels added and the ones dropped.
    pub(super) fn replace(
        &mut self,
        channels: &[String],
        now: Instant,
    ) -> (Vec<String>, Vec<String>) {
        let dropped: Vec<String> = self
            .channels
            .keys()
            .filter(|name| !channels.contains(name))
            .cloned()
            .collect();
        for name in &dropped {
            self.channels.remove(name);
        }
        let mut added = Vec::new();
        for name in channels {
            if !self.channels.contains_key(name) {
                self.channels.insert(
                    name.clone(),
                    Trip {
                        watched: now,
                        last: None,
                        grace_first: true,
                    },
                );
                added.push(name.clone());
            }
        }
        (added, dropped)
    }

    /// Whether every channel came back within `grace` of `now` (a channel added later: or is
    /// watched for less than `grace`).
    pub(super) fn healthy(&self, now: Instant, grace: Duration) -> bool {
        !self.channels.is_empty()
            && self.channels.values().all(|trip| match trip.last {
                Some(at) => now - at <= grace,
                None => trip.grace_first && now - trip.watched <= grace,
            })
    }

    /// The longest any channel has gone without a round trip (since it is watched, if it never
    /// came back).
    pub(super) fn longest_silence(&self, now: Instant) -> Duration {
        self.channels
            .values()
            .map(|trip| now - trip.last.unwrap_or(trip.watched))
            .max()
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GRACE: Duration = Duration::from_secs(3);

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn healthy_only_once_every_channel_came_back_within_the_grace() {
        let start = Instant::now();
        let mut trips = RoundTrips::new(&names(&["a", "b"]), start);
        assert!(!trips.healthy(start, GRACE), "nothing came back yet");
        trips.came_back(b"a", start);
        assert!(!trips.healthy(start, GRACE), "b has not");
        trips.came_back(b"b", start);
        assert!(trips.healthy(start, GRACE));
        tokio::time::advance(Duration::from_secs(4)).await;
        trips.came_back(b"a", Instant::now());
        assert!(!trips.healthy(Instant::now(), GRACE), "b is stale");
        assert_eq!(
            trips.longest_silence(Instant::now()),
            Duration::from_secs(4)
        );
        trips.came_back(b"other", Instant::now());
        assert!(!trips.is_health(b"other"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_channel_is_silent_since_it_is_watched_and_kept_ones_keep_their_trips() {
        let start = Instant::now();
        let mut trips = RoundTrips::new(&names(&["a", "b"]), start);
        trips.came_back(b"a", start);
        trips.came_back(b"b", start);
        tokio::time::advance(Duration::from_secs(1)).await;
        let (added, dropped) = trips.replace(&names(&["a", "c"]), Instant::now());
        assert_eq!((added, dropped), (names(&["c"]), names(&["b"])));
        assert!(
            trips.healthy(Instant::now(), GRACE),
            "c, added to a healthy session, has the grace to come back"
        );
        tokio::time::advance(Duration::from_millis(2500)).await;
        assert!(!trips.healthy(Instant::now(), GRACE), "a is stale now");
        trips.came_back(b"a", Instant::now() - Duration::from_secs(1));
        assert_eq!(
            trips.longest_silence(Instant::now()),
            Duration::from_millis(2500),
            "a: 1 s since its trip; c: 2.5 s since it is watched"
        );
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(!trips.healthy(Instant::now(), GRACE), "c never came back");
        trips.came_back(b"a", Instant::now());
        trips.came_back(b"c", Instant::now());
        assert!(trips.healthy(Instant::now(), GRACE));
    }
}
