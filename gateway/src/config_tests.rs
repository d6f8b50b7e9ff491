//! Configuration from argument lists: defaults, parsing, and every problem at once.
//!
//! Tests build configurations from words only and never touch the environment.

use std::net::SocketAddr;
use std::time::Duration;

use super::{Cli, Command, Config, ConfigError, LogFormat, Secret, TokenRole, parse_bytes};
use crate::auth::Algorithm;

const SECRET: &str = "0123456789abcdef0123456789abcdef";

/// Parses `gateway <args>`, validates, and compares with `expected` (`Err` = every problem).
fn check(args: &[&str], expected: Result<(), &[&str]>) {
    let config = parse(args);
    let got = config.validate().map_err(|ConfigError(problems)| problems);
    let expected =
        expected.map_err(|problems| problems.iter().map(|p| (*p).to_owned()).collect::<Vec<_>>());
    assert_eq!(got, expected, "for {args:?}");
}

fn parse(args: &[&str]) -> Config {
    Config::try_from_args(std::iter::once("gateway").chain(args.iter().copied()))
        .unwrap_or_else(|e| panic!("{args:?} does not parse: {e}"))
}

fn parse_error(args: &[&str]) -> clap::Error {
    match Config::try_from_args(std::iter::once("gateway").chain(args.iter().copied())) {
        Ok(config) => panic!("{args:?} parsed into {config:?}"),
        Err(e) => e,
    }
}

fn parse_cli(words: &[&str]) -> Cli {
    use clap::Parser;
    Cli::try_parse_from(std::iter::once("gateway").chain(words.iter().copied())).unwrap()
}

#[test]
fn defaults_fill_everything_but_the_secret() {
    let config = parse(&["--jwt-secret", SECRET]);
    assert!(!config.dev);
    assert_eq!(
        config.listen.public,
        "0.0.0.0:8080".parse::<SocketAddr>().unwrap()
    );
    assert_eq!(
        config.listen.admin,
        "127.0.0.1:9090".parse::<SocketAddr>().unwrap()
    );
    assert_eq!(config.auth.jwt_algorithm, Algorithm::Hs256);
    assert_eq!(config.auth.jwt_secret, Some(Secret::new(SECRET)));
    assert_eq!(config.auth.jwt_secret_file, None);
    assert_eq!(config.auth.jwt_public_key_file, None);
    assert_eq!(config.auth.jwt_issuer, None);
    assert_eq!(config.auth.jwt_audience, None);
    assert_eq!(config.auth.service_key, None);
    assert_eq!(config.auth.connection_token_secret, None);
    assert_eq!(config.auth.connection_token_secret_file, None);
    assert!(config.cors.origins.is_empty());
    assert!(!config.cors.allow_missing_origin);
    assert_eq!(config.limits.max_message_bytes, 32 * 1024);
    assert_eq!(config.limits.outbound_queue, 256);
    assert_eq!(config.limits.max_groups_per_connection, 64);
    assert_eq!(config.timeouts.keepalive_interval, Duration::from_secs(15));
    assert_eq!(config.timeouts.client_timeout, Duration::from_secs(30));
    assert_eq!(config.timeouts.handshake_timeout, Duration::from_secs(15));
    assert_eq!(config.timeouts.write_timeout, Duration::from_secs(10));
    assert_eq!(config.timeouts.drain_timeout, Duration::from_secs(10));
    assert_eq!(config.log.format, LogFormat::Text);
    assert_eq!(config.log.filter, "info");
}

