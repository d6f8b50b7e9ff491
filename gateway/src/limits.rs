//! Admission limits: how many connections, handshakes, connects and publishes are let in.
//!
//! Pure bookkeeping: counters and token buckets behind one short-held mutex, and RAII permits
//! that give their slots back when dropped, so every exit path of a connection (an error, a
//! panic, a failed upgrade) releases them. Map entries are removed when their count reaches
//! zero, and full token buckets are swept, so no map grows without bound. Time comes from
//! `tokio::time::Instant` so buckets are tested with paused time. Nothing here knows HTTP:
//! `http` turns a [`Limit`] into a status, a body and `Retry-After`.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use crate::metrics;

/// A limit that refused something. Each has a fixed metrics label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// The replica holds `--max-connections` WebSockets.
    Connections,
    /// `--max-pending-handshakes` connections are between their upgrade and their handshake.
    PendingHandshakes,
    /// `--max-pending-requests` HTTP connections have not sent a full request head yet.
    PendingRequests,
    /// This user holds `--max-connections-per-user` WebSockets.
    ConnectionsPerUser,
    /// This address holds `--max-connections-per-address` WebSockets.
    ConnectionsPerAddress,
    /// This address opened more than `--max-connects-per-second-per-address`.
    ConnectRate,
    /// The service key published more than `--max-publishes-per-second`.
    PublishRate,
}

impl Limit {
    /// Low-cardinality label for `gateway_limit_exceeded_total{limit}`.
    pub fn label(self) -> &'static str {
        match self {
            Self::Connections => "connections",
            Self::PendingHandshakes => "pending_handshakes",
            Self::PendingRequests => "pending_requests",
            Self::ConnectionsPerUser => "connections_per_user",
            Self::ConnectionsPerAddress => "connections_per_address",
            Self::ConnectRate => "connect_rate",
            Self::PublishRate => "publish_rate",
        }
    }

    /// Whether the limit is the whole replica's (answered 503, another replica may have room)
    /// rather than one client's (answered 429).
    pub fn is_global(self) -> bool {
        matches!(
            self,
            Self::Connections | Self::PendingHandshakes | Self::PendingRequests
        )
    }

    /// A short sentence naming the limit, for the response body.
    pub fn reason(self) -> &'static str {
        match self {
            Self::Connections => "too many connections on this server",
            Self::PendingHandshakes => "too many connections waiting for their handshake",
            Self::PendingRequests => "too many unfinished HTTP requests",
            Self::ConnectionsPerUser => "too many connections for this user",
            Self::ConnectionsPerAddress => "too many connections from this address",
            Self::ConnectRate => "too many new connections from this address",
            Self::PublishRate => "too many publishes for this service key",
        }
    }
}

/// A refusal: which limit, and when trying again may help.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    /// The limit that refused.
    pub limit: Limit,
    /// When a retry may succeed (whole seconds, at least one).
    pub retry_after: Duration,
}

impl Refusal {
    fn new(limit: Limit, retry_after: Duration) -> Self {
        metrics::limit_exceeded(limit.label());
        Self { limit, retry_after }
    }
}

/// The admission settings, taken once from the configuration; `0` turns a limit off where
/// the configuration allows it.
#[derive(Debug, Clone)]
pub struct Settings {
    /// WebSockets this replica holds at most.
    pub max_connections: usize,
    /// Connections between upgrade and completed handshake at most.
    pub max_pending_handshakes: usize,
    /// HTTP connections that have not sent a full request head at most.
    pub max_pending_requests: usize,
    /// WebSockets one user (`sub`) holds at most; 0 = no limit.
    pub max_connections_per_user: usize,
    /// WebSockets one source address holds at most; 0 = no limit.
    pub max_connections_per_address: usize,
    /// New WebSockets per second per source address (burst the same); 0 = no limit.
    pub connects_per_second_per_address: u32,
    /// HTTP publishes per second per service key (burst the same); 0 = no limit.
    pub publishes_per_second: u32,
    /// Proxies whose `X-Forwarded-For` names the client; empty = the TCP peer is the client.
    pub trusted_proxies: TrustedProxies,
}

/// How long a client refused by a count (not a rate) is asked to wait.
const COUNT_RETRY_AFTER: Duration = Duration::from_secs(5);
/// How long a client refused for pending handshakes is asked to wait: handshakes are quick.
const PENDING_RETRY_AFTER: Duration = Duration::from_secs(1);

/// The replica's admission bookkeeping.
#[derive(Debug)]
pub struct Limits {
    settings: Settings,
    state: Mutex<State>,
    pending_requests: AtomicUsize,
}

#[derive(Debug)]
struct State {
    connections: usize,
    pending_handshakes: usize,
    per_user: HashMap<Box<str>, usize>,
    per_address: HashMap<IpAddr, usize>,
    connects: Buckets<IpAddr>,
    publishes: TokenBucket,
}

