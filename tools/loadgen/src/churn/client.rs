//! One client WebSocket as the soak needs it: TCP from a spread loopback source address, the
//! upgrade, the SignalR handshake, joins with or without a position, whole messages in, masked
//! frames out. Framing is `crate::ws`'s.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use nix::sys::socket::{setsockopt, sockopt::IpBindAddressNoPort};
use serde::Deserialize;
use serde::de::IgnoredAny;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::timeout;
use uuid::Uuid;

use super::Plan;
use crate::ws;

/// How long a churn connection waits for the server's answer to what it sent.
const ANSWER_WAIT: Duration = Duration::from_secs(5);

/// Largest frame payload the tool reads from the gateway (history backlogs arrive as many
/// frames, each one small).
const READ_RESERVE: usize = 4096;

/// Source addresses used to spread connections: 127.0.0.2 ..= 127.0.0.254.
const SOURCE_HOSTS: std::ops::RangeInclusive<u8> = 2..=254;

/// A client ping record.
pub(super) const PING: &str = "{\"type\":6}\u{1e}";

/// The record separator.
pub(super) const RS: char = '\u{1e}';

/// The records of one text frame (complete ones only).
pub(super) fn records(text: &str) -> impl Iterator<Item = &str> {
    let complete = text.rfind(RS).map_or("", |end| &text[..end]);
    complete.split(RS).filter(|r| !r.is_empty())
}

/// A join invocation record.
pub(super) fn join_record(region: &str, position: Option<&str>, id: &str) -> String {
    let position = position.map(|p| format!(",{p}")).unwrap_or_default();
    format!(
        "{{\"type\":1,\"invocationId\":\"{id}\",\"target\":\"JoinDispatchGroup\",\"arguments\":[\"{region}\"{position}]}}{RS}"
    )
}

/// A position as the gateway writes it in events and join results.
#[derive(Debug, Clone, Deserialize)]
pub(super) struct Position {
    pub(super) epoch: String,
    pub(super) seq: u64,
    #[serde(default)]
    pub(super) recovered: Option<bool>,
}

/// The parts of a server record the tool reads.
#[derive(Debug, Deserialize)]
pub(super) struct Record {
    #[serde(rename = "type")]
    pub(super) kind: Option<u8>,
    #[serde(rename = "invocationId", default)]
    pub(super) invocation_id: Option<String>,
    #[serde(default)]
    pub(super) arguments: Option<(IgnoredAny, Position)>,
    #[serde(default)]
    pub(super) result: Option<Position>,
    #[serde(default)]
    pub(super) error: Option<String>,
}

/// A message from the server.
pub(super) enum Message {
    Text(String),
    Ping(Vec<u8>),
    Close(Option<u16>),
    Other,
}

/// A client WebSocket: the stream, unread bytes, the mask.
pub(super) struct Conn {
    pub(super) stream: TcpStream,
    pub(super) buf: Vec<u8>,
    pub(super) mask: [u8; 4],
}

/// Connects from a spread loopback source address (`n` picks it).
pub(super) async fn connect_tcp(
    target: SocketAddr,
    n: usize,
    recv_buffer: Option<u32>,
) -> Result<TcpStream, String> {
    let socket = match target {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    }
    .map_err(io("socket"))?;
    if let Some(size) = recv_buffer {
        socket.set_recv_buffer_size(size).map_err(io("rcvbuf"))?;
    }
    if target.is_ipv4() {
        let hosts = usize::from(SOURCE_HOSTS.end() - SOURCE_HOSTS.start()) + 1;
        let host = SOURCE_HOSTS.start() + (n % hosts) as u8;
        setsockopt(&socket, IpBindAddressNoPort, &true)
            .map_err(|e| format!("IP_BIND_ADDRESS_NO_PORT: {e}"))?;
        socket
            .bind(SocketAddr::new(
                IpAddr::V4(Ipv4Addr::new(127, 0, 0, host)),
                0,
            ))
            .map_err(io("bind"))?;
    }
    let stream = socket.connect(target).await.map_err(io("connect"))?;
    stream.set_nodelay(true).map_err(io("nodelay"))?;
    Ok(stream)
}

