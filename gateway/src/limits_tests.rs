use std::net::IpAddr;
use std::time::Duration;

use super::*;

fn settings() -> Settings {
    Settings {
        max_connections: 100,
        max_pending_handshakes: 100,
        max_pending_requests: 100,
        max_connections_per_user: 0,
        max_connections_per_address: 0,
        connects_per_second_per_address: 0,
        publishes_per_second: 0,
        trusted_proxies: TrustedProxies::default(),
    }
}

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

/// Limits as `settings()` has them, but for what `change` sets.
fn limits_with(change: impl FnOnce(&mut Settings)) -> Arc<Limits> {
    let mut settings = settings();
    change(&mut settings);
    Limits::new(settings)
}

/// Admits `user` from `address`, which must be within every limit.
fn admit(limits: &Arc<Limits>, user: &str, address: &str) -> ConnectionPermit {
    limits.try_admit(user, ip(address)).unwrap()
}

/// The limit that refuses `user` from `address`.
fn refused_admission(limits: &Arc<Limits>, user: &str, address: &str) -> Limit {
    refused(limits.try_admit(user, ip(address)))
}

/// The limit that refused `result`.
fn refused<T: std::fmt::Debug>(result: Result<T, Refusal>) -> Limit {
    result.expect_err("admitted past a limit").limit
}

#[test]
fn the_global_connection_limit_refuses_the_next_one_until_a_connection_closes() {
    let limits = limits_with(|s| s.max_connections = 2);
    let first = admit(&limits, "a", "10.0.0.1");
    let _second = admit(&limits, "b", "10.0.0.2");
    assert_eq!(
        refused_admission(&limits, "c", "10.0.0.3"),
        Limit::Connections
    );
    assert!(Limit::Connections.is_global());
    drop(first);
    assert!(limits.try_admit("c", ip("10.0.0.3")).is_ok());
}

#[test]
fn pending_handshakes_are_freed_when_the_handshake_completes_and_the_connection_stays_counted() {
    let limits = limits_with(|s| s.max_pending_handshakes = 1);
    let first = admit(&limits, "a", "10.0.0.1");
    assert_eq!(
        refused_admission(&limits, "b", "10.0.0.1"),
        Limit::PendingHandshakes
    );
    first.handshake_completed();
    first.handshake_completed(); // twice gives back nothing more
    let usage = limits.usage();
    assert_eq!((usage.connections, usage.pending_handshakes), (1, 0));
    let second = admit(&limits, "b", "10.0.0.1");
    assert_eq!(limits.usage().pending_handshakes, 1);
    drop(second);
    drop(first);
    assert_eq!(limits.usage().connections, 0);
    assert_eq!(limits.usage().pending_handshakes, 0);
}

#[test]
fn a_connection_dropped_during_its_handshake_gives_back_both_slots() {
    let limits = Limits::new(settings());
    let permit = admit(&limits, "a", "10.0.0.1");
    drop(permit);
    let usage = limits.usage();
    assert_eq!((usage.connections, usage.pending_handshakes), (0, 0));
}

#[test]
fn a_user_at_its_limit_is_refused_others_are_not_and_the_entry_goes_at_zero() {
    let limits = limits_with(|s| s.max_connections_per_user = 2);
    let a1 = admit(&limits, "alice", "10.0.0.1");
    let a2 = admit(&limits, "alice", "10.0.0.2");
    assert_eq!(
        refused_admission(&limits, "alice", "10.0.0.3"),
        Limit::ConnectionsPerUser
    );
    assert!(!Limit::ConnectionsPerUser.is_global());
    let bob = admit(&limits, "bob", "10.0.0.1");
    assert_eq!(limits.usage().users, 2);
    drop((a1, a2, bob));
    assert_eq!(limits.usage().users, 0, "map entries are removed at zero");
    assert!(limits.try_admit("alice", ip("10.0.0.3")).is_ok());
}

