//! The churn: new connections at a steady rate, each ending by one of the [`Kind`]s (a clean
//! close, a TCP reset, a drop without a close frame, or one of issue 11's hostile inputs), and
//! the count of how the server answered each.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior, interval, sleep, timeout};
use uuid::Uuid;

use super::client::{Conn, PING, Rng, connect_tcp, io, join_record};
use super::{ChurnArgs, Plan, progress, shorten};
use crate::ws;

/// Bound on one churn connection's whole life; past it the task is dropped and counted.
const CHURN_LIFETIME: Duration = Duration::from_secs(30);

/// Longest a joined churn connection stays before it ends (uniform from zero).
const MAX_DWELL_MS: u64 = 2000;

/// How long a half-sent upgrade or handshake is held before the client drops it: longer than
/// the gateway's default header-read (10 s) and handshake (15 s) timeouts, so the outcome
/// says whether the server bounds them.
const HALF_HOLD: Duration = Duration::from_secs(20);

/// WebSocket pings the `ping-flood` kind sends without reading anything: 5 MB of pings, whose
/// 5 MB of pongs are more than the server's send buffer holds (4 MiB at most with this
/// machine's `tcp_wmem`), so the server's pong writes block unless it bounds them.
const FLOOD_PINGS: usize = 40_000;

/// Pings written per `write_all` in the flood.
const FLOOD_BATCH: usize = 1000;

/// Receive buffer of a `ping-flood` connection, so the server's pongs back up quickly.
const FLOOD_RECV_BUFFER: u32 = 4096;

/// How long `ping-flood` keeps sending and not reading before it resets the connection:
/// longer than the gateway's default write timeout (10 s), so the outcome says whether the
/// server closed it.
const FLOOD_HOLD: Duration = Duration::from_secs(20);

/// After the hold, how long `ping-flood` reads what is left to see whether the server has
/// closed the connection (EOF or reset after the buffered pongs) or not.
const FLOOD_DRAIN: Duration = Duration::from_secs(5);

/// After the burst, `ping-flood` sends one more ping this often (a failed send shows that the
/// server closed the connection).
const FLOOD_TRICKLE: Duration = Duration::from_millis(200);

/// Size of the `oversized` kind's text message: above any sensible `--max-message-size`.
const OVERSIZED_BYTES: usize = 256 * 1024;

/// The overflow probe of issue 11: a text frame with FIN clear and one masked byte...
const OVERFLOW_FIRST: [u8; 7] = [0x01, 0x81, 0, 0, 0, 0, 0x78];

/// ...then a continuation frame whose 64-bit length is `u64::MAX`.
const OVERFLOW_SECOND: [u8; 14] = [
    0x80, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0, 0, 0,
];

/// How a churn connection ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Kind {
    /// Joins, stays a moment, sends a close frame and waits for the server's.
    Clean,
    /// Joins, stays a moment, resets the TCP connection (linger 0).
    Reset,
    /// Joins, stays a moment, closes the socket without a close frame.
    Drop,
    /// Joins, then the frame-length overflow probe of issue 11.
    Overflow,
    /// Joins, then one text message far above the size limit.
    Oversized,
    /// Joins, then an unmasked client frame.
    Unmasked,
    /// Joins, then bytes that are no WebSocket frame.
    Garbage,
    /// Sends half the HTTP upgrade request, holds, drops.
    HalfUpgrade,
    /// Upgrades, sends half the SignalR handshake, holds, drops.
    HalfHandshake,
    /// Joins, then re-joins many times in one message with an old position.
    RejoinOld,
    /// Joins, then re-joins with a position far ahead of the group's head.
    ForgedPosition,
    /// Joins, then sends pings and never reads, then resets.
    PingFlood,
}

impl Kind {
    pub(super) const HOSTILE: [Self; 9] = [
        Self::Overflow,
        Self::Oversized,
        Self::Unmasked,
        Self::Garbage,
        Self::HalfUpgrade,
        Self::HalfHandshake,
        Self::RejoinOld,
        Self::ForgedPosition,
        Self::PingFlood,
    ];

