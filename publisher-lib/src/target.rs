//! Where Redis is: one server, or the current master of a Sentinel-monitored group.
//!
//! A [`RedisTarget`] is parsed once from a URL and asked for a [`redis::Client`] every time a
//! connection is (re)opened, so a Sentinel failover is followed by the next reconnect:
//!
//! - `redis://[user[:password]@]host:port[/db]`: one server, plain TCP.
//! - `rediss://...`: one server over TLS, verified against the system roots or, when given, a
//!   certificate authority in PEM.
//! - `redis+sentinel://[user[:password]@]host:port[,host:port...]/<master-name>[/db]`: ask the
//!   listed Sentinels for the master of `<master-name>`. The user and password are the master's;
//!   Sentinels that require a password of their own take `?sentinel_password=...`.
//!   `rediss+sentinel://` speaks TLS to the Sentinels and to the master.
//! - `redis+cluster://[user[:password]@]host:port[,host:port...]`: a Redis Cluster, found through
//!   the listed seed nodes (any live one will do; the client learns the others and follows slot
//!   moves and failovers itself). `rediss+cluster://` speaks TLS to every node. No database and
//!   no parameters: a cluster has only database 0. Such a target has no single server
//!   ([`RedisTarget::client`] refuses); it hands out a [`ClusterClient`] instead
//!   ([`RedisTarget::cluster_client`]), and pub/sub on it is sharded (`SPUBLISH`, `SSUBSCRIBE`).

use std::fmt;
use std::sync::Arc;

use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use redis::{ConnectionAddr, IntoConnectionInfo, ProtocolVersion, RedisError, TlsCertificates};

/// A Redis server, Sentinel-monitored master or Redis Cluster, resolved to a client on each
/// connect.
#[derive(Clone)]
pub struct RedisTarget {
    inner: Arc<Inner>,
}

enum Inner {
    Server(redis::Client),
    Sentinel {
        client: tokio::sync::Mutex<SentinelClient>,
        master: String,
    },
    Cluster {
        client: ClusterClient,
        seeds: usize,
    },
}

impl RedisTarget {
    /// Parses `url` (see the [module documentation](self)). `ca_pem` is the authority that signed
    /// the server's certificate for TLS URLs; without it the system roots are used. Connections
    /// speak `protocol` (RESP3 is needed for pub/sub on a multiplexed connection).
    ///
    /// # Errors
    /// When the URL is malformed, or the certificate authority is not PEM.
    pub fn parse(
        url: &str,
        ca_pem: Option<&[u8]>,
        protocol: ProtocolVersion,
    ) -> Result<Self, RedisError> {
        // TLS uses rustls with the ring provider; installing it twice is harmless.
        let _ = rustls::crypto::ring::default_provider().install_default();
        if let Some(pem) = ca_pem {
            check_pem(pem)?;
        }
        let certificates = || TlsCertificates {
            client_tls: None,
            root_cert: ca_pem.map(<[u8]>::to_vec),
        };
        let inner = if let Some(rest) = url.strip_prefix("redis+sentinel://") {
            sentinel(rest, false, certificates(), protocol)?
        } else if let Some(rest) = url.strip_prefix("rediss+sentinel://") {
            sentinel(rest, true, certificates(), protocol)?
        } else if let Some(rest) = url.strip_prefix("redis+cluster://") {
            cluster(rest, false, ca_pem.map(|_| certificates()), protocol)?
        } else if let Some(rest) = url.strip_prefix("rediss+cluster://") {
            cluster(rest, true, ca_pem.map(|_| certificates()), protocol)?
        } else {
            let info = url.into_connection_info()?;
            let settings = info.redis_settings().clone().set_protocol(protocol);
            let info = info.set_redis_settings(settings);
            let client = if ca_pem.is_some() {
                redis::Client::build_with_tls(info, certificates())?
            } else {
                redis::Client::open(info)?
            };
            Inner::Server(client)
        };
        Ok(Self {
            inner: Arc::new(inner),
        })
    }

    /// A client for the server to use now: the one server, or the master the Sentinels name.
    ///
    /// # Errors
    /// When no Sentinel answers or none knows the master, and always for a Redis Cluster, which
    /// has no single server (use [`RedisTarget::cluster_client`]).
    pub async fn client(&self) -> Result<redis::Client, RedisError> {
        match &*self.inner {
            Inner::Server(client) => Ok(client.clone()),
            Inner::Sentinel { client, .. } => client.lock().await.async_get_client().await,
            Inner::Cluster { .. } => Err(invalid(
                "a redis cluster has no single server: connect with RedisTarget::cluster_client",
            )),
        }
    }

    /// For a `redis+cluster://` or `rediss+cluster://` URL, the cluster client (seed nodes,
    /// credentials, TLS and protocol as the URL and [`RedisTarget::parse`] gave them); `None`
    /// for any other target. Its connections route each command to the master of its slot and
    /// follow `MOVED`, `ASK` and failovers on their own.
    pub fn cluster_client(&self) -> Option<&ClusterClient> {
        match &*self.inner {
            Inner::Cluster { client, .. } => Some(client),
            _ => None,
        }
    }

