//! One task per WebSocket: handshake, then one `select!` loop over the outbound queue, the
//! keep-alive timer and the socket.
//!
//! The task owns everything about its connection (socket, queue, timers, the list of its
//! groups), so there is no shared per-connection state. Frames are written in batches: whatever
//! is queued when the socket is ready goes out in one vectored write. The loop is generic over
//! the byte stream so its edge cases can be driven in memory.

mod handover;
mod ledger;
mod rate;
mod resume;
mod socket;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use publisher_lib::contract::{Group, Position};
use tokio::io::AsyncRead;
use tokio::time::{Instant, timeout, timeout_at};

pub use handover::{Carried, CarryError};
use ledger::Incoming as Counted;
pub(crate) use ledger::Ledger;
use rate::{Rates, TokenBucket, Verdict};
pub use resume::{Claim, Resumable, ResumeSlot, Resumed, Transport};
use socket::ReadError;
pub use socket::Socket;

use crate::auth::Principal;
use crate::broker::Broker;
use crate::config::Config;
use crate::groups::{ConnId, Groups};
use crate::hub::{self, Outcome};
use crate::metrics;
use crate::outbound::{self, Closing, Delivery, Frame, Inbox, Outbound};
use crate::protocol::codec::{self, Message};
use crate::protocol::frames;
use crate::protocol::handshake::{self, HandshakeError};
use crate::protocol::{CloseReason, ProtocolError, RecordBuffer};
use ws_frame::server::Incoming;

/// Frames written per system call at most, so one busy connection cannot starve its own reads.
const MAX_BATCH: usize = 64;
/// How long the final Close message and close frame may take to write.
const CLOSE_WRITE_TIMEOUT: Duration = Duration::from_secs(1);
/// What a client is told when its join fails for the broker (the detail is logged).
const GROUP_UNAVAILABLE: &str = "the group is unavailable; try again";
/// What a client is told when it resumes a group again before the last resume went out.
const RESUME_PENDING: &str =
    "a resume of this group is still being delivered; wait for its events before resuming again";
/// The close metric's reason for a task that panicked or was dropped before it could close.
const ABORTED: &str = "aborted";
/// How long after receiving a client's message a stateful connection acknowledges it (the
/// official client and ASP.NET Core both ack about once a second).
const ACK_DELAY: Duration = Duration::from_secs(1);

/// The per-connection settings, taken once from the configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Ping after this long without sending.
    pub keepalive_interval: Duration,
    /// Close after this long without receiving.
    pub client_timeout: Duration,
    /// Time allowed for the handshake.
    pub handshake_timeout: Duration,
    /// Time allowed for one batch of writes.
    pub write_timeout: Duration,
    /// Largest message accepted from the client.
    pub max_message_bytes: usize,
    /// Outbound queue capacity in frames.
    pub outbound_queue: usize,
    /// Groups one connection may be in.
    pub max_groups: usize,
    /// Frames one connection may hold in all: its queue, resume backlogs and frames held
    /// during a join. One resume of the whole history fits on top of a full queue; a resume
    /// that does not fit is answered `recovered: false`.
    pub queue_budget: usize,
    /// Hub invocations one connection may make per second (bursts of one second's worth).
    pub max_invocations_per_second: u32,
    /// Joins one connection may make per second, on top of the invocation limit.
    pub max_joins_per_second: u32,
    /// Whether fan-out may write frames straight to an idle connection's socket. It saves the
    /// connection task a wake-up per frame; with several runtime threads the connection tasks
    /// spread writes over the cores instead, so it is on only for a single-threaded runtime.
    /// A stateful connection's frames are numbered in its ledger as they are written, by
    /// fan-out or by the task alike.
    pub direct_writes: bool,
    /// Stateful reconnect: how long a lost connection waits to be resumed (zero: not offered).
    pub stateful_grace: Duration,
    /// Stateful reconnect: unacknowledged bytes a connection keeps at most.
    pub stateful_buffer: usize,
}

impl Settings {
    /// The connection slice of the configuration.
    pub fn from_config(config: &Config) -> Self {
        Self {
            keepalive_interval: config.timeouts.keepalive_interval,
            client_timeout: config.timeouts.client_timeout,
            handshake_timeout: config.timeouts.handshake_timeout,
            write_timeout: config.timeouts.write_timeout,
            max_message_bytes: config.limits.max_message_bytes,
            outbound_queue: config.limits.outbound_queue,
            max_groups: config.limits.max_groups_per_connection,
            queue_budget: config
                .limits
                .outbound_queue
                .saturating_add(config.history.size as usize),
            max_invocations_per_second: config.limits.max_invocations_per_second,
            max_joins_per_second: config.limits.max_joins_per_second,
            direct_writes: config.worker_threads() == 1,
            stateful_grace: config.timeouts.stateful_reconnect_grace,
            stateful_buffer: config.limits.stateful_reconnect_buffer,
        }
    }
}

/// Why a write failed.
enum WriteError {
    /// The socket is gone.
    Gone,
    /// The client did not take the bytes in time.
    TimedOut,
}