#[test]
fn the_defaults_agree_with_the_documented_constants() {
    let config = parse(&["--jwt-secret", SECRET]);
    assert_eq!(
        config.listen.public,
        super::DEFAULT_LISTEN.parse::<SocketAddr>().unwrap()
    );
    assert_eq!(
        config.listen.admin,
        super::DEFAULT_ADMIN_LISTEN.parse::<SocketAddr>().unwrap()
    );
    assert_eq!(
        config.limits.max_message_bytes,
        super::DEFAULT_MAX_MESSAGE_BYTES
    );
    assert_eq!(config.limits.outbound_queue, super::DEFAULT_OUTBOUND_QUEUE);
    assert_eq!(
        config.limits.max_groups_per_connection,
        super::DEFAULT_MAX_GROUPS_PER_CONNECTION
    );
    assert_eq!(
        config.timeouts.keepalive_interval,
        super::DEFAULT_KEEPALIVE_INTERVAL
    );
    assert_eq!(
        config.timeouts.client_timeout,
        super::DEFAULT_CLIENT_TIMEOUT
    );
    assert_eq!(
        config.timeouts.handshake_timeout,
        super::DEFAULT_HANDSHAKE_TIMEOUT
    );
    assert_eq!(config.timeouts.write_timeout, super::DEFAULT_WRITE_TIMEOUT);
    assert_eq!(config.timeouts.drain_timeout, super::DEFAULT_DRAIN_TIMEOUT);
    assert_eq!(
        config.timeouts.header_read_timeout,
        super::DEFAULT_HEADER_READ_TIMEOUT
    );
    let l = &config.limits;
    assert_eq!(
        l.max_invocations_per_second,
        super::DEFAULT_MAX_INVOCATIONS_PER_SECOND
    );
    assert_eq!(l.max_joins_per_second, super::DEFAULT_MAX_JOINS_PER_SECOND);
    assert_eq!(l.max_connections, super::DEFAULT_MAX_CONNECTIONS);
    assert_eq!(
        l.max_pending_handshakes,
        super::DEFAULT_MAX_PENDING_HANDSHAKES
    );
    assert_eq!(l.max_pending_requests, super::DEFAULT_MAX_PENDING_REQUESTS);
    assert_eq!(
        l.max_connections_per_user,
        super::DEFAULT_MAX_CONNECTIONS_PER_USER
    );
    assert_eq!(
        l.max_publishes_per_second,
        super::DEFAULT_MAX_PUBLISHES_PER_SECOND
    );
    // Per-address limits are off by default: behind a load balancer every client shares its
    // address, and nothing from X-Forwarded-For is believed until proxies are named.
    assert_eq!(l.max_connections_per_address, 0);
    assert_eq!(l.max_connects_per_second_per_address, 0);
    assert!(l.trusted_proxies.is_empty());
}

#[test]
fn history_and_prefix_defaults_are_the_contracts_and_help_shows_them() {
    use publisher_lib::contract;
    let history = parse(&["--jwt-secret", SECRET]).history.settings();
    assert_eq!(history.size, contract::DEFAULT_HISTORY_SIZE);
    assert_eq!(history.ttl, contract::DEFAULT_HISTORY_TTL);
    assert_eq!(
        history.idempotency_window,
        contract::DEFAULT_IDEMPOTENCY_WINDOW
    );
    let config = parse(&["--jwt-secret", SECRET]);
    assert_eq!(config.redis.prefix, contract::DEFAULT_PREFIX);

    let help = <Cli as clap::CommandFactory>::command()
        .render_long_help()
        .to_string();
    for shown in [
        "[default: 1000]",
        "[default: 10m]",
        "[default: 5m]",
        "[default: rt:]",
    ] {
        assert!(help.contains(shown), "--help shows {shown}");
    }
}

#[test]
fn a_prefix_with_hash_tag_braces_is_refused() {
    check(
        &["--jwt-secret", SECRET, "--redis-prefix", "rt{x}:"],
        Err(&["--redis-prefix must not contain '{' or '}' (they delimit the hash tag)"]),
    );
}