    /// Whether this target is a Redis Cluster (its pub/sub is sharded: `SPUBLISH`,
    /// `SSUBSCRIBE`).
    pub fn is_cluster(&self) -> bool {
        matches!(&*self.inner, Inner::Cluster { .. })
    }

    /// Whether the server can change between connects (Sentinel), so a connection that fails
    /// should be rebuilt from a fresh [`RedisTarget::client`] rather than retried in place.
    pub fn follows_failover(&self) -> bool {
        matches!(&*self.inner, Inner::Sentinel { .. })
    }
}

impl fmt::Debug for RedisTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the URL itself: it may hold a password.
        match &*self.inner {
            Inner::Server(client) => {
                write!(
                    f,
                    "RedisTarget::Server({})",
                    client.get_connection_info().addr()
                )
            }
            Inner::Sentinel { master, .. } => write!(f, "RedisTarget::Sentinel({master})"),
            Inner::Cluster { seeds, .. } => write!(f, "RedisTarget::Cluster({seeds} seeds)"),
        }
    }
}

/// Refuses a certificate authority that holds no PEM certificate (the redis crate would
/// silently trust nothing and fail every handshake later).
fn check_pem(pem: &[u8]) -> Result<(), RedisError> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let certificates: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(pem).collect();
    match certificates {
        Ok(certificates) if !certificates.is_empty() => Ok(()),
        _ => Err(invalid(
            "the certificate authority file holds no PEM certificate",
        )),
    }
}

fn invalid(message: &'static str) -> RedisError {
    RedisError::from((redis::ErrorKind::InvalidClientConfig, message))
}

/// Builds a Sentinel client from what follows `redis+sentinel://`.
fn sentinel(
    rest: &str,
    tls: bool,
    certificates: TlsCertificates,
    protocol: ProtocolVersion,
) -> Result<Inner, RedisError> {
    let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
    let (userinfo, rest) = match rest.rsplit_once('@') {
        Some((userinfo, rest)) => (Some(userinfo), rest),
        None => (None, rest),
    };
    let (hosts, path) = rest
        .split_once('/')
        .ok_or_else(|| invalid("a sentinel URL needs the master name as its path"))?;
    let (master, db) = match path.split_once('/') {
        Some((master, db)) => (master, Some(db)),
        None => (path, None),
    };
    if master.is_empty() {
        return Err(invalid("a sentinel URL needs the master name as its path"));
    }
    let mut sentinels = Vec::new();
    for host in hosts.split(',') {
        // Each address goes through the redis crate's own parser.
        let info = format!("redis://{host}").into_connection_info()?;
        let ConnectionAddr::Tcp(host, port) = info.addr().clone() else {
            return Err(invalid("a sentinel address must be host:port"));
        };
        sentinels.push(if tls {
            ConnectionAddr::TcpTls {
                host,
                port,
                insecure: false,
                tls_params: None,
            }
        } else {
            ConnectionAddr::Tcp(host, port)
        });
    }
    // The master's credentials and database, decoded by the redis crate's URL parser.
    let credentials = format!(
        "redis://{}localhost/{}",
        userinfo.map(|u| format!("{u}@")).unwrap_or_default(),
        db.unwrap_or("0")
    )
    .into_connection_info()?;
    let settings = credentials.redis_settings();

    let mut builder = SentinelClientBuilder::new(sentinels, master, SentinelServerType::Master)?
        .set_client_to_redis_protocol(protocol)
        .set_client_to_redis_db(settings.db());
    if let Some(username) = settings.username() {
        builder = builder.set_client_to_redis_username(username);
    }
    if let Some(password) = settings.password() {
        builder = builder.set_client_to_redis_password(password);
    }
    for (key, value) in query.split('&').filter_map(|pair| pair.split_once('=')) {
        match key {
            "sentinel_password" => {
                let decoded = format!("redis://:{value}@localhost")
                    .into_connection_info()?
                    .redis_settings()
                    .password()
                    .unwrap_or_default()
                    .to_owned();
                builder = builder.set_client_to_sentinel_password(decoded);
            }
            _ => return Err(invalid("unknown parameter in a sentinel URL")),
        }
    }
    if tls {
        builder = builder
            .set_client_to_redis_tls_mode(redis::TlsMode::Secure)
            .set_client_to_sentinel_tls_mode(redis::TlsMode::Secure)
            .set_client_to_redis_certificates(certificates.clone())
            .set_client_to_sentinel_certificates(certificates);
    }
    Ok(Inner::Sentinel {
        client: tokio::sync::Mutex::new(builder.build()?),
        master: master.to_owned(),
    })
}