/// Everything a connection task needs besides its socket.
#[derive(Debug)]
pub struct Connection {
    /// Its id in the registry.
    pub id: ConnId,
    /// Who is connected.
    pub principal: Principal,
    /// The registry it joins groups in.
    pub groups: Arc<Groups>,
    /// Where a join reads what the client missed.
    pub broker: Broker,
    /// Its settings.
    pub settings: Arc<Settings>,
    /// Its admission slots, given back when the connection ends.
    pub permit: crate::limits::ConnectionPermit,
    /// A stateful connection carried here from another replica: no handshake, and it goes on
    /// where it stopped there.
    pub carried: Option<Box<Carried>>,
}

/// How a connection task starts: a handshake was read, or a carried connection goes on.
enum Start {
    Fresh(Vec<String>, RecordBuffer),
    Carried(Box<Carried>),
}

/// What the first transport starts with: the records that came with the handshake (and the
/// buffer holding the start of the next), or, for a connection carried here, its groups and
/// how far each was sent.
enum Opening {
    Handshaken(Vec<String>, RecordBuffer),
    Rejoin(Vec<(Group, Option<Position>)>),
}

/// What a connection task carries besides its socket and queue: the user token's expiry (a
/// resume may bring a fresh one) and, for a stateful connection, the slot new transports arrive
/// through (its ledger lives with its queue: [`Inbox::ledger`]).
struct Session<S> {
    valid_until: u64,
    /// Boxed: most connections are not stateful, and an idle one should stay small.
    stateful: Option<Box<StatefulState<S>>>,
}

struct StatefulState<S> {
    slot: ResumeSlot<S>,
    /// When to acknowledge what the client sent, if something is waiting for an Ack.
    ack_at: Option<Instant>,
}

/// How one transport of a connection ended.
enum Stop<S> {
    /// The connection ends (for a stateful one, maybe only this transport: see
    /// [`CloseReason::TransportLost`]).
    Close(CloseReason),
    /// A stateful connection's client came back on a new transport while the old one was
    /// still open here.
    Resumed(Box<Resumed<S>>),
    /// Another replica asked for the connection.
    HandOver,
}

impl Connection {
    /// Runs the connection to its end. With `resume` the connection is stateful: it numbers
    /// what it sends, and a lost socket is replaced by one that arrives through the slot
    /// within the grace period.
    pub async fn serve<S>(mut self, mut socket: Socket<S>, resume: Option<ResumeSlot<S>>)
    where
        S: AsyncRead + Unpin,
    {
        let carried = self.carried.take();
        metrics::connection_opened();
        let (outbound, mut inbox) =
            outbound::channel_within(self.settings.outbound_queue, self.settings.queue_budget);
        self.groups.register(self.id, &outbound);
        // From here on every exit path (the end below, a panic, the future being dropped)
        // leaves the groups, unregisters and records the close.
        let mut registration = Registration {
            id: self.id,
            groups: &self.groups,
            joined: Vec::new(),
            reason: None,
        };
        // Boxed: the handshake's state is only needed at the start, and an idle connection
        // should not carry it.
        let start = match carried {
            Some(carried) => Ok(Start::Carried(carried)),
            None => Box::pin(self.handshake(&mut socket, &mut inbox))
                .await
                .map(|(pending, buffer)| Start::Fresh(pending, buffer)),
        };
        let mut ended_stateful = None;
        let reason = match start {
            Ok(start) => {
                self.permit.handshake_completed();
                let limit = self.settings.stateful_buffer;
                let (opening, ledger) = match start {
                    Start::Fresh(pending, buffer) => {
                        (Opening::Handshaken(pending, buffer), Ledger::new(limit))
                    }
                    Start::Carried(carried) => {
                        let (groups, ledger) = carried.into_parts(limit);
                        (Opening::Rejoin(groups), ledger)
                    }
                };
                if resume.is_some() {
                    inbox.track(ledger);
                }
                let mut session = Session {
                    valid_until: self.principal.valid_until,
                    stateful: resume.map(|slot| Box::new(StatefulState { slot, ack_at: None })),
                };
                let joined = &mut registration.joined;
                let transports = self.transports(
                    &mut socket,
                    &outbound,
                    &mut inbox,
                    joined,
                    opening,
                    &mut session,
                );
                let reason = Box::pin(transports).await;
                ended_stateful = session.stateful.map(|s| s.slot);
                reason
            }
            // Before the handshake completes the client reads a handshake response, not a
            // Close message, so even a shutdown is told as a handshake error.
            Err(CloseReason::ServerShutdown) => {
                CloseReason::Handshake(HandshakeError::ShuttingDown)
            }
            Err(reason) => reason,
        };
        tracing::debug!(reason = reason.label(), "connection closed");
        registration.reason = Some(reason.label());
        drop(registration);
        // Before the close frame, which ends the client's `stop()`: an upgrade with its token
        // from then on is refused here. A handed-over connection lives on elsewhere and may
        // come back here.
        let ended = ended_stateful.and_then(|slot| {
            if reason == CloseReason::HandedOver {
                slot.handed_off();
                return None;
            }
            Some((slot.id().to_owned(), slot.token_expires()))
        });
        inbox.begin_writing();
        close(&socket, &reason).await;
        // Other replicas refuse its token from now on.
        if let Some((id, token_expires)) = ended
            && let Some(redis) = self.broker.connections()
        {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            let ttl = Duration::from_secs(token_expires.saturating_sub(now) + 1);
            // Boxed: only stateful connections on Redis get here, and only once.
            if let Err(e) = Box::pin(redis.end_connection(&id, ttl)).await {
                tracing::debug!(error = %e, "could not mark a stateful connection as ended");
            }
        }
    }