#[test]
fn an_address_at_its_limit_is_refused_and_ipv6_counts_per_64() {
    let limits = limits_with(|s| s.max_connections_per_address = 1);
    let v4 = admit(&limits, "a", "10.0.0.1");
    assert_eq!(
        refused_admission(&limits, "b", "10.0.0.1"),
        Limit::ConnectionsPerAddress
    );
    assert_eq!(
        refused_admission(&limits, "b", "::ffff:10.0.0.1"),
        Limit::ConnectionsPerAddress,
        "an IPv4-mapped address is the IPv4 address"
    );
    let v6 = admit(&limits, "c", "2001:db8:1:2::1");
    assert_eq!(
        refused_admission(&limits, "d", "2001:db8:1:2::ffff"),
        Limit::ConnectionsPerAddress
    );
    assert!(limits.try_admit("d", ip("2001:db8:1:3::1")).is_ok());
    drop((v4, v6));
    assert_eq!(limits.usage().addresses, 0);
}

#[test]
fn unlimited_permits_count_against_nothing() {
    let permit = ConnectionPermit::unlimited();
    permit.handshake_completed();
    drop(permit);
}

#[tokio::test(start_paused = true)]
async fn the_connect_bucket_allows_a_burst_then_refills_at_the_rate() {
    let limits = limits_with(|s| s.connects_per_second_per_address = 2);
    let address = ip("10.0.0.1");
    assert!(limits.try_connect(address).is_ok());
    assert!(limits.try_connect(address).is_ok());
    let refusal = limits.try_connect(address).unwrap_err();
    assert_eq!(refusal.limit, Limit::ConnectRate);
    assert_eq!(refusal.retry_after, Duration::from_secs(1));
    assert!(
        limits.try_connect(ip("10.0.0.2")).is_ok(),
        "other addresses have their own bucket"
    );
    tokio::time::advance(Duration::from_millis(500)).await;
    assert!(
        limits.try_connect(address).is_ok(),
        "one token back after 0.5 s"
    );
    assert_eq!(refused(limits.try_connect(address)), Limit::ConnectRate);
}

#[tokio::test(start_paused = true)]
async fn full_connect_buckets_are_swept_so_the_map_stays_bounded() {
    let limits = limits_with(|s| s.connects_per_second_per_address = 1);
    for i in 0..MIN_SWEEP as u32 {
        limits.try_connect(IpAddr::V4(i.into())).unwrap();
    }
    assert_eq!(limits.usage().connect_buckets, MIN_SWEEP);
    tokio::time::advance(Duration::from_secs(1)).await;
    limits.try_connect(ip("192.0.2.1")).unwrap();
    assert_eq!(limits.usage().connect_buckets, 1);
}

#[tokio::test(start_paused = true)]
async fn the_publish_bucket_refuses_past_its_rate_with_a_retry_after() {
    let limits = limits_with(|s| s.publishes_per_second = 3);
    for _ in 0..3 {
        limits.try_publish().unwrap();
    }
    let refusal = limits.try_publish().unwrap_err();
    assert_eq!(refusal.limit, Limit::PublishRate);
    assert_eq!(refusal.retry_after, Duration::from_secs(1));
    tokio::time::advance(Duration::from_secs(1)).await;
    for _ in 0..3 {
        limits.try_publish().unwrap();
    }
    assert_eq!(refused(limits.try_publish()), Limit::PublishRate);
}

#[tokio::test(start_paused = true)]
async fn a_batch_takes_one_token_per_event_or_none() {
    let limits = limits_with(|s| s.publishes_per_second = 10);
    limits.try_publish_many(7).unwrap();
    // Three left: a batch of four takes nothing, so single publishes still get all three.
    assert_eq!(refused(limits.try_publish_many(4)), Limit::PublishRate);
    for _ in 0..3 {
        limits.try_publish().unwrap();
    }
    assert_eq!(refused(limits.try_publish()), Limit::PublishRate);
    tokio::time::advance(Duration::from_secs(1)).await;
    limits.try_publish_many(10).unwrap();
    // More than a full bucket is never granted; the wait named is a full bucket's.
    tokio::time::advance(Duration::from_secs(5)).await;
    let refusal = limits.try_publish_many(11).unwrap_err();
    assert_eq!(refusal.retry_after, Duration::from_secs(1));
}