/// Builds a cluster client from what follows `redis+cluster://`: `[userinfo@]host:port,...`.
/// `certificates` is the authority to trust (TLS only); without it the system roots are used.
fn cluster(
    rest: &str,
    tls: bool,
    certificates: Option<TlsCertificates>,
    protocol: ProtocolVersion,
) -> Result<Inner, RedisError> {
    let (userinfo, hosts) = match rest.rsplit_once('@') {
        Some((userinfo, hosts)) => (Some(userinfo), hosts),
        None => (None, rest),
    };
    let hosts = hosts.strip_suffix('/').unwrap_or(hosts);
    if hosts.contains(['/', '?', '#']) {
        return Err(invalid(
            "a cluster URL names seed nodes (host:port,...) only: no database, no parameters",
        ));
    }
    let scheme = if tls { "rediss" } else { "redis" };
    let userinfo = userinfo.map(|u| format!("{u}@")).unwrap_or_default();
    let mut nodes = Vec::new();
    for host in hosts.split(',') {
        if host.is_empty() {
            return Err(invalid("a cluster URL needs at least one host:port"));
        }
        // Each seed goes through the redis crate's own parser (credentials decoded there).
        let info = format!("{scheme}://{userinfo}{host}").into_connection_info()?;
        if !matches!(
            info.addr(),
            ConnectionAddr::Tcp(..) | ConnectionAddr::TcpTls { .. }
        ) {
            return Err(invalid("a cluster seed must be host:port"));
        }
        nodes.push(info);
    }
    let seeds = nodes.len();
    let mut builder = ClusterClientBuilder::new(nodes).use_protocol(protocol);
    if let (true, Some(certificates)) = (tls, certificates) {
        builder = builder.certs(certificates);
    }
    Ok(Inner::Cluster {
        client: builder.build()?,
        seeds,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(url: &str) -> Result<RedisTarget, RedisError> {
        RedisTarget::parse(url, None, ProtocolVersion::RESP2)
    }

    #[test]
    fn server_urls_parse_and_do_not_follow_failover() {
        let target = parse("redis://user:secret@127.0.0.1:6380/2").expect("valid url");
        assert!(!target.follows_failover());
        let shown = format!("{target:?}");
        assert!(shown.contains("127.0.0.1:6380"), "{shown}");
        assert!(!shown.contains("secret"), "{shown}");
    }

    #[test]
    fn sentinel_urls_name_several_sentinels_and_the_master() {
        let target = parse("redis+sentinel://:pw@127.0.0.1:26379,127.0.0.1:26380/primary/1")
            .expect("valid sentinel url");
        assert!(target.follows_failover());
        assert_eq!(format!("{target:?}"), "RedisTarget::Sentinel(primary)");
    }

    #[test]
    fn sentinel_urls_without_a_master_or_with_unknown_parameters_are_refused() {
        for url in [
            "redis+sentinel://127.0.0.1:26379",
            "redis+sentinel://127.0.0.1:26379/",
            "redis+sentinel://127.0.0.1:26379/m?color=blue",
        ] {
            assert!(parse(url).is_err(), "{url} was accepted");
        }
    }

    #[test]
    fn cluster_urls_name_seed_nodes_and_hand_out_a_cluster_client() {
        for url in [
            "redis+cluster://127.0.0.1:7000",
            "redis+cluster://user:s%40cret@127.0.0.1:7000,127.0.0.1:7001,[::1]:7002/",
            "rediss+cluster://127.0.0.1:7000,127.0.0.1:7001",
        ] {
            let target = parse(url).unwrap_or_else(|e| panic!("{url}: {e}"));
            assert!(target.is_cluster(), "{url}");
            assert!(target.cluster_client().is_some(), "{url}");
            assert!(!target.follows_failover(), "{url}");
            assert!(!format!("{target:?}").contains("cret"), "{target:?}");
        }
        let target = parse("redis+cluster://127.0.0.1:7000,127.0.0.1:7001").expect("valid");
        assert_eq!(format!("{target:?}"), "RedisTarget::Cluster(2 seeds)");
        assert!(!parse("redis://127.0.0.1:7000").expect("valid").is_cluster());
    }

    #[tokio::test]
    async fn a_cluster_target_has_no_single_server() {
        let target = parse("redis+cluster://127.0.0.1:7000").expect("valid");
        assert!(target.client().await.is_err());
    }

    #[test]
    fn cluster_urls_without_seeds_or_with_a_database_are_refused() {
        for url in [
            "redis+cluster://",
            "redis+cluster://127.0.0.1:7000,",
            "redis+cluster://127.0.0.1:7000/1",
            "redis+cluster://127.0.0.1:7000?x=1",
        ] {
            assert!(parse(url).is_err(), "{url} was accepted");
        }
    }

    #[test]
    fn a_certificate_authority_that_is_not_pem_is_refused() {
        let result = RedisTarget::parse(
            "rediss://127.0.0.1:6380",
            Some(b"not a certificate"),
            ProtocolVersion::RESP2,
        );
        assert!(result.is_err());
    }
}
