//! One connection's life: a TCP connect from a spread source address, the upgrade, the
//! handshake and the join, then holding: reading frames into the thread's scratch buffer,
//! counting stamped deliveries, pinging with its cohort and closing when told to.

use std::cell::RefCell;
use std::future::{Future, poll_fn};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use nix::sys::socket::{setsockopt, sockopt::IpBindAddressNoPort};
use tokio::io::{AsyncRead, AsyncWriteExt, ReadBuf};
use tokio::net::TcpSocket;
use tokio::sync::{mpsc, watch};
use tokio::time::timeout;

use crate::host;
use crate::signalr::{self, Incoming};
use crate::tally::{Ledger, Order};
use crate::ws;

use super::wire::{ReceiveError, Received, Wire};
use super::{FleetConfig, SHARDS, Shared, lock, region};

/// Size of the scratch buffer every connection of a thread reads into: room for many events
/// when the tool falls behind, small enough to stay in cache.
pub(super) const SCRATCH_BYTES: usize = 64 * 1024;

/// Least free space a read is offered after the carried tail of a frame.
const MIN_READ_BYTES: usize = 4096;

thread_local! {
    /// The read buffer of the connections polled on this thread. Borrowed only inside one
    /// poll, never across an await.
    static SCRATCH: RefCell<Vec<u8>> = RefCell::new(vec![0; SCRATCH_BYTES]);
}

/// How long a closing connection waits for its close frame to be written.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// A stateful connection is signalled every second to acknowledge, and pings every tenth time.
const PINGS_EVERY_SIGNALS: u32 = 10;

/// Source addresses used when spreading: 127.0.0.2 ..= 127.0.0.254.
const SOURCE_HOSTS: std::ops::RangeInclusive<u8> = 2..=254;

/// One connection's identity and where it reports.
pub(super) struct Session {
    pub(super) index: usize,
    pub(super) group: Option<usize>,
    pub(super) config: Arc<FleetConfig>,
    pub(super) shared: Arc<Shared>,
}

impl Session {
    pub(super) async fn run(
        self,
        token: String,
        permit: tokio::sync::OwnedSemaphorePermit,
        ready: mpsc::Sender<Result<(), String>>,
        control: watch::Receiver<bool>,
    ) {
        let established = timeout(self.config.connect_timeout, self.establish(&token)).await;
        drop(permit);
        let wire = match established {
            Ok(Ok(wire)) => wire,
            Ok(Err(reason)) => {
                let _ = ready.send(Err(reason)).await;
                return;
            }
            Err(_) => {
                let _ = ready.send(Err("timed out".to_owned())).await;
                return;
            }
        };
        self.shared.live.fetch_add(1, Ordering::Relaxed);
        if let Some(g) = self.group {
            self.shared.members[g].fetch_add(1, Ordering::Relaxed);
        }
        let _ = ready.send(Ok(())).await;
        drop(ready);

        let ended = self.hold(wire, control).await;

        if let Some(g) = self.group {
            self.shared.members[g].fetch_sub(1, Ordering::Relaxed);
        }
        self.shared.live.fetch_sub(1, Ordering::Relaxed);
        if let Some(reason) = ended {
            *lock(&self.shared.ends).entry(reason).or_default() += 1;
        }
    }