#[test]
fn a_zero_rate_turns_the_buckets_off() {
    let limits = Limits::new(settings());
    for _ in 0..10_000 {
        limits.try_connect(ip("10.0.0.1")).unwrap();
        limits.try_publish().unwrap();
    }
    assert_eq!(limits.usage().connect_buckets, 0);
}

#[test]
fn pending_request_slots_are_capped_and_given_back_on_drop() {
    let limits = limits_with(|s| s.max_pending_requests = 2);
    let a = limits.try_pending_request().unwrap();
    let _b = limits.try_pending_request().unwrap();
    assert_eq!(
        refused(limits.try_pending_request()),
        Limit::PendingRequests
    );
    drop(a);
    assert!(limits.try_pending_request().is_ok());
}

/// Resolves the client of `peer` with `header` through proxies `trusted`, compared with `expected`.
fn check_client(trusted: &[&str], peer: &str, header: Option<&str>, expected: &str) {
    let proxies = TrustedProxies::new(trusted.iter().map(|t| t.parse().unwrap()).collect());
    assert_eq!(
        proxies.client(ip(peer), header),
        ip(expected),
        "trusted {trusted:?}, peer {peer}, X-Forwarded-For {header:?}"
    );
}

#[test]
fn x_forwarded_for_is_believed_only_from_trusted_proxies() {
    // No proxies trusted: the header is ignored.
    check_client(&[], "203.0.113.9", Some("198.51.100.1"), "203.0.113.9");
    // An untrusted peer cannot name someone else.
    check_client(
        &["10.0.0.0/8"],
        "203.0.113.9",
        Some("1.2.3.4"),
        "203.0.113.9",
    );
    // A trusted proxy names the client; entries left of it were written by the client.
    check_client(
        &["10.0.0.5"],
        "10.0.0.5",
        Some("6.6.6.6, 198.51.100.1"),
        "198.51.100.1",
    );
    // Through two trusted hops.
    check_client(
        &["10.0.0.0/8"],
        "10.0.0.5",
        Some("198.51.100.1, 10.1.1.1"),
        "198.51.100.1",
    );
    // Trusted peer without the header, or with garbage: the peer.
    check_client(&["10.0.0.0/8"], "10.0.0.5", None, "10.0.0.5");
    check_client(&["10.0.0.0/8"], "10.0.0.5", Some("unknown"), "10.0.0.5");
    // IPv6 networks and IPv4-mapped peers.
    check_client(&["fd00::/8"], "fd00::1", Some("2001:db8::7"), "2001:db8::7");
    check_client(
        &["127.0.0.1"],
        "::ffff:127.0.0.1",
        Some("192.0.2.4"),
        "192.0.2.4",
    );
}

#[test]
fn networks_parse_with_and_without_a_prefix_and_bad_ones_are_refused() {
    for good in ["10.0.0.0/8", "127.0.0.1", "::1", "fd00::/8", "0.0.0.0/0"] {
        assert!(good.parse::<IpNet>().is_ok(), "{good}");
    }
    for bad in ["10.0.0.0/33", "fd00::/129", "nginx", "10.0.0.0/x", ""] {
        assert_eq!(
            bad.parse::<IpNet>(),
            Err(format!(
                "`{bad}` is not an IP address or network like 10.0.0.0/8"
            ))
        );
    }
    let everything: IpNet = "0.0.0.0/0".parse().unwrap();
    assert!(everything.contains(ip("192.0.2.1")));
    assert!(!everything.contains(ip("::1")));
}

#[test]
fn every_limit_has_a_distinct_label_and_a_reason() {
    let all = [
        Limit::Connections,
        Limit::PendingHandshakes,
        Limit::PendingRequests,
        Limit::ConnectionsPerUser,
        Limit::ConnectionsPerAddress,
        Limit::ConnectRate,
        Limit::PublishRate,
    ];
    let labels: std::collections::HashSet<_> = all.iter().map(|l| l.label()).collect();
    assert_eq!(labels.len(), all.len());
    assert!(all.iter().all(|l| !l.reason().is_empty()));
}