impl Conn {
    /// TCP and the WebSocket upgrade; `recv_buffer` sets the socket's receive buffer.
    pub(super) async fn upgrade(
        plan: &Plan,
        target: SocketAddr,
        n: usize,
        token: &str,
        recv_buffer: Option<u32>,
    ) -> Result<Self, String> {
        let stream = connect_tcp(target, n, recv_buffer).await?;
        let [m0, m1, m2, m3, ..] = *Uuid::new_v4().as_bytes();
        let mut conn = Self {
            stream,
            buf: Vec::new(),
            mask: [m0, m1, m2, m3],
        };
        let key = ws::client_key(*Uuid::new_v4().as_bytes());
        let request = ws::upgrade_request(
            &target.to_string(),
            &format!("/hub/v1?access_token={token}"),
            &key,
            plan.origin.as_deref(),
        )?;
        conn.stream
            .write_all(request.as_bytes())
            .await
            .map_err(io("upgrade"))?;
        loop {
            match ws::upgrade_response(&conn.buf, &key) {
                Ok(Some(head)) => {
                    conn.buf.drain(..head);
                    return Ok(conn);
                }
                Ok(None) => {}
                Err(e) => return Err(format!("upgrade: {e}")),
            }
            if conn.fill().await.map_err(io("upgrade"))? == 0 {
                return Err("upgrade: eof".to_owned());
            }
        }
    }

    /// The SignalR handshake on an upgraded connection.
    pub(super) async fn handshake(self) -> Result<Self, String> {
        let mut conn = self;
        conn.send_text("{\"protocol\":\"json\",\"version\":1}\u{1e}")
            .await
            .map_err(io("handshake"))?;
        loop {
            match conn.receive().await? {
                Message::Text(text) => {
                    if let Some(record) = records(&text).next() {
                        return match serde_json::from_str::<Record>(record) {
                            Ok(Record {
                                kind: None,
                                error: None,
                                ..
                            }) => Ok(conn),
                            Ok(Record {
                                error: Some(error), ..
                            }) => Err(format!("handshake refused: {error}")),
                            _ => Err("handshake: unexpected answer".to_owned()),
                        };
                    }
                }
                Message::Close(code) => {
                    return Err(format!("handshake: close frame {}", code_label(code)));
                }
                Message::Ping(_) | Message::Other => {}
            }
        }
    }

    /// Joins `soak-<group>`, optionally from `position`; returns the join's position.
    pub(super) async fn join(
        &mut self,
        group: usize,
        position: Option<&str>,
        id: &str,
    ) -> Result<Option<Position>, String> {
        self.join_raw(&Plan::region(group), position, id).await
    }

    pub(super) async fn join_raw(
        &mut self,
        region: &str,
        position: Option<&str>,
        id: &str,
    ) -> Result<Option<Position>, String> {
        self.send_text(&join_record(region, position, id))
            .await
            .map_err(io("join"))?;
        loop {
            match self.receive().await? {
                Message::Text(text) => {
                    for record in records(&text) {
                        let Ok(parsed) = serde_json::from_str::<Record>(record) else {
                            continue;
                        };
                        match parsed.kind {
                            Some(3) if parsed.invocation_id.as_deref() == Some(id) => {
                                return match parsed.error {
                                    Some(error) => Err(format!("join refused: {error}")),
                                    None => Ok(parsed.result),
                                };
                            }
                            Some(7) => {
                                return Err(format!(
                                    "join: server close: {}",
                                    parsed.error.unwrap_or_default()
                                ));
                            }
                            _ => {}
                        }
                    }
                }
                Message::Ping(payload) => {
                    self.send(ws::OPCODE_PONG, &payload)
                        .await
                        .map_err(io("pong"))?;
                }
                Message::Close(code) => {
                    return Err(format!("join: close frame {}", code_label(code)));
                }
                Message::Other => {}
            }
        }
    }

    /// Reads and drops messages until the connection ends; returns how it ended.
    pub(super) async fn discard_until_closed(&mut self) -> String {
        loop {
            match self.receive().await {
                Ok(Message::Close(code)) => {
                    return format!("server close frame {}", code_label(code));
                }
                Ok(Message::Text(text)) if text.contains("\"type\":7") => {
                    return "server close record".to_owned();
                }
                Ok(_) => {}
                Err(reason) => return reason,
            }
        }
    }