    /// Reads the handshake; returns the records that followed it in the same message and the
    /// record buffer, which may hold the start of the next record.
    async fn handshake<S>(
        &self,
        socket: &mut Socket<S>,
        inbox: &mut Inbox,
    ) -> Result<(Vec<String>, RecordBuffer), CloseReason>
    where
        S: AsyncRead + Unpin,
    {
        let deadline = Instant::now() + self.settings.handshake_timeout;
        let mut buffer = RecordBuffer::new(self.settings.max_message_bytes);
        let refuse = |error: HandshakeError| {
            metrics::handshake_failed(error.label());
            CloseReason::Handshake(error)
        };
        loop {
            let message = tokio::select! {
                biased;
                delivery = inbox.recv() => match delivery {
                    Delivery::Close(closing) => return Err(closing.into()),
                    // Nothing is sent before a group is joined.
                    Delivery::Frame(_) => continue,
                },
                message = timeout_at(deadline, socket.recv()) => message,
            };
            let text = match message {
                Err(_) => return Err(refuse(HandshakeError::Canceled)),
                Ok(Err(ReadError::Gone) | Ok(Incoming::Close(_))) => {
                    return Err(CloseReason::ClientClosed);
                }
                // Broken WebSocket framing is failed with its own close code (1009, 1007 or
                // 1002), before the handshake as after it.
                Ok(Err(ReadError::Frame(e))) => {
                    metrics::handshake_failed("bad_frame");
                    return Err(CloseReason::Protocol(e.into()));
                }
                Ok(Ok(Incoming::Text(text))) => text,
                Ok(Ok(Incoming::Binary(_))) => {
                    return Err(refuse(HandshakeError::Malformed(
                        "binary frames are not supported by the JSON hub protocol".to_owned(),
                    )));
                }
                Ok(Ok(Incoming::Ping(payload))) => {
                    pong(socket, inbox, &payload, self.settings.write_timeout).await?;
                    continue;
                }
                Ok(Ok(Incoming::Pong)) => continue,
            };
            let mut records = match buffer.feed(&text) {
                Ok(records) => records.into_iter(),
                Err(_) => return Err(refuse(HandshakeError::Canceled)),
            };
            let Some(request) = records.next() else {
                continue;
            };
            if let Err(error) = handshake::accept(&request) {
                return Err(refuse(error));
            }
            send(
                socket,
                inbox,
                handshake::ACCEPTED,
                self.settings.write_timeout,
            )
            .await
            .map_err(|_| CloseReason::ClientClosed)?;
            tracing::debug!("handshake completed");
            return Ok((records.collect(), buffer));
        }
    }

    /// Serves the connection over its first transport and, for a stateful connection, over
    /// each transport that resumes it, until it ends; returns why it ended. A connection
    /// carried here first picks up its groups.
    async fn transports<S>(
        &self,
        socket: &mut Socket<S>,
        outbound: &Outbound,
        inbox: &mut Inbox,
        joined: &mut Vec<Membership>,
        opening: Opening,
        session: &mut Session<S>,
    ) -> CloseReason
    where
        S: AsyncRead + Unpin,
    {
        let mut stop = match opening {
            Opening::Handshaken(pending, buffer) => {
                self.run(socket, outbound, inbox, joined, pending, buffer, session)
                    .await
            }
            Opening::Rejoin(rejoin) => {
                let adopted = self.adopt(socket, outbound, inbox, joined, rejoin, session);
                let started = Box::pin(adopted).await;
                self.go_on(started, socket, outbound, inbox, joined, session)
                    .await
            }
        };
        loop {
            // This transport is over: fan-out stops writing to its socket.
            inbox.detach();
            let resumed = match stop {
                Stop::Resumed(resumed) => resumed,
                Stop::HandOver => {
                    return self
                        .hand_over(joined, inbox, session, CloseReason::TransportLost)
                        .await;
                }
                Stop::Close(reason) => {
                    let Some(stateful) = session.stateful.as_mut() else {
                        return reason;
                    };
                    if reason == CloseReason::ServerShutdown {
                        // Draining: the client comes back to another replica.
                        return self.hand_over(joined, inbox, session, reason).await;
                    }
                    if !matches!(
                        reason,
                        CloseReason::TransportLost | CloseReason::ClientTimeout
                    ) {
                        return reason;
                    }
                    // No Close message: the client would stop instead of resuming.
                    let _ = timeout(
                        CLOSE_WRITE_TIMEOUT,
                        socket.close(CloseReason::TransportLost.ws_code(), reason.label()),
                    )
                    .await;
                    metrics::stateful_transport("lost");
                    tracing::debug!(
                        reason = reason.label(),
                        "transport lost; waiting for a resume"
                    );
                    let grace = self.settings.stateful_grace;
                    let next = tokio::select! {
                        biased;
                        closing = inbox.closed() => Err(CloseReason::from(closing)),
                        transport = stateful.slot.transports.recv() => transport.ok_or(reason),
                        () = tokio::time::sleep(grace) => {
                            metrics::stateful_transport("expired");
                            tracing::debug!("no resume within the grace period");
                            Err(reason)
                        }
                    };
                    match next {
                        Ok(Transport::Resumed(resumed)) => resumed,
                        Ok(Transport::HandOver) => {
                            return self
                                .hand_over(joined, inbox, session, CloseReason::TransportLost)
                                .await;
                        }
                        Err(CloseReason::ServerShutdown) => {
                            return self
                                .hand_over(joined, inbox, session, CloseReason::ServerShutdown)
                                .await;
                        }
                        Err(reason) => return reason,
                    }
                }
            };
            if session.stateful.is_none() {
                return CloseReason::ServerShutdown;
            }
            // The old socket (if still open) closes as it is dropped here.
            *socket = resumed.socket;
            session.valid_until = resumed.valid_until;
            metrics::stateful_transport("resumed");
            if let Some((from, unacked)) = inbox.ledger(|l| (l.resume_from(), l.unacked_bytes())) {
                tracing::debug!(from, unacked.bytes = unacked, "resumed");
            }
            let replayed = replay(socket, inbox, self.settings.write_timeout);
            let started = replayed.await.map_err(CloseReason::from);
            stop = self
                .go_on(started, socket, outbound, inbox, joined, session)
                .await;
        }
    }