impl Limits {
    /// Bookkeeping for `settings`, with nothing admitted yet.
    pub fn new(settings: Settings) -> Arc<Self> {
        let now = Instant::now();
        Arc::new(Self {
            state: Mutex::new(State {
                connections: 0,
                pending_handshakes: 0,
                per_user: HashMap::new(),
                per_address: HashMap::new(),
                connects: Buckets::new(settings.connects_per_second_per_address),
                publishes: TokenBucket::full(settings.publishes_per_second, now),
            }),
            pending_requests: AtomicUsize::new(0),
            settings,
        })
    }

    /// The settings in force.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The address limits apply to: the TCP peer, or the client a trusted proxy names.
    pub fn client_address(&self, peer: IpAddr, forwarded_for: Option<&str>) -> IpAddr {
        self.settings.trusted_proxies.client(peer, forwarded_for)
    }

    /// Takes one new connection from `address` out of its bucket; checked before the token so
    /// a flood costs no signature checks.
    ///
    /// # Errors
    /// [`Limit::ConnectRate`] when the address's bucket is empty.
    pub fn try_connect(&self, address: IpAddr) -> Result<(), Refusal> {
        let now = Instant::now();
        let mut state = self.lock();
        state
            .connects
            .try_take(address_key(address), now)
            .map_err(|wait| Refusal::new(Limit::ConnectRate, wait))
    }

    /// Admits one WebSocket of `user` from `address`, in its handshake.
    ///
    /// # Errors
    /// The first limit that refuses, global limits first.
    pub fn try_admit(
        self: &Arc<Self>,
        user: &str,
        address: IpAddr,
    ) -> Result<ConnectionPermit, Refusal> {
        let address = address_key(address);
        let s = &self.settings;
        let mut state = self.lock();
        if state.connections >= s.max_connections {
            return Err(Refusal::new(Limit::Connections, COUNT_RETRY_AFTER));
        }
        if state.pending_handshakes >= s.max_pending_handshakes {
            return Err(Refusal::new(Limit::PendingHandshakes, PENDING_RETRY_AFTER));
        }
        if s.max_connections_per_user > 0
            && state.per_user.get(user).copied().unwrap_or(0) >= s.max_connections_per_user
        {
            return Err(Refusal::new(Limit::ConnectionsPerUser, COUNT_RETRY_AFTER));
        }
        if s.max_connections_per_address > 0
            && state.per_address.get(&address).copied().unwrap_or(0)
                >= s.max_connections_per_address
        {
            return Err(Refusal::new(
                Limit::ConnectionsPerAddress,
                COUNT_RETRY_AFTER,
            ));
        }
        state.connections += 1;
        state.pending_handshakes += 1;
        if s.max_connections_per_user > 0 {
            *state.per_user.entry(user.into()).or_insert(0) += 1;
        }
        if s.max_connections_per_address > 0 {
            *state.per_address.entry(address).or_insert(0) += 1;
        }
        Ok(ConnectionPermit {
            limits: Some(Arc::clone(self)),
            user: (s.max_connections_per_user > 0).then(|| user.into()),
            address: (s.max_connections_per_address > 0).then_some(address),
            handshaking: AtomicBool::new(true),
        })
    }

    /// Takes one publish out of the service key's bucket.
    ///
    /// # Errors
    /// [`Limit::PublishRate`] when the bucket is empty.
    pub fn try_publish(&self) -> Result<(), Refusal> {
        self.try_publish_many(1)
    }

    /// Takes `events` publishes out of the service key's bucket at once (a batch), or none.
    ///
    /// # Errors
    /// [`Limit::PublishRate`] when the bucket holds fewer.
    pub fn try_publish_many(&self, events: u32) -> Result<(), Refusal> {
        let rate = self.settings.publishes_per_second;
        if rate == 0 {
            return Ok(());
        }
        let now = Instant::now();
        self.lock()
            .publishes
            .try_take_many(rate, events, now)
            .map_err(|wait| Refusal::new(Limit::PublishRate, wait))
    }

    /// The publishes per second allowed per service key; 0 when unlimited.
    pub fn publishes_per_second(&self) -> u32 {
        self.settings.publishes_per_second
    }

    /// A slot for an HTTP connection until its first request head arrives.
    ///
    /// # Errors
    /// [`Limit::PendingRequests`] when all slots are taken.
    pub fn try_pending_request(self: &Arc<Self>) -> Result<PendingRequestPermit, Refusal> {
        let max = self.settings.max_pending_requests;
        self.pending_requests
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .map_err(|_| Refusal::new(Limit::PendingRequests, PENDING_RETRY_AFTER))?;
        Ok(PendingRequestPermit {
            limits: Arc::clone(self),
        })
    }