    /// Waits (boundedly) for the server to react: a close frame, the end of the stream, or
    /// nothing within `ANSWER_WAIT`.
    pub(super) async fn await_answer(&mut self) -> String {
        match timeout(ANSWER_WAIT, self.discard_until_closed()).await {
            Ok(outcome) => outcome,
            Err(_) => "no answer within 5 s".to_owned(),
        }
    }

    /// Reads what the socket has onto `buf`; `Ok(0)` at the end of the stream.
    pub(super) async fn fill(&mut self) -> std::io::Result<usize> {
        self.buf.reserve(READ_RESERVE);
        self.stream.read_buf(&mut self.buf).await
    }

    /// The next whole message.
    pub(super) async fn receive(&mut self) -> Result<Message, String> {
        loop {
            let parsed = match ws::next_frame(&self.buf) {
                Ok(Some(frame)) => Some((
                    frame.len,
                    match frame.opcode {
                        ws::OPCODE_TEXT => Message::Text(
                            String::from_utf8(frame.payload.to_vec())
                                .map_err(|_| "text frame not UTF-8".to_owned())?,
                        ),
                        ws::OPCODE_PING => Message::Ping(frame.payload.to_vec()),
                        ws::OPCODE_CLOSE => Message::Close(ws::close_code(frame.payload)),
                        _ => Message::Other,
                    },
                )),
                Ok(None) => None,
                Err(e) => return Err(format!("frame: {e}")),
            };
            if let Some((len, message)) = parsed {
                self.buf.drain(..len);
                return Ok(message);
            }
            match self.fill().await {
                Ok(0) => return Err("eof".to_owned()),
                Ok(_) => {}
                Err(e) => return Err(format!("read: io {:?}", e.kind())),
            }
        }
    }

    pub(super) async fn send(&mut self, opcode: u8, payload: &[u8]) -> std::io::Result<()> {
        let frame = ws::client_frame(opcode, payload, self.mask);
        self.stream.write_all(&frame).await
    }

    pub(super) async fn send_text(&mut self, text: &str) -> std::io::Result<()> {
        self.send(ws::OPCODE_TEXT, text.as_bytes()).await
    }
}

/// A small xorshift generator: the churn needs variety, not quality.
pub(super) struct Rng(u64);

impl Rng {
    pub(super) fn new() -> Self {
        Self::from_seed(Uuid::new_v4().as_u64_pair().0)
    }

    pub(super) fn from_seed(seed: u64) -> Self {
        Self(seed | 1)
    }

    pub(super) fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// Uniform in `0..n` (n ≥ 1), near enough.
    pub(super) fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    /// Uniform in `[0, 1)`.
    pub(super) fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1_u64 << 53) as f64
    }
}

/// A close frame's status code for a label, `none` when it carried none.
pub(super) fn code_label(code: Option<u16>) -> String {
    code.map_or_else(|| "none".to_owned(), |c| c.to_string())
}

/// Maps an I/O error to the label `<what>: io <kind>`.
pub(super) fn io(what: &'static str) -> impl Fn(std::io::Error) -> String {
    move |e| format!("{what}: io {:?}", e.kind())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn join_records_carry_the_position_as_second_argument() {
        assert_eq!(
            join_record("soak-1", Some("{\"epoch\":\"e\",\"seq\":1}"), "r0"),
            "{\"type\":1,\"invocationId\":\"r0\",\"target\":\"JoinDispatchGroup\",\"arguments\":[\"soak-1\",{\"epoch\":\"e\",\"seq\":1}]}\u{1e}"
        );
        assert!(join_record("soak-1", None, "1").contains("[\"soak-1\"]"));
    }

    #[test]
    fn event_records_yield_their_position() {
        let record = r#"{"type":1,"target":"RecommendationReady","arguments":[{"region":"soak-1"},{"group":"/dispatch/soak-1","epoch":"ab","seq":42}]}"#;
        let parsed: Record = serde_json::from_str(record).unwrap();
        let (_, position) = parsed.arguments.unwrap();
        assert_eq!((position.epoch.as_str(), position.seq), ("ab", 42));
    }
}