    pub(super) fn label(self) -> &'static str {
        match self {
            Self::Clean => "clean",
            Self::Reset => "reset",
            Self::Drop => "drop",
            Self::Overflow => "overflow",
            Self::Oversized => "oversized",
            Self::Unmasked => "unmasked",
            Self::Garbage => "garbage",
            Self::HalfUpgrade => "half-upgrade",
            Self::HalfHandshake => "half-handshake",
            Self::RejoinOld => "rejoin-old",
            Self::ForgedPosition => "forged-position",
            Self::PingFlood => "ping-flood",
        }
    }

    pub(super) fn from_label(label: &str) -> Option<Self> {
        Self::HOSTILE.into_iter().find(|k| k.label() == label)
    }
}

/// Churn counts: per kind, started and each outcome.
#[derive(Debug, Default)]
pub(super) struct ChurnTally {
    counts: Mutex<BTreeMap<&'static str, BTreeMap<String, u64>>>,
    skipped: AtomicU64,
}

impl ChurnTally {
    pub(super) fn record(&self, kind: Kind, outcome: &str) {
        let mut counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        let per_kind = counts.entry(kind.label()).or_default();
        *per_kind.entry(shorten(outcome)).or_default() += 1;
    }

    pub(super) fn snapshot(&self) -> serde_json::Value {
        let counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        let total: u64 = counts.values().flat_map(|m| m.values()).sum();
        serde_json::json!({
            "total": total,
            "skippedAtInflightBound": self.skipped.load(Ordering::Relaxed),
            "byKind": *counts,
        })
    }
}