#[test]
fn redis_urls_name_a_server_a_sentinel_a_cluster_or_several_servers() {
    for url in [
        "redis://127.0.0.1:6379",
        "rediss+sentinel://h1:26379,h2:26379/primary",
        "redis+cluster://h1:7000,h2:7001",
        "redis://h1:6379 redis://h2:6379  rediss://h3:6380",
    ] {
        check(&["--jwt-secret", SECRET, "--redis-url", url], Ok(()));
    }
    let refused = "--redis-url must be one or more URLs (separated by spaces) starting with redis://, rediss://, redis+unix://, redis+sentinel://, rediss+sentinel://, redis+cluster:// or rediss+cluster://";
    for url in ["http://h1:6379", "redis://h1:6379 h2:6379", "  "] {
        check(
            &["--jwt-secret", SECRET, "--redis-url", url],
            Err(&[refused]),
        );
    }
}

#[test]
fn admission_limits_must_leave_room_for_one_and_proxies_must_be_addresses() {
    check(
        &[
            "--jwt-secret",
            SECRET,
            "--max-connections",
            "0",
            "--max-pending-handshakes",
            "0",
            "--max-pending-requests",
            "0",
            "--header-read-timeout",
            "0s",
        ],
        Err(&[
            "--header-read-timeout must be more than zero",
            "--max-connections must be at least 1",
            "--max-pending-handshakes must be at least 1",
            "--max-pending-requests must be at least 1",
        ]),
    );
    let config = parse(&[
        "--jwt-secret",
        SECRET,
        "--trusted-proxies",
        "10.0.0.0/8,fd00::/8,127.0.0.1",
    ]);
    assert_eq!(config.limits.trusted_proxies.len(), 3);
    assert!(
        config
            .limits
            .admission()
            .trusted_proxies
            .contains("10.1.2.3".parse().unwrap())
    );
    let error = parse_error(&["--jwt-secret", SECRET, "--trusted-proxies", "nginx"]);
    assert!(
        error
            .to_string()
            .contains("`nginx` is not an IP address or network"),
        "{error}"
    );
}

#[test]
fn a_config_with_a_secret_and_defaults_is_valid() {
    check(&["--jwt-secret", SECRET], Ok(()));
    check(&["--jwt-secret-file", "/run/secrets/jwt"], Ok(()));
}

#[test]
fn a_config_without_any_key_asks_for_one() {
    check(
        &[],
        Err(&["HS256 needs --jwt-secret or --jwt-secret-file (or use --dev to try the gateway)"]),
    );
}

#[test]
fn every_flag_is_read() {
    let config = parse(&[
        "--listen",
        "127.0.0.1:7000",
        "--admin-listen",
        "127.0.0.1:7001",
        "--jwt-algorithm",
        "rs256",
        "--jwt-public-key-file",
        "/keys/jwt.pem",
        "--jwt-issuer",
        "https://idp.example.com",
        "--jwt-audience",
        "gateway",
        "--service-key",
        "service-key-0123456789",
        "--connection-token-secret",
        "shared-by-every-replica",
        "--cors-origins",
        "https://a.example.com,http://localhost:3000",
        "--allow-missing-origin",
        "--max-message-size",
        "64KiB",
        "--outbound-queue",
        "8",
        "--max-groups-per-connection",
        "3",
        "--keepalive-interval",
        "1500ms",
        "--client-timeout",
        "1m",
        "--handshake-timeout",
        "5s",
        "--write-timeout",
        "2s",
        "--drain-timeout",
        "1m 30s",
        "--log-format",
        "json",
        "--log",
        "debug",
    ]);
    assert_eq!(
        config.listen.public,
        "127.0.0.1:7000".parse::<SocketAddr>().unwrap()
    );
    assert_eq!(
        config.listen.admin,
        "127.0.0.1:7001".parse::<SocketAddr>().unwrap()
    );
    assert_eq!(config.auth.jwt_algorithm, Algorithm::Rs256);
    assert_eq!(
        config.auth.jwt_public_key_file.as_deref(),
        Some(std::path::Path::new("/keys/jwt.pem"))
    );
    assert_eq!(
        config.auth.jwt_issuer.as_deref(),
        Some("https://idp.example.com")
    );
    assert_eq!(config.auth.jwt_audience.as_deref(), Some("gateway"));
    assert_eq!(
        config.auth.service_key,
        Some(Secret::new("service-key-0123456789"))
    );
    assert_eq!(
        config.auth.connection_token_secret,
        Some(Secret::new("shared-by-every-replica"))
    );
    assert_eq!(
        config.cors.origins,
        ["https://a.example.com", "http://localhost:3000"]
    );
    assert!(config.cors.allow_missing_origin);
    assert_eq!(config.limits.max_message_bytes, 64 * 1024);
    assert_eq!(config.limits.outbound_queue, 8);
    assert_eq!(config.limits.max_groups_per_connection, 3);
    assert_eq!(
        config.timeouts.keepalive_interval,
        Duration::from_millis(1500)
    );
    assert_eq!(config.timeouts.client_timeout, Duration::from_secs(60));
    assert_eq!(config.timeouts.handshake_timeout, Duration::from_secs(5));
    assert_eq!(config.timeouts.write_timeout, Duration::from_secs(2));
    assert_eq!(config.timeouts.drain_timeout, Duration::from_secs(90));
    assert_eq!(config.log.format, LogFormat::Json);
    assert_eq!(config.log.filter, "debug");
    check(
        &[
            "--jwt-algorithm",
            "RS256",
            "--jwt-public-key-file",
            "/keys/jwt.pem",
        ],
        Ok(()),
    );
}