    /// Serves a transport that `started` (a resume's replay, or an adoption) on a socket whose
    /// first bytes are the client's Sequence: no records wait, and the record buffer is new.
    async fn go_on<S>(
        &self,
        started: Result<(), CloseReason>,
        socket: &mut Socket<S>,
        outbound: &Outbound,
        inbox: &mut Inbox,
        joined: &mut Vec<Membership>,
        session: &mut Session<S>,
    ) -> Stop<S>
    where
        S: AsyncRead + Unpin,
    {
        if let Err(reason) = started {
            return Stop::Close(reason);
        }
        let buffer = RecordBuffer::new(self.settings.max_message_bytes);
        self.run(socket, outbound, inbox, joined, Vec::new(), buffer, session)
            .await
    }

    /// Leaves a stateful connection in Redis for the replica its client comes back to, and
    /// ends it here; without Redis (or when Redis fails) it ends with `otherwise`.
    async fn hand_over<S>(
        &self,
        joined: &[Membership],
        inbox: &Inbox,
        session: &Session<S>,
        otherwise: CloseReason,
    ) -> CloseReason {
        let (Some(stateful), Some(redis)) = (session.stateful.as_ref(), self.broker.connections())
        else {
            return otherwise;
        };
        let carried = inbox.ledger(|ledger| {
            Carried::new(
                &self.principal.subject,
                joined.iter().map(|m| &m.group),
                ledger,
            )
        });
        let Some(carried) = carried else {
            return otherwise;
        };
        let parked = redis
            .park(
                stateful.slot.id(),
                &carried.to_bytes(),
                self.settings.stateful_grace,
            )
            .await;
        match parked {
            Ok(()) => {
                metrics::stateful_transport("handed_over");
                tracing::debug!(groups = joined.len(), "handed over");
                CloseReason::HandedOver
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not hand a stateful connection over");
                otherwise
            }
        }
    }

    /// Goes on with a connection carried from another replica: the Sequence and the messages
    /// the client has not acknowledged, then each group joined again after the position it
    /// was sent up to. A group that cannot be picked up there ends the connection: the client
    /// then starts over rather than miss events.
    async fn adopt<S>(
        &self,
        socket: &mut Socket<S>,
        outbound: &Outbound,
        inbox: &mut Inbox,
        joined: &mut Vec<Membership>,
        rejoin: Vec<(Group, Option<Position>)>,
        session: &mut Session<S>,
    ) -> Result<(), CloseReason>
    where
        S: AsyncRead + Unpin,
    {
        if session.stateful.is_none() {
            return Err(CloseReason::ResumeGap);
        }
        metrics::stateful_transport("adopted");
        replay(socket, inbox, self.settings.write_timeout)
            .await
            .map_err(CloseReason::from)?;
        for (group, sent) in rejoin {
            // The token presented here decides, as for any join.
            if crate::auth::may_join(&self.principal, &group).is_err() {
                tracing::info!(%group, "the resuming token no longer allows a carried group; closing");
                return Err(CloseReason::ResumeGap);
            }
            let joining = self.join("JoinGroup", group.clone(), sent.clone(), outbound, joined);
            match Box::pin(joining).await {
                Ok(rejoined) if sent.is_none() || rejoined.recovered == Some(true) => {
                    inbox.ledger(|l| l.joined(&group, sent_from(sent, &rejoined)));
                }
                _ => {
                    tracing::info!(%group, "a carried group could not be picked up; closing");
                    return Err(CloseReason::ResumeGap);
                }
            }
        }
        tracing::debug!(groups = joined.len(), "carried connection adopted");
        Ok(())
    }