    /// TCP connect from a spread source address, upgrade, handshake and join.
    async fn establish(&self, token: &str) -> Result<Wire, String> {
        let target = self.config.endpoint.addr;
        let socket = match target {
            SocketAddr::V4(_) => TcpSocket::new_v4(),
            SocketAddr::V6(_) => TcpSocket::new_v6(),
        }
        .map_err(|e| format!("socket: {:?}", e.kind()))?;
        if let Some(source) = self.source_address() {
            setsockopt(&socket, IpBindAddressNoPort, &true)
                .map_err(|e| format!("IP_BIND_ADDRESS_NO_PORT: {e}"))?;
            socket
                .bind(source)
                .map_err(|e| format!("bind: {:?}", e.kind()))?;
        }
        let stream = socket
            .connect(target)
            .await
            .map_err(|e| format!("connect: {:?}", e.kind()))?;
        stream
            .set_nodelay(true)
            .map_err(|e| format!("nodelay: {:?}", e.kind()))?;

        let nonce = *uuid::Uuid::new_v4().as_bytes();
        let [m0, m1, m2, m3, ..] = *uuid::Uuid::new_v4().as_bytes();
        let mut wire = Wire::new(stream, [m0, m1, m2, m3]);
        let key = ws::client_key(nonce);
        let path = match &self.shared.negotiate {
            None => format!("/hub/v1?access_token={token}"),
            Some(http) => {
                let connection = negotiate_stateful(http, target, token).await?;
                format!("/hub/v1?id={connection}&access_token={token}")
            }
        };
        let request = ws::upgrade_request(
            &target.to_string(),
            &path,
            &key,
            self.config.origin.as_deref(),
        )?;
        wire.stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| format!("upgrade: io {:?}", e.kind()))?;
        loop {
            match ws::upgrade_response(&wire.pending, &key) {
                Ok(Some(head)) => {
                    wire.pending.drain(..head);
                    break;
                }
                Ok(None) => {}
                Err(e) => return Err(format!("upgrade: {e}")),
            }
            match wire.fill().await {
                Ok(0) => return Err("upgrade: eof".to_owned()),
                Ok(_) => {}
                Err(e) => return Err(format!("upgrade: io {:?}", e.kind())),
            }
        }