#[test]
fn durations_need_a_unit() {
    for (text, expected) in [
        ("15s", Duration::from_secs(15)),
        ("250ms", Duration::from_millis(250)),
        ("2m", Duration::from_secs(120)),
        ("1h", Duration::from_secs(3600)),
    ] {
        let config = parse(&["--drain-timeout", text]);
        assert_eq!(config.timeouts.drain_timeout, expected, "for {text}");
    }
    for text in ["15", "fast", "1x", ""] {
        let error = parse_error(&["--client-timeout", text]);
        assert_eq!(
            error.kind(),
            clap::error::ErrorKind::ValueValidation,
            "for {text:?}: {error}"
        );
    }
}

#[test]
fn sizes_are_read_in_bytes_or_binary_units() {
    let cases: [(&str, Result<usize, &str>); 14] = [
        ("32768", Ok(32768)),
        ("32KiB", Ok(32 * 1024)),
        ("32kib", Ok(32 * 1024)),
        ("32KB", Ok(32 * 1024)),
        ("4k", Ok(4096)),
        ("1MiB", Ok(1024 * 1024)),
        ("2 MB", Ok(2 * 1024 * 1024)),
        (" 512b ", Ok(512)),
        ("0", Ok(0)),
        ("", Err("`` is not a size like 32768, 32KiB or 1MiB")),
        ("KiB", Err("`KiB` is not a size like 32768, 32KiB or 1MiB")),
        (
            "1GiB",
            Err("`1GiB` is not a size like 32768, 32KiB or 1MiB"),
        ),
        (
            "1.5KiB",
            Err("`1.5KiB` is not a size like 32768, 32KiB or 1MiB"),
        ),
        (
            "18446744073709551615MiB",
            Err("`18446744073709551615MiB` is too large"),
        ),
    ];
    for (text, expected) in cases {
        assert_eq!(
            parse_bytes(text),
            expected.map_err(str::to_owned),
            "for {text:?}"
        );
    }
}

/// `args` fail clap's value validation, and the error says `reason`.
fn check_value_refused(args: &[&str], reason: &str) {
    let error = parse_error(args);
    assert_eq!(error.kind(), clap::error::ErrorKind::ValueValidation);
    assert!(error.to_string().contains(reason), "{error}");
}

#[test]
fn a_size_flag_that_does_not_parse_is_a_clap_error() {
    check_value_refused(
        &["--max-message-size", "lots"],
        "`lots` is not a size like 32768, 32KiB or 1MiB",
    );
}