    /// What is held now, for tests and diagnostics.
    pub fn usage(&self) -> Usage {
        let state = self.lock();
        Usage {
            connections: state.connections,
            pending_handshakes: state.pending_handshakes,
            pending_requests: self.pending_requests.load(Ordering::Acquire),
            users: state.per_user.len(),
            addresses: state.per_address.len(),
            connect_buckets: state.connects.len(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // The sections below cannot panic half-way; a poisoned lock still holds valid counts.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn release(&self, permit: &ConnectionPermit) {
        let mut state = self.lock();
        state.connections = state.connections.saturating_sub(1);
        if permit.handshaking.swap(false, Ordering::AcqRel) {
            state.pending_handshakes = state.pending_handshakes.saturating_sub(1);
        }
        if let Some(user) = &permit.user {
            decrement(&mut state.per_user, user.as_ref());
        }
        if let Some(address) = &permit.address {
            decrement(&mut state.per_address, address);
        }
    }

    fn handshake_done(&self) {
        let mut state = self.lock();
        state.pending_handshakes = state.pending_handshakes.saturating_sub(1);
    }
}

/// What [`Limits`] holds at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    /// WebSockets admitted and not yet closed.
    pub connections: usize,
    /// Of those, the ones still in their handshake.
    pub pending_handshakes: usize,
    /// HTTP connections without a full request head.
    pub pending_requests: usize,
    /// Users with a counted connection.
    pub users: usize,
    /// Addresses with a counted connection.
    pub addresses: usize,
    /// Addresses whose connect bucket is not full.
    pub connect_buckets: usize,
}

/// One admitted WebSocket's slots; dropping it gives them back.
#[derive(Debug)]
pub struct ConnectionPermit {
    limits: Option<Arc<Limits>>,
    user: Option<Box<str>>,
    address: Option<IpAddr>,
    handshaking: AtomicBool,
}

impl ConnectionPermit {
    /// A permit that counts against nothing, for connections driven in tests.
    pub fn unlimited() -> Self {
        Self {
            limits: None,
            user: None,
            address: None,
            handshaking: AtomicBool::new(false),
        }
    }

    /// The handshake completed: give the pending-handshake slot back, keep the connection's.
    pub fn handshake_completed(&self) {
        if self.handshaking.swap(false, Ordering::AcqRel)
            && let Some(limits) = &self.limits
        {
            limits.handshake_done();
        }
    }
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        if let Some(limits) = self.limits.take() {
            limits.release(self);
        }
    }
}

/// An HTTP connection's slot until its first request head arrives; dropping it gives it back.
#[derive(Debug)]
pub struct PendingRequestPermit {
    limits: Arc<Limits>,
}

impl Drop for PendingRequestPermit {
    fn drop(&mut self) {
        self.limits.pending_requests.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Proxies trusted to name the client in `X-Forwarded-For`.
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies(Vec<IpNet>);

impl TrustedProxies {
    /// Trusts these networks.
    pub fn new(networks: Vec<IpNet>) -> Self {
        Self(networks)
    }

    /// Whether `address` is a trusted proxy.
    pub fn contains(&self, address: IpAddr) -> bool {
        let address = address.to_canonical();
        self.0.iter().any(|net| net.contains(address))
    }

    /// The client: the peer itself unless it is a trusted proxy; then the right-most
    /// `X-Forwarded-For` entry that is not a trusted proxy (entries further left were written
    /// by the client and prove nothing). Unparsable entries stop the walk at the last trusted
    /// hop.
    pub fn client(&self, peer: IpAddr, forwarded_for: Option<&str>) -> IpAddr {
        let peer = peer.to_canonical();
        if !self.contains(peer) {
            return peer;
        }
        let Some(header) = forwarded_for else {
            return peer;
        };
        let mut client = peer;
        for entry in header.rsplit(',') {
            let Ok(hop) = IpAddr::from_str(entry.trim()) else {
                break;
            };
            client = hop.to_canonical();
            if !self.contains(client) {
                break;
            }
        }
        client
    }
}

/// An IP network such as `10.0.0.0/8` or a single address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpNet {
    address: IpAddr,
    prefix: u8,
}

impl IpNet {
    /// Whether `address` is in the network.
    pub fn contains(&self, address: IpAddr) -> bool {
        match (self.address, address) {
            (IpAddr::V4(net), IpAddr::V4(a)) => {
                prefix_matches(u32::from(net).into(), u32::from(a).into(), 32, self.prefix)
            }
            (IpAddr::V6(net), IpAddr::V6(a)) => {
                prefix_matches(u128::from(net), u128::from(a), 128, self.prefix)
            }
            _ => false,
        }
    }
}

impl FromStr for IpNet {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || format!("`{text}` is not an IP address or network like 10.0.0.0/8");
        let (address, prefix) = match text.split_once('/') {
            Some((address, prefix)) => (address, Some(prefix)),
            None => (text, None),
        };
        let address = IpAddr::from_str(address.trim()).map_err(|_| bad())?;
        let bits = if address.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => bits,
            Some(prefix) => prefix.trim().parse::<u8>().map_err(|_| bad())?,
        };
        if prefix > bits {
            return Err(bad());
        }
        Ok(Self {
            address: address.to_canonical(),
            prefix,
        })
    }
}

