//! The listeners' servers. The public listener's accept loop is hyper with a timer, so slow and
//! idle HTTP clients are closed, and a cap on connections that have not sent a request head yet;
//! the admin listener ([`serve_admin`]) is axum's own server.
//!
//! axum's own `serve` sets no timer, which leaves hyper's header-read timeout off: a client
//! could hold thousands of half-sent requests. Here every connection must send a full request
//! head within `--header-read-timeout` of opening (including the bytes hyper reads to tell
//! HTTP/1 from HTTP/2) and within the same time after each response on a kept-alive
//! connection. Graceful shutdown works as axum's: stop accepting, ask each connection to finish
//! its request, wait for them. Upgraded connections (WebSockets) leave this loop as soon as the
//! 101 is written; their tasks are tracked by [`crate::shutdown`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::limits::{Limits, PendingRequestPermit};

/// How long the loop pauses after an accept error that is not the peer's (out of descriptors).
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_secs(1);

/// Serves `router` on `listener` until `stop` is cancelled, then waits for the HTTP
/// connections in progress to finish.
///
/// Requests carry `ConnectInfo<SocketAddr>` as with axum's `into_make_service_with_connect_info`,
/// and upgraded connections are `TokioIo<TcpStream>`, as `http::upgrade` downcasts them.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Arc<Limits>,
    header_read_timeout: Duration,
    stop: CancellationToken,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout)
        .keep_alive(true);
    builder.http2().timer(TokioTimer::new());
    let builder = Arc::new(builder);
    let connections = TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            biased;
            () = stop.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (tcp, remote) = match accepted {
            Ok(accepted) => accepted,
            Err(e) if peer_error(&e) => continue,
            Err(e) => {
                tracing::warn!(error = %e, "cannot accept connections; pausing");
                tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                continue;
            }
        };
        // Refused before a task exists: the connection is closed at once.
        let Ok(pending) = limits.try_pending_request() else {
            tracing::debug!(remote.addr = %remote, "too many unfinished requests; closing");
            continue;
        };
        // Event frames are small and latency matters: without TCP_NODELAY a frame can wait
        // ~40 ms for the client's delayed ACK.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
        connections.spawn(serve_connection(
            Arc::clone(&builder),
            tcp,
            remote,
            router.clone(),
            pending,
            header_read_timeout,
            stop.clone(),
        ));
    }
    drop(listener);
    connections.close();
    connections.wait().await;
}

/// Serves one HTTP connection; holds `pending` until its first request head arrives.
async fn serve_connection(
    builder: Arc<auto::Builder<TokioExecutor>>,
    tcp: TcpStream,
    remote: SocketAddr,
    router: Router,
    pending: PendingRequestPermit,
    header_read_timeout: Duration,
    stop: CancellationToken,
) {
    let head_arrived = Arc::new(Notify::new());
    let service = {
        let head_arrived = Arc::clone(&head_arrived);
        let router = TowerToHyperService::new(router);
        hyper::service::service_fn(move |mut request: axum::http::Request<Incoming>| {
            head_arrived.notify_one();
            request.extensions_mut().insert(ConnectInfo(remote));
            hyper::service::Service::call(&router, request)
        })
    };
    let connection = builder.serve_connection_with_upgrades(TokioIo::new(tcp), service);
    let mut connection = std::pin::pin!(connection);
    let mut pending = Some(pending);
    let first_head_deadline = tokio::time::sleep(header_read_timeout);
    let mut first_head_deadline = std::pin::pin!(first_head_deadline);
    let mut stopping = false;
    loop {
        tokio::select! {
            biased;
            result = connection.as_mut() => {
                if let Err(e) = result {
                    tracing::trace!(error = %e, remote.addr = %remote, "HTTP connection ended");
                }
                return;
            }
            () = head_arrived.notified(), if pending.is_some() => pending = None,
            () = &mut first_head_deadline, if pending.is_some() => {
                tracing::debug!(remote.addr = %remote, "no request head in time; closing");
                return;
            }
            () = stop.cancelled(), if !stopping => {
                stopping = true;
                connection.as_mut().graceful_shutdown();
            }
        }
    }
}

/// Serves the admin router on `listener` until `stop` is cancelled, then lets the requests in
/// progress finish. axum's own server is enough here: the admin listener is loopback unless
/// configured otherwise and answers three cheap routes to probes and Prometheus.
///
/// # Errors
/// When serving fails.
pub async fn serve_admin(
    listener: TcpListener,
    router: Router,
    stop: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(stop.cancelled_owned())
        .await
}

/// Accept errors that concern one connection only (it was reset before we took it).
fn peer_error(error: &std::io::Error) -> bool {
    use std::io::ErrorKind;
    matches!(
        error.kind(),
        ErrorKind::ConnectionRefused | ErrorKind::ConnectionAborted | ErrorKind::ConnectionReset
    )
}