    /// Serves one transport until it ends.
    #[allow(clippy::too_many_arguments)]
    async fn run<S>(
        &self,
        socket: &mut Socket<S>,
        outbound: &Outbound,
        inbox: &mut Inbox,
        joined: &mut Vec<Membership>,
        pending: Vec<String>,
        mut buffer: RecordBuffer,
        session: &mut Session<S>,
    ) -> Stop<S>
    where
        S: AsyncRead + Unpin,
    {
        let settings = &self.settings;
        let mut last_sent = Instant::now();
        let mut last_received = Instant::now();
        let token_expires = token_deadline(session.valid_until);
        // Made at the first invocation: many connections make one or two.
        let mut rates: Option<Box<Rates>> = None;
        if settings.direct_writes {
            inbox.attach(socket.wire());
        }
        let handled = self.on_records(
            socket, inbox, pending, outbound, joined, &mut rates, session,
        );
        if let Err(reason) = handled.await {
            return Stop::Close(reason);
        }
        let timer = tokio::time::sleep_until(next_tick(
            last_sent,
            last_received,
            token_expires,
            settings,
            session,
        ));
        tokio::pin!(timer);
        // Three branches: everything the gateway sends this connection (frames, and the order to
        // close) arrives through the inbox, so a delivery wakes one queue, not a shutdown token
        // shared by every connection.
        loop {
            tokio::select! {
                biased;
                delivery = inbox.recv() => {
                    let frame = match delivery {
                        Delivery::Frame(frame) => frame,
                        Delivery::Close(closing) => return Stop::Close(closing.into()),
                    };
                    let written = write_batch(socket, frame, inbox, settings.write_timeout);
                    if let Err(e) = written.await {
                        return Stop::Close(e.into());
                    }
                    last_sent = Instant::now();
                }
                Some(transport) = next_transport(session) => return match transport {
                    Transport::Resumed(resumed) => Stop::Resumed(resumed),
                    Transport::HandOver => Stop::HandOver,
                },
                () = &mut timer => {
                    let now = Instant::now();
                    if now >= token_expires {
                        return Stop::Close(CloseReason::TokenExpired);
                    }
                    if now >= last_received + settings.client_timeout {
                        return Stop::Close(CloseReason::ClientTimeout);
                    }
                    if let Some(stateful) = session.stateful.as_mut()
                        && stateful.ack_at.is_some_and(|at| now >= at)
                    {
                        stateful.ack_at = None;
                        if let Some(id) = inbox.ledger(|l| l.ack_due()).flatten() {
                            if let Err(e) = send(socket, inbox, &codec::encode_ack(id), settings.write_timeout).await {
                                return Stop::Close(e.into());
                            }
                            inbox.ledger(|l| l.ack_sent(id));
                            last_sent = Instant::now();
                        }
                    }
                    if now >= last_sent + settings.keepalive_interval {
                        if let Err(e) = send(socket, inbox, codec::PING, settings.write_timeout).await {
                            return Stop::Close(e.into());
                        }
                        last_sent = Instant::now();
                    }
                    timer.as_mut().reset(next_tick(last_sent, last_received, token_expires, settings, session));
                }
                message = socket.recv() => {
                    last_received = Instant::now();
                    let text = match message {
                        Ok(Incoming::Text(text)) => text,
                        Ok(Incoming::Close(_)) => return Stop::Close(CloseReason::ClientClosed),
                        Err(ReadError::Gone) => return Stop::Close(CloseReason::TransportLost),
                        Ok(Incoming::Binary(_)) => return Stop::Close(CloseReason::Protocol(ProtocolError::Binary)),
                        Ok(Incoming::Ping(payload)) => {
                            // Boxed: WebSocket pings are rare (SignalR pings are records).
                            let answered = Box::pin(pong(socket, inbox, &payload, settings.write_timeout));
                            if let Err(e) = answered.await {
                                return Stop::Close(e);
                            }
                            last_sent = Instant::now();
                            continue;
                        }
                        Ok(Incoming::Pong) => continue,
                        Err(ReadError::Frame(e)) => {
                            return Stop::Close(CloseReason::Protocol(e.into()));
                        }
                    };
                    let records = match buffer.feed(&text) {
                        Ok(records) => records,
                        Err(e) => return Stop::Close(CloseReason::Protocol(e)),
                    };
                    let handled = self.on_records(socket, inbox, records, outbound, joined, &mut rates, session);
                    if let Err(reason) = handled.await {
                        return Stop::Close(reason);
                    }
                    // A message from the client may now wait for its Ack.
                    if session.stateful.as_ref().is_some_and(|s| s.ack_at.is_some()) {
                        timer.as_mut().reset(next_tick(last_sent, last_received, token_expires, settings, session));
                    }
                }
            }
        }
    }

    /// Acts on the client's records in order. Direct writes from fan-out wait meanwhile
    /// ([`Inbox::hold`]), so a stateful connection's ledger records a join before any frame of
    /// its group.
    #[allow(clippy::too_many_arguments)]
    async fn on_records<S>(
        &self,
        socket: &mut Socket<S>,
        inbox: &Inbox,
        records: Vec<String>,
        outbound: &Outbound,
        joined: &mut Vec<Membership>,
        rates: &mut Option<Box<Rates>>,
        session: &mut Session<S>,
    ) -> Result<(), CloseReason>
    where
        S: AsyncRead + Unpin,
    {
        inbox.hold();
        for record in records {
            // Boxed: joins and their broker round trip are rare, and an idle connection should
            // not carry their state.
            Box::pin(self.on_record(socket, inbox, &record, outbound, joined, rates, session))
                .await?;
        }
        inbox.release();
        Ok(())
    }