        wire.send_text(signalr::HANDSHAKE)
            .await
            .map_err(|e| format!("handshake: io {:?}", e.kind()))?;
        let mut phase = Phase::Handshake;
        while phase != Phase::Ready {
            let text = match wire.receive().await {
                Ok(Received::Text(text)) => text,
                Ok(Received::Close) | Err(ReceiveError::Eof) => {
                    return Err(format!("{}: closed by server", phase.name()));
                }
                Ok(Received::Ping(payload)) => {
                    wire.send(ws::OPCODE_PONG, &payload)
                        .await
                        .map_err(|e| format!("{}: io {:?}", phase.name(), e.kind()))?;
                    continue;
                }
                Ok(Received::Other) => continue,
                Err(e) => return Err(format!("{}: {e}", phase.name())),
            };
            for record in signalr::records(&text) {
                match (phase, Incoming::parse(record)) {
                    (Phase::Handshake, Incoming::Handshake(None)) => phase = Phase::Handshaken,
                    (Phase::Handshake, Incoming::Handshake(Some(error))) => {
                        return Err(format!("handshake refused: {error}"));
                    }
                    (
                        Phase::Joining,
                        Incoming::Completion {
                            id,
                            error: Some(error),
                        },
                    ) if id == signalr::JOIN_INVOCATION_ID => {
                        return Err(format!("join refused: {error}"));
                    }
                    (Phase::Joining, Incoming::Completion { id, error: None })
                        if id == signalr::JOIN_INVOCATION_ID =>
                    {
                        phase = Phase::Ready;
                    }
                    (_, Incoming::Close(error)) => {
                        return Err(format!(
                            "{}: server close: {}",
                            phase.name(),
                            error.unwrap_or_default()
                        ));
                    }
                    _ => {}
                }
            }
            if phase == Phase::Handshaken {
                match self.group {
                    Some(g) => {
                        wire.send_text(&signalr::join(&region(g)))
                            .await
                            .map_err(|e| format!("join: io {:?}", e.kind()))?;
                        phase = Phase::Joining;
                    }
                    None => phase = Phase::Ready,
                }
            }
        }
        Ok(wire)
    }

    /// Reads until stopped or ended; returns why the server or network ended it, if it did.
    pub(super) async fn hold(
        &self,
        mut wire: Wire,
        mut control: watch::Receiver<bool>,
    ) -> Option<String> {
        let shard = &self.shared.shards[self.index % SHARDS];
        let mut order = Order::default();
        // Stateful connections: what the server numbered (the join's completion so far), what
        // was acknowledged, and the cohort signals seen (a ping every PINGS_EVERY_SIGNALS).
        let stateful = self.shared.negotiate.is_some();
        let mut tracked = u64::from(self.group.is_some());
        let mut acked = 0;
        let mut signals: u32 = 0;
        wire.pending.shrink_to_fit();
        loop {
            let event = {
                // Lives until the cohort signals: polling it again costs less than a new one.
                let signal = control.changed();
                tokio::pin!(signal);
                poll_fn(|cx| {
                    // The socket first: a wake-up is nearly always for data.
                    if let Poll::Ready(event) =
                        self.poll_socket(cx, &mut wire, &mut order, &mut tracked, shard)
                    {
                        return Poll::Ready(event);
                    }
                    signal.as_mut().poll(cx).map(|changed| match changed {
                        Ok(()) => Event::Signal,
                        Err(_) => Event::Stop,
                    })
                })
                .await
            };
            let stop = match event {
                Event::Signal => *control.borrow_and_update(),
                Event::Stop => true,
                Event::Pong(payload) => {
                    if let Err(e) = wire.send(ws::OPCODE_PONG, &payload).await {
                        return Some(format!("pong: io {:?}", e.kind()));
                    }
                    continue;
                }
                Event::Ended(reason) => return Some(reason),
            };
            if stop {
                let _ = timeout(CLOSE_TIMEOUT, wire.send(ws::OPCODE_CLOSE, &[])).await;
                return None;
            }
            if stateful && tracked > acked {
                if let Err(e) = wire.send_text(&signalr::ack(tracked)).await {
                    return Some(format!("ack: io {:?}", e.kind()));
                }
                acked = tracked;
            }
            signals = signals.wrapping_add(1);
            if stateful && !signals.is_multiple_of(PINGS_EVERY_SIGNALS) {
                continue;
            }
            if let Err(e) = wire.send_text(signalr::PING).await {
                return Some(format!("ping: io {:?}", e.kind()));
            }
        }
    }

    /// Reads and counts what the socket has, until it has no more (`Pending`, with the task's
    /// waker registered) or something needs the connection's attention.
    fn poll_socket(
        &self,
        cx: &mut Context<'_>,
        wire: &mut Wire,
        order: &mut Order,
        tracked: &mut u64,
        shard: &Mutex<Ledger>,
    ) -> Poll<Event> {
        SCRATCH.with_borrow_mut(|scratch| {
            loop {
                let carried = wire.pending.len();
                let size = (carried + MIN_READ_BYTES).max(wire.want);
                if scratch.len() < size {
                    scratch.resize(size, 0);
                }
                scratch[..carried].copy_from_slice(&wire.pending);
                let mut read = ReadBuf::new(&mut scratch[carried..]);
                match Pin::new(&mut wire.stream).poll_read(cx, &mut read) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Err(e)) => {
                        return Poll::Ready(Event::Ended(format!("read: io {:?}", e.kind())));
                    }
                    Poll::Ready(Ok(())) => {}
                }
                let got = read.filled().len();
                if got == 0 {
                    return Poll::Ready(Event::Ended("eof".to_owned()));
                }
                let data = &scratch[..carried + got];
                let (used, outcome) = self.absorb(data, order, tracked, shard);
                wire.keep(&data[used..]);
                match outcome {
                    Ok(None) => {}
                    Ok(Some(ping)) => return Poll::Ready(Event::Pong(ping)),
                    Err(reason) => return Poll::Ready(Event::Ended(reason)),
                }
            }
        })
    }

    /// Counts the deliveries of the complete frames at the start of `data`, and in `tracked`
    /// the messages a stateful connection acknowledges. Returns how many bytes they took, and
    /// the payload of a WebSocket ping to answer, if one came, or why the server ended the
    /// connection.
    fn absorb(
        &self,
        data: &[u8],
        order: &mut Order,
        tracked: &mut u64,
        shard: &Mutex<Ledger>,
    ) -> (usize, Result<Option<Vec<u8>>, String>) {
        let now = host::now_micros();
        let mut ledger: Option<MutexGuard<'_, Ledger>> = None;
        let mut ping = None;
        let mut at = 0;
        while let Some(frame) = ws::next_frame(&data[at..]).transpose() {
            let ws::Frame {
                opcode,
                payload,
                len,
            } = match frame {
                Ok(frame) => frame,
                Err(e) => return (at, Err(format!("read: {e}"))),
            };
            at += len;
            match opcode {
                ws::OPCODE_TEXT => {
                    let Ok(text) = std::str::from_utf8(payload) else {
                        return (at, Err("read: text frame not UTF-8".to_owned()));
                    };
                    for record in signalr::records(text) {
                        let incoming = Incoming::parse(record);
                        *tracked += u64::from(incoming.is_tracked());
                        match incoming {
                            Incoming::Delivery(stamp) => {
                                let ledger = ledger.get_or_insert_with(|| lock(shard));
                                match stamp {
                                    Some(stamp) if Some(stamp.g as usize) == self.group => {
                                        let verdict = order.observe(stamp.n);
                                        ledger.record(
                                            stamp.s,
                                            verdict,
                                            now.saturating_sub(stamp.t),
                                        );
                                    }
                                    Some(stamp) => ledger.record_misrouted(stamp.s),
                                    None => ledger.record_unstamped(),
                                }
                            }
                            Incoming::Close(error) => {
                                let reason = format!("server close: {}", error.unwrap_or_default());
                                return (at, Err(reason));
                            }
                            _ => {}
                        }
                    }
                }
                ws::OPCODE_CLOSE => {
                    let code = ws::close_code(payload)
                        .map_or_else(|| "none".to_owned(), |c| c.to_string());
                    return (at, Err(format!("websocket close {code}")));
                }
                ws::OPCODE_PING => ping = Some(payload.to_vec()),
                _ => {}
            }
        }
        (at, Ok(ping))
    }

    /// 127.0.0.2-254, round robin by connection index, when spreading an IPv4 target.
    fn source_address(&self) -> Option<SocketAddr> {
        let spread = self.config.spread && self.config.endpoint.addr.is_ipv4();
        spread.then(|| {
            let hosts = usize::from(SOURCE_HOSTS.end() - SOURCE_HOSTS.start()) + 1;
            let host = SOURCE_HOSTS.start() + (self.index % hosts) as u8;
            SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, host)), 0)
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Handshake,
    Handshaken,
    Joining,
    Ready,
}

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Self::Handshake | Self::Handshaken => "handshake",
            Self::Joining => "join",
            Self::Ready => "ready",
        }
    }
}

/// What needs a holding connection's attention.
enum Event {
    /// Its cohort's channel changed: ping, or stop if it now holds true.
    Signal,
    /// The fleet is gone.
    Stop,
    /// Answer a WebSocket ping with this payload.
    Pong(Vec<u8>),
    /// The server or the network ended the connection, for this reason.
    Ended(String),
}

/// Negotiates a stateful connection as the official client does with
/// `withStatefulReconnect()`; returns its connection token.
async fn negotiate_stateful(
    http: &reqwest::Client,
    target: SocketAddr,
    token: &str,
) -> Result<String, String> {
    let answer = http
        .post(format!(
            "http://{target}/hub/v1/negotiate?negotiateVersion=1&useStatefulReconnect=true"
        ))
        .bearer_auth(token)
        .send()
        .await
        .map_err(|e| format!("negotiate: {e}"))?;
    let status = answer.status();
    if !status.is_success() {
        return Err(format!("negotiate: HTTP {}", status.as_u16()));
    }
    let body = answer
        .bytes()
        .await
        .map_err(|e| format!("negotiate: {e}"))?;
    signalr::stateful_connection_token(&body)
}