#[test]
fn an_unknown_algorithm_is_a_clap_error() {
    check_value_refused(
        &["--jwt-algorithm", "none"],
        "unsupported algorithm `none`; use HS256, RS256 or ES256",
    );
}

#[test]
fn every_problem_is_reported_together() {
    check(
        &[
            "--jwt-secret",
            "short",
            "--service-key",
            "tiny",
            "--service-key-file",
            "/run/secrets/service",
            "--connection-token-secret",
            "shared",
            "--connection-token-secret-file",
            "/run/secrets/connection",
            "--cors-origins",
            "https://ok.example.com,app.example.com,https://x.example.com/",
            "--keepalive-interval",
            "20s",
            "--client-timeout",
            "20s",
            "--handshake-timeout",
            "0s",
            "--write-timeout",
            "0s",
            "--max-message-size",
            "1000",
            "--outbound-queue",
            "0",
            "--max-groups-per-connection",
            "0",
            "--listen",
            "127.0.0.1:8080",
            "--admin-listen",
            "127.0.0.1:8080",
        ],
        Err(&[
            "--jwt-secret must be at least 32 bytes",
            "give either --service-key or --service-key-file, not both",
            "--service-key must be at least 16 characters",
            "--connection-token-secret must be at least 16 characters",
            "give either --connection-token-secret or --connection-token-secret-file, not both",
            "--cors-origins: `app.example.com` is not an origin like https://app.example.com",
            "--cors-origins: `https://x.example.com/` is not an origin like https://app.example.com",
            "--keepalive-interval must be between 1ms and 15s: the official client gives up after 30s of silence",
            "--client-timeout must be longer than --keepalive-interval",
            "--handshake-timeout must be more than zero",
            "--write-timeout must be more than zero",
            "--max-message-size must be at least 1KiB",
            "--outbound-queue must be at least 1",
            "--max-groups-per-connection must be at least 1",
            "--listen and --admin-listen must differ",
        ]),
    );
}

#[test]
fn the_report_lists_each_problem_on_its_own_line() {
    let error = parse(&["--outbound-queue", "0"]).validate().unwrap_err();
    assert_eq!(
        error.to_string(),
        "invalid configuration:\n  - HS256 needs --jwt-secret or --jwt-secret-file (or use --dev to try the gateway)\n  - --outbound-queue must be at least 1"
    );
}

#[test]
fn a_secret_given_twice_is_refused() {
    check(
        &["--jwt-secret", SECRET, "--jwt-secret-file", "/run/jwt"],
        Err(&["give either --jwt-secret or --jwt-secret-file, not both"]),
    );
}

#[test]
fn public_key_algorithms_need_a_key_file_and_no_secret() {
    check(
        &["--jwt-algorithm", "ES256", "--jwt-secret", SECRET],
        Err(&[
            "ES256 needs --jwt-public-key-file with a PEM public key",
            "--jwt-secret is for HS256; the pinned algorithm is ES256",
        ]),
    );
    check(
        &["--jwt-algorithm", "RS256"],
        Err(&["RS256 needs --jwt-public-key-file with a PEM public key"]),
    );
}

#[test]
fn keepalive_must_be_short_enough_for_the_official_client() {
    let problem = "--keepalive-interval must be between 1ms and 15s: the official client gives up after 30s of silence";
    check(
        &["--jwt-secret", SECRET, "--keepalive-interval", "15s"],
        Ok(()),
    );
    check(
        &["--jwt-secret", SECRET, "--keepalive-interval", "0s"],
        Err(&[problem]),
    );
    check(
        &["--jwt-secret", SECRET, "--keepalive-interval", "16s"],
        Err(&[problem]),
    );
    check(
        &[
            "--jwt-secret",
            SECRET,
            "--keepalive-interval",
            "10s",
            "--client-timeout",
            "10s",
        ],
        Err(&["--client-timeout must be longer than --keepalive-interval"]),
    );
}