    /// Acts on one record from the client.
    #[allow(clippy::too_many_arguments)]
    async fn on_record<S>(
        &self,
        socket: &mut Socket<S>,
        inbox: &Inbox,
        record: &str,
        outbound: &Outbound,
        joined: &mut Vec<Membership>,
        rates: &mut Option<Box<Rates>>,
        session: &mut Session<S>,
    ) -> Result<(), CloseReason>
    where
        S: AsyncRead + Unpin,
    {
        let message = codec::decode(record).map_err(CloseReason::Protocol)?;
        if let Some(stateful) = session.stateful.as_mut() {
            match &message {
                Message::Ack(id) => {
                    inbox.ledger(|l| l.acked(*id));
                }
                Message::Sequence(id) => {
                    if let Some(Err(e)) = inbox.ledger(|l| l.client_sequence(*id)) {
                        return Err(CloseReason::Protocol(ProtocolError::Malformed(
                            e.to_string(),
                        )));
                    }
                }
                m if m.is_trackable() => {
                    if inbox.ledger(|l| l.received()) == Some(Counted::Repeat) {
                        return Ok(());
                    }
                    stateful
                        .ack_at
                        .get_or_insert_with(|| Instant::now() + ACK_DELAY);
                }
                _ => {}
            }
        }
        let invocation = match message {
            Message::Invocation(invocation) => invocation,
            Message::Ping | Message::Ignored(_) | Message::Ack(_) | Message::Sequence(_) => {
                return Ok(());
            }
            Message::Close => return Err(CloseReason::ClientClosed),
        };
        let action = hub::handle(&self.principal, &invocation);
        if let Some((limit, reason)) = self.over_limit(rates, &action.outcome)? {
            metrics::limit_exceeded(limit);
            tracing::debug!(method = %invocation.target, limit, "invocation refused");
            let Some(id) = action.invocation_id else {
                return Ok(());
            };
            let error = frames::hub_exception(&invocation.target, reason);
            let completion = frames::error_completion(&id, &error);
            return reply(socket, inbox, &completion, self.settings.write_timeout)
                .await
                .map_err(CloseReason::from);
        }
        let mut result = None;
        let error = match action.outcome {
            Outcome::Join { group, after } => {
                // Boxed: the join's broker round trip nests deep futures, which the
                // connection's own future should neither carry nor have to lay out.
                let joining = self.join(&invocation.target, group, after.clone(), outbound, joined);
                match Box::pin(joining).await {
                    Ok(joined) => {
                        inbox.ledger(|l| l.joined(&joined.group, sent_from(after, &joined)));
                        result = Some(joined);
                        None
                    }
                    Err(e) => Some(e),
                }
            }
            Outcome::Leave(group) => {
                if let Some(at) = joined.iter().position(|m| m.group == group) {
                    joined.swap_remove(at);
                    self.groups.leave_now(self.id, &group);
                    inbox.ledger(|l| l.left(&group));
                    tracing::debug!(%group, "left");
                }
                None
            }
            Outcome::Error(e) => {
                metrics::join(e.label());
                tracing::debug!(method = %invocation.target, reason = e.label(), "invocation refused");
                Some(e.to_string())
            }
        };
        let Some(id) = action.invocation_id else {
            return Ok(());
        };
        let completion = match (result, error) {
            (Some(joined), _) => {
                frames::join_completion(&id, &joined.group, &joined.head, joined.recovered)
            }
            (None, Some(error)) => frames::error_completion(&id, &error),
            (None, None) => frames::ok_completion(&id),
        };
        reply(socket, inbox, &completion, self.settings.write_timeout)
            .await
            .map_err(CloseReason::from)
    }

    /// Takes this invocation from the connection's rate limits: `None` within them, the limit's
    /// label and the client's reason past one.
    ///
    /// # Errors
    /// [`CloseReason::Flooding`] for a client far past a limit, again and again.
    fn over_limit(
        &self,
        rates: &mut Option<Box<Rates>>,
        outcome: &Outcome,
    ) -> Result<Option<(&'static str, &'static str)>, CloseReason> {
        let now = Instant::now();
        let rates = rates.get_or_insert_with(|| {
            Box::new(Rates {
                invocations: TokenBucket::new(self.settings.max_invocations_per_second, now),
                joins: TokenBucket::new(self.settings.max_joins_per_second, now),
            })
        });
        let mut verdict = (
            rates.invocations.take(now),
            "invocations_per_connection",
            "too many invocations; slow down",
        );
        if verdict.0 == Verdict::Allowed && matches!(outcome, Outcome::Join { .. }) {
            verdict = (
                rates.joins.take(now),
                "joins_per_connection",
                "too many joins; slow down",
            );
        }
        match verdict {
            (Verdict::Allowed, ..) => Ok(None),
            (Verdict::Refused, limit, reason) => Ok(Some((limit, reason))),
            (Verdict::Flooding, limit, _) => {
                metrics::limit_exceeded(limit);
                tracing::info!(limit, "closing a client that floods past its rate limit");
                Err(CloseReason::Flooding)
            }
        }
    }