fn prefix_matches(net: u128, address: u128, bits: u8, prefix: u8) -> bool {
    if prefix == 0 {
        return true;
    }
    let shift = u32::from(bits - prefix);
    (net >> shift) == (address >> shift)
}

/// The key an address is counted under: IPv6 by its /64, which one host usually holds whole.
fn address_key(address: IpAddr) -> IpAddr {
    match address.to_canonical() {
        IpAddr::V6(v6) => IpAddr::V6((u128::from(v6) & !u128::from(u64::MAX)).into()),
        v4 => v4,
    }
}

fn decrement<K, Q>(map: &mut HashMap<K, usize>, key: &Q)
where
    K: std::borrow::Borrow<Q> + Hash + Eq,
    Q: Hash + Eq + ?Sized,
{
    if let Some(count) = map.get_mut(key) {
        *count = count.saturating_sub(1);
        if *count == 0 {
            map.remove(key);
        }
    }
}

/// A token bucket holding up to `rate` tokens, refilled at `rate` per second.
#[derive(Debug, Clone, Copy)]
pub struct TokenBucket {
    tokens: f64,
    updated: Instant,
}

impl TokenBucket {
    /// A full bucket for `rate` at `now`.
    pub fn full(rate: u32, now: Instant) -> Self {
        Self {
            tokens: f64::from(rate),
            updated: now,
        }
    }

    /// Takes one token at `now`.
    ///
    /// # Errors
    /// How long until a token is back (whole seconds, at least one), when the bucket is empty.
    pub fn try_take(&mut self, rate: u32, now: Instant) -> Result<(), Duration> {
        self.try_take_many(rate, 1, now)
    }

    /// Takes `count` tokens at `now`, or none.
    ///
    /// # Errors
    /// How long until that many are back (whole seconds, at least one). A bucket never holds
    /// more than `rate`: asking for more is refused for the time a full bucket takes.
    pub fn try_take_many(&mut self, rate: u32, count: u32, now: Instant) -> Result<(), Duration> {
        self.refill(rate, now);
        let wanted = f64::from(count);
        if self.tokens >= wanted {
            self.tokens -= wanted;
            Ok(())
        } else {
            let missing =
                (wanted.min(f64::from(rate)) - self.tokens).max(0.0) / f64::from(rate.max(1));
            Err(Duration::from_secs(missing.ceil().max(1.0) as u64))
        }
    }

    /// Whether the bucket is full at `now` (so forgetting it changes nothing).
    pub fn is_full(&self, rate: u32, now: Instant) -> bool {
        let mut bucket = *self;
        bucket.refill(rate, now);
        bucket.tokens >= f64::from(rate)
    }

    fn refill(&mut self, rate: u32, now: Instant) {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.tokens = (self.tokens + elapsed * f64::from(rate)).min(f64::from(rate));
        self.updated = now;
    }
}

/// One token bucket per key, for keys that used some of theirs recently.
#[derive(Debug)]
struct Buckets<K> {
    rate: u32,
    buckets: HashMap<K, TokenBucket>,
    /// Sweep full buckets when the map reaches this size.
    sweep_at: usize,
}

/// Smallest map size at which full buckets are swept.
const MIN_SWEEP: usize = 1024;

impl<K: Hash + Eq + Copy> Buckets<K> {
    fn new(rate: u32) -> Self {
        Self {
            rate,
            buckets: HashMap::new(),
            sweep_at: MIN_SWEEP,
        }
    }

    fn try_take(&mut self, key: K, now: Instant) -> Result<(), Duration> {
        if self.rate == 0 {
            return Ok(());
        }
        if self.buckets.len() >= self.sweep_at {
            let rate = self.rate;
            self.buckets.retain(|_, bucket| !bucket.is_full(rate, now));
            // Amortised: the next sweep waits until the map has doubled again.
            self.sweep_at = (self.buckets.len() * 2).max(MIN_SWEEP);
        }
        let rate = self.rate;
        self.buckets
            .entry(key)
            .or_insert_with(|| TokenBucket::full(rate, now))
            .try_take(rate, now)
    }

    fn len(&self) -> usize {
        self.buckets.len()
    }
}

#[cfg(test)]
#[path = "limits_tests.rs"]
mod tests;