#[test]
fn origins_must_be_scheme_and_host_or_a_star() {
    check(
        &[
            "--jwt-secret",
            SECRET,
            "--cors-origins",
            "*,https://app.example.com,http://localhost:3000,https://[::1]:8443",
        ],
        Ok(()),
    );
    for origin in [
        "ftp://app.example.com",
        "https://",
        "https://app.example.com/path",
        "https://app example.com",
        "null",
    ] {
        let problem =
            format!("--cors-origins: `{origin}` is not an origin like https://app.example.com");
        check(
            &["--jwt-secret", SECRET, "--cors-origins", origin],
            Err(&[problem.as_str()]),
        );
    }
}

#[test]
fn both_listeners_may_share_port_zero_in_tests() {
    check(
        &[
            "--jwt-secret",
            SECRET,
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ],
        Ok(()),
    );
}

#[test]
fn dev_mode_fills_in_secrets_and_opens_origins() {
    let mut config = parse(&["--dev"]);
    assert!(config.dev);
    let credentials = config.apply_dev_defaults();
    assert_eq!(credentials.jwt_secret.as_ref().unwrap().expose().len(), 43);
    assert_eq!(credentials.service_key.as_ref().unwrap().expose().len(), 43);
    assert_ne!(credentials.jwt_secret, credentials.service_key);
    assert_eq!(config.auth.jwt_secret, credentials.jwt_secret);
    assert_eq!(config.auth.service_key, credentials.service_key);
    assert_eq!(config.cors.origins, ["*"]);
    assert!(config.cors.allow_missing_origin);
    assert!(config.validate().is_ok());
}

#[test]
fn dev_mode_keeps_what_was_configured() {
    let mut config = parse(&[
        "--dev",
        "--jwt-secret",
        SECRET,
        "--service-key-file",
        "/run/service",
        "--cors-origins",
        "https://app.example.com",
    ]);
    let credentials = config.apply_dev_defaults();
    assert_eq!(credentials.jwt_secret, Some(Secret::new(SECRET)));
    assert_eq!(credentials.service_key, None);
    assert_eq!(config.auth.service_key, None);
    assert_eq!(config.cors.origins, ["https://app.example.com"]);
    assert!(config.validate().is_ok());
}

#[test]
fn dev_mode_mints_no_secret_for_a_public_key_algorithm() {
    let mut config = parse(&[
        "--dev",
        "--jwt-algorithm",
        "ES256",
        "--jwt-public-key-file",
        "/keys/jwt.pem",
    ]);
    let credentials = config.apply_dev_defaults();
    assert_eq!(credentials.jwt_secret, None);
    assert_eq!(config.auth.jwt_secret, None);
    assert!(credentials.service_key.is_some());
    assert!(config.validate().is_ok());
}

#[test]
fn secrets_never_show_in_debug_output() {
    let config = parse(&[
        "--jwt-secret",
        SECRET,
        "--service-key",
        "service-key-0123456789",
    ]);
    let debug = format!("{config:?}");
    assert!(!debug.contains(SECRET), "{debug}");
    assert!(!debug.contains("service-key-0123456789"), "{debug}");
    assert!(debug.contains("Secret(<redacted>)"), "{debug}");
}

#[test]
fn the_token_subcommand_reads_its_arguments() {
    let cli = parse_cli(&[
        "token",
        "--role",
        "dispatcher",
        "--region",
        "west",
        "--region",
        "east",
        "--ttl",
        "10m",
    ]);
    let Some(Command::Token(args)) = cli.command else {
        panic!("no token subcommand in {cli:?}");
    };
    assert!(matches!(args.role, TokenRole::Dispatcher));
    assert_eq!(args.regions, ["west", "east"]);
    assert_eq!(args.contractor_id, None);
    assert_eq!(args.sub, "dev-user");
    assert_eq!(args.ttl, Duration::from_secs(600));
}