    /// Joins `group`, resuming after `after` ([`Groups::join_resuming`]), within the
    /// connection's limits (groups per connection, one resume per group at a time), and
    /// returns what the completion tells the client.
    async fn join(
        &self,
        method: &str,
        group: Group,
        after: Option<Position>,
        outbound: &Outbound,
        joined: &mut Vec<Membership>,
    ) -> Result<Joined, String> {
        let member = joined.iter().position(|m| m.group == group);
        let already = member.is_some();
        // One resume per group at a time: reading the history again for a client that has not
        // taken the last one would let a single message make the server hold it many times.
        if let Some(at) = member
            && after.is_some()
            && outbound.taken() < joined[at].resumed_through
        {
            metrics::join("resume_pending");
            return Err(frames::hub_exception(method, RESUME_PENDING));
        }
        if !already && joined.len() >= self.settings.max_groups {
            metrics::join("too_many_groups");
            let reason = format!(
                "this connection is already in {} groups, the limit",
                joined.len()
            );
            return Err(frames::hub_exception(method, reason));
        }
        if !already {
            // Listed before the first await, so a task cut short mid-join still leaves it.
            joined.push(Membership {
                group: group.clone(),
                resumed_through: 0,
            });
        }
        let resuming =
            self.groups
                .join_resuming(self.id, &group, outbound, after.as_ref(), &self.broker);
        match resuming.await {
            Ok(resumed) => {
                if let Some(through) = resumed.through
                    && let Some(m) = joined.iter_mut().find(|m| m.group == group)
                {
                    m.resumed_through = through;
                }
                let outcome = match resumed.recovered {
                    None => "joined",
                    Some(true) => "recovered",
                    Some(false) => "not_recovered",
                };
                metrics::join(outcome);
                tracing::debug!(%group, missed = resumed.missed, outcome, "joined");
                Ok(Joined {
                    group,
                    head: resumed.head,
                    recovered: resumed.recovered,
                })
            }
            Err(e) => {
                // The registry already took a new member out again; an old one stays in.
                if !already {
                    joined.retain(|m| m.group != group);
                }
                metrics::join("broker_unavailable");
                // The broker's text can name Redis hosts or carry its error replies: it is for
                // the log, and the client only learns that it may try again.
                tracing::warn!(%group, error = %e, "join failed: broker unavailable");
                Err(frames::hub_exception(method, GROUP_UNAVAILABLE))
            }
        }
    }
}

/// How far a group has been sent to a client once its join succeeded: up to the position it
/// resumed from when the missed events are on their way, else up to the head.
fn sent_from(after: Option<Position>, joined: &Joined) -> Position {
    match after {
        Some(after) if joined.recovered == Some(true) => after,
        _ => joined.head.clone(),
    }
}

/// A join that succeeded: what its completion tells the client.
#[derive(Debug)]
struct Joined {
    group: Group,
    head: Position,
    recovered: Option<bool>,
}

/// A group the connection is in.
#[derive(Debug)]
struct Membership {
    group: Group,
    /// The queue's count of frames taken at which the group's last resume is all written.
    resumed_through: u64,
}

/// Undoes what a connection registered, on every exit path: the end of `serve`, a panic
/// inside the task, or the task's future being dropped (cancellation). It removes the
/// connection from its groups without awaiting, forgets its queue and records the close metric,
/// so no bug can leave a member, a registry entry or the connection gauge behind.
struct Registration<'a> {
    id: ConnId,
    groups: &'a Groups,
    /// The groups the connection is in (or joining).
    joined: Vec<Membership>,
    /// Why it ended, once `serve` knows; `None` when it was cut short.
    reason: Option<&'static str>,
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        for membership in self.joined.drain(..) {
            self.groups.leave_now(self.id, &membership.group);
        }
        self.groups.unregister(self.id);
        let reason = self.reason.unwrap_or_else(|| {
            tracing::warn!("connection task ended abnormally (panic or cancellation); cleaned up");
            ABORTED
        });
        metrics::connection_closed(reason);
    }
}

impl From<Closing> for CloseReason {
    fn from(closing: Closing) -> Self {
        match closing {
            Closing::SlowConsumer => CloseReason::SlowConsumer,
            Closing::Shutdown => CloseReason::ServerShutdown,
        }
    }
}

impl From<WriteError> for CloseReason {
    fn from(error: WriteError) -> Self {
        match error {
            WriteError::Gone => CloseReason::TransportLost,
            WriteError::TimedOut => CloseReason::SlowConsumer,
        }
    }
}

/// Sends a completion: on a stateful connection it is numbered and kept until acknowledged.
async fn reply<S>(
    socket: &Socket<S>,
    inbox: &Inbox,
    text: &str,
    limit: Duration,
) -> Result<(), WriteError>
where
    S: AsyncRead + Unpin,
{
    let frame = Frame::new(ws_frame::server::text_frame(text.as_bytes()));
    inbox.begin_writing_counted(&frame);
    write_alone(inbox, limit, socket.send_frame(&frame.bytes())).await
}

/// The next transport of a stateful connection; never ready for a connection that is not.
async fn next_transport<S>(session: &mut Session<S>) -> Option<Transport<S>> {
    match session.stateful.as_mut() {
        Some(stateful) => stateful.slot.transports.recv().await,
        None => std::future::pending().await,
    }
}