/// Starts `--churn-rate` connections a second for `--secs`, then waits for them to end.
pub(super) async fn churn(
    args: &ChurnArgs,
    plan: &Arc<Plan>,
    tally: &Arc<ChurnTally>,
    started: Instant,
) {
    let mut tasks = JoinSet::new();
    if args.churn_rate > 0 && args.secs > 0 {
        let end = Instant::now() + Duration::from_secs(args.secs);
        let mut tick = interval(Duration::from_secs_f64(1.0 / f64::from(args.churn_rate)));
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut report_at = Instant::now() + Duration::from_secs(60);
        let mut rng = Rng::new();
        let mut n = args.stable;
        while Instant::now() < end {
            tick.tick().await;
            while tasks.try_join_next().is_some() {}
            if tasks.len() >= args.max_inflight {
                tally.skipped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let kind = pick(&mut rng, args, &plan.hostile);
            let (task_plan, task_tally) = (Arc::clone(plan), Arc::clone(tally));
            let seed = rng.next();
            n += 1;
            tasks.spawn(async move {
                let (plan, tally) = (task_plan, task_tally);
                let outcome = match timeout(CHURN_LIFETIME, churn_one(&plan, n, kind, seed)).await {
                    Ok(Ok(outcome)) => outcome,
                    Ok(Err(reason)) => reason,
                    Err(_) => "lifetime exceeded".to_owned(),
                };
                tally.record(kind, &outcome);
            });
            if Instant::now() >= report_at {
                report_at += Duration::from_secs(60);
                progress(&serde_json::json!({
                    "phase": "churn", "secs": started.elapsed().as_secs(),
                    "inflight": tasks.len(), "churn": tally.snapshot(),
                }));
            }
        }
    }
    // Every task ends within CHURN_LIFETIME; the bound is a second line.
    let all = async { while tasks.join_next().await.is_some() {} };
    if timeout(CHURN_LIFETIME + Duration::from_secs(5), all)
        .await
        .is_err()
    {
        tasks.abort_all();
    }
}

fn pick(rng: &mut Rng, args: &ChurnArgs, hostile: &[Kind]) -> Kind {
    let roll = rng.unit();
    if roll < args.hostile_share && !hostile.is_empty() {
        hostile[rng.below(hostile.len())]
    } else if roll < args.hostile_share + args.abrupt_share {
        if rng.below(2) == 0 {
            Kind::Reset
        } else {
            Kind::Drop
        }
    } else {
        Kind::Clean
    }
}

/// One churn connection; `Ok` carries the outcome label, `Err` why it could not get as far as
/// its kind needs (also a label).
async fn churn_one(plan: &Plan, n: usize, kind: Kind, seed: u64) -> Result<String, String> {
    let mut rng = Rng::from_seed(seed);
    let group = rng.below(plan.groups);
    let token = plan.token(&format!("soak-churn-{n}"), group)?;
    let target = plan.target(n);
    match kind {
        Kind::HalfUpgrade => {
            let mut stream = connect_tcp(target, n, None).await?;
            let request = ws::upgrade_request(
                &target.to_string(),
                &format!("/hub/v1?access_token={token}"),
                &ws::client_key(*Uuid::new_v4().as_bytes()),
                plan.origin.as_deref(),
            )?;
            let half = &request.as_bytes()[..request.len() / 2];
            stream.write_all(half).await.map_err(io("send"))?;
            return Ok(hold_then_drop(stream, HALF_HOLD).await);
        }
        Kind::HalfHandshake => {
            let conn = Conn::upgrade(plan, target, n, &token, None).await?;
            let mut stream = conn.stream;
            let half = ws::client_frame(ws::OPCODE_TEXT, b"{\"protocol\":\"json\",", conn.mask);
            stream.write_all(&half).await.map_err(io("send"))?;
            return Ok(hold_then_drop(stream, HALF_HOLD).await);
        }
        _ => {}
    }
    let mut conn = Conn::upgrade(plan, target, n, &token, None)
        .await?
        .handshake()
        .await?;
    let joined = conn.join(group, None, "1").await?;
    match kind {
        Kind::Clean | Kind::Reset | Kind::Drop => {
            let dwell = Duration::from_millis(rng.below(MAX_DWELL_MS as usize + 1) as u64);
            let _ = timeout(dwell, conn.discard_until_closed()).await;
            match kind {
                Kind::Clean => {
                    conn.send(ws::OPCODE_CLOSE, &1000_u16.to_be_bytes())
                        .await
                        .map_err(io("close"))?;
                    Ok(conn.await_answer().await)
                }
                Kind::Reset => {
                    conn.stream.set_zero_linger().map_err(io("linger"))?;
                    Ok("reset".to_owned())
                }
                _ => Ok("dropped".to_owned()),
            }
        }
        Kind::Overflow => {
            conn.stream
                .write_all(&OVERFLOW_FIRST)
                .await
                .map_err(io("send"))?;
            let _ = conn.stream.write_all(&OVERFLOW_SECOND).await;
            Ok(conn.await_answer().await)
        }
        Kind::Oversized => {
            let mut message = vec![b' '; OVERSIZED_BYTES];
            message.push(0x1e);
            let _ = conn.send(ws::OPCODE_TEXT, &message).await;
            Ok(conn.await_answer().await)
        }
        Kind::Unmasked => {
            let ping = PING.as_bytes();
            let mut frame = vec![0x81, ping.len() as u8];
            frame.extend_from_slice(ping);
            conn.stream.write_all(&frame).await.map_err(io("send"))?;
            Ok(conn.await_answer().await)
        }
        Kind::Garbage => {
            let garbage: Vec<u8> = (0..256).map(|_| rng.next() as u8).collect();
            let _ = conn.stream.write_all(&garbage).await;
            Ok(conn.await_answer().await)
        }
        Kind::RejoinOld => {
            let region = Plan::region(group);
            let old = format!(
                "{{\"epoch\":\"{}\",\"seq\":1}}",
                joined.map(|p| p.epoch).unwrap_or_default()
            );
            let mut text = String::new();
            for i in 0..plan.rejoins {
                text.push_str(&join_record(&region, Some(&old), &format!("r{i}")));
            }
            conn.send_text(&text).await.map_err(io("send"))?;
            let _ = timeout(Duration::from_secs(2), conn.discard_until_closed()).await;
            let _ = conn.send(ws::OPCODE_CLOSE, &1000_u16.to_be_bytes()).await;
            Ok(conn.await_answer().await)
        }
        Kind::ForgedPosition => {
            let region = Plan::region(group);
            let forged = format!(
                "{{\"epoch\":\"{}\",\"seq\":999999999}}",
                joined.map(|p| p.epoch).unwrap_or_default()
            );
            let result = conn.join_raw(&region, Some(&forged), "2").await?;
            let recovered = match result.and_then(|p| p.recovered) {
                Some(true) => "recovered",
                Some(false) => "not recovered",
                None => "no recovered flag",
            };
            let _ = conn.send(ws::OPCODE_CLOSE, &1000_u16.to_be_bytes()).await;
            let answer = conn.await_answer().await;
            Ok(format!("{recovered}, {answer}"))
        }
        Kind::PingFlood => {
            // A connection of its own with a small receive buffer, so that pongs back up.
            drop(conn);
            let mut conn = Conn::upgrade(plan, target, n, &token, Some(FLOOD_RECV_BUFFER))
                .await?
                .handshake()
                .await?;
            conn.join(group, None, "1").await?;
            let outcome = match timeout(FLOOD_HOLD, flood_pings(&mut conn)).await {
                Ok(e) => format!("server closed (send failed: {:?})", e.kind()),
                // Read what is buffered: the server's close shows after its last pongs.
                Err(_) => match timeout(FLOOD_DRAIN, drain(&mut conn.stream)).await {
                    Ok(end) => format!("server closed ({end} after the buffered pongs)"),
                    Err(_) => "still open after 20 s".to_owned(),
                },
            };
            conn.stream.set_zero_linger().map_err(io("linger"))?;
            Ok(outcome)
        }
        Kind::HalfUpgrade | Kind::HalfHandshake => Ok("unreachable".to_owned()),
    }
}

/// Sends `FLOOD_PINGS` pings at once, then one every `FLOOD_TRICKLE`, never reading; returns
/// the error that ended the sending (only the caller's timeout ends it otherwise).
async fn flood_pings(conn: &mut Conn) -> std::io::Error {
    let payload = [b'p'; 125];
    let batch = ws::client_frame(ws::OPCODE_PING, &payload, conn.mask).repeat(FLOOD_BATCH);
    for _ in 0..FLOOD_PINGS / FLOOD_BATCH {
        if let Err(e) = conn.stream.write_all(&batch).await {
            return e;
        }
    }
    loop {
        sleep(FLOOD_TRICKLE).await;
        if let Err(e) = conn.send(ws::OPCODE_PING, &payload).await {
            return e;
        }
    }
}

/// Reads until the end of the stream; says how it ended (`eof`, or the error kind).
async fn drain(stream: &mut TcpStream) -> String {
    let mut buf = vec![0_u8; 64 * 1024];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) => return "eof".to_owned(),
            Ok(_) => {}
            Err(e) => return format!("{:?}", e.kind()),
        }
    }
}

/// Holds a socket for `hold` (noting whether the server closed it first), then drops it.
async fn hold_then_drop(mut stream: TcpStream, hold: Duration) -> String {
    let mut buf = [0_u8; 1024];
    let read_to_end = async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    match timeout(hold, read_to_end).await {
        Ok(()) => "server closed".to_owned(),
        Err(_) => "held, client dropped".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_kinds_are_named_on_the_command_line_by_label() {
        for kind in Kind::HOSTILE {
            assert_eq!(Kind::from_label(kind.label()), Some(kind));
        }
        assert_eq!(Kind::from_label("clean"), None);
    }
}