/// Starts a resumed transport: the Sequence, then every message the client has not
/// acknowledged, in order and with their ids, in as few writes as the kernel allows. (No
/// socket is attached for direct writes meanwhile: [`Connection::run`] attaches it.)
async fn replay<S>(socket: &Socket<S>, inbox: &Inbox, limit: Duration) -> Result<(), WriteError>
where
    S: AsyncRead + Unpin,
{
    let frames = inbox
        .ledger(|ledger| {
            let sequence = codec::encode_sequence(ledger.resume_from());
            let mut frames = vec![ws_frame::server::text_frame(sequence.as_bytes())];
            frames.extend(ledger.unacked().map(Frame::bytes));
            frames
        })
        .unwrap_or_default();
    write_alone(inbox, limit, socket.send_frames(&frames)).await
}

/// Writes one text message under the write timeout, holding off direct writes from fan-out.
async fn send<S>(
    socket: &Socket<S>,
    inbox: &Inbox,
    text: &str,
    limit: Duration,
) -> Result<(), WriteError>
where
    S: AsyncRead + Unpin,
{
    write_alone(inbox, limit, socket.send_text(text)).await
}

/// Answers a client's ping under the write timeout, holding off direct writes from fan-out so
/// an event frame never lands inside a half-written pong.
async fn pong<S>(
    socket: &Socket<S>,
    inbox: &Inbox,
    payload: &[u8],
    limit: Duration,
) -> Result<(), CloseReason>
where
    S: AsyncRead + Unpin,
{
    write_alone(inbox, limit, socket.pong(payload))
        .await
        .map_err(CloseReason::from)
}

/// Runs one write of the connection task: direct writes from fan-out are held off until it
/// ends, and it may take at most `limit` (a client that does not read is a slow consumer).
async fn write_alone(
    inbox: &Inbox,
    limit: Duration,
    write: impl Future<Output = std::io::Result<()>>,
) -> Result<(), WriteError> {
    inbox.begin_writing();
    let outcome = timeout(limit, write).await;
    inbox.finish_writing();
    write_outcome(outcome)
}

/// What a write under a time limit came to.
fn write_outcome(
    outcome: Result<std::io::Result<()>, tokio::time::error::Elapsed>,
) -> Result<(), WriteError> {
    match outcome {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(WriteError::Gone),
        Err(_) => Err(WriteError::TimedOut),
    }
}

/// Writes `first` and whatever else is queued, in one vectored write where the kernel takes it.
/// The queue numbers each frame in a stateful connection's ledger as it hands it over, and
/// hands none over while that ledger is full.
async fn write_batch<S>(
    socket: &Socket<S>,
    first: Frame,
    inbox: &mut Inbox,
    limit: Duration,
) -> Result<(), WriteError>
where
    S: AsyncRead + Unpin,
{
    let write = async {
        match inbox.try_recv() {
            // The common case at moderate load: one frame, no batch to build.
            None => socket.send_frame(&first.bytes()).await,
            Some(second) => {
                let mut batch: Vec<Bytes> = Vec::with_capacity(8);
                batch.push(first.bytes());
                batch.push(second.bytes());
                while batch.len() < MAX_BATCH {
                    let Some(frame) = inbox.try_recv() else {
                        break;
                    };
                    batch.push(frame.bytes());
                }
                socket.send_frames(&batch).await
            }
        }
    };
    let outcome = timeout(limit, write).await;
    inbox.finish_writing();
    write_outcome(outcome)
}

/// Sends the Close record (or the handshake error) and a close frame, best effort.
async fn close<S>(socket: &Socket<S>, reason: &CloseReason)
where
    S: AsyncRead + Unpin,
{
    let record = match reason {
        // Before the handshake completes the client reads a handshake response, not a Close.
        CloseReason::Handshake(error) => Some(error.reply()),
        // The client ended it, or the socket is gone: only a close frame, if anything.
        CloseReason::ClientClosed | CloseReason::TransportLost | CloseReason::HandedOver => None,
        other => Some(other.record()),
    };
    let _ = timeout(CLOSE_WRITE_TIMEOUT, async {
        if let Some(record) = record {
            socket.send_text(&record).await?;
        }
        socket.close(reason.ws_code(), reason.label()).await
    })
    .await;
}

/// The instant the token expires, or far in the future for a token without a usable expiry.
fn token_deadline(valid_until: u64) -> Instant {
    let now_unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let left = Duration::from_secs(valid_until.saturating_sub(now_unix));
    Instant::now() + left.min(Duration::from_secs(365 * 24 * 3600))
}

/// When the timer must next look: the earliest of ping, client timeout, token expiry and a
/// stateful connection's Ack.
fn next_tick<S>(
    last_sent: Instant,
    last_received: Instant,
    token_expires: Instant,
    settings: &Settings,
    session: &Session<S>,
) -> Instant {
    let tick = (last_sent + settings.keepalive_interval)
        .min(last_received + settings.client_timeout)
        .min(token_expires);
    match session.stateful.as_ref().and_then(|s| s.ack_at) {
        Some(at) => tick.min(at),
        None => tick,
    }
}

#[cfg(test)]
mod tests;
