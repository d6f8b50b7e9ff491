//! A raw SignalR JSON client over a WebSocket (`WsClient`), and how a connection ended
//! (`Closed`) or was refused (`Refusal`).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use reqwest::StatusCode;
use serde_json::Value;
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderValue, Request};
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::records::{joined, parse_event, parse_positioned_event, split_records};
use crate::{DEADLINE, HANDSHAKE, RS, within};

/// An upgrade the gateway refused: its HTTP status and body.
#[derive(Debug, Clone)]
pub struct Refusal {
    /// The status instead of 101.
    pub status: StatusCode,
    /// The response body.
    pub body: String,
}

/// How a connection ended, as the client saw it.
#[derive(Debug, Clone, Default)]
pub struct Closed {
    /// Every record received before the end, pings left out.
    pub records: Vec<String>,
    /// The SignalR Close record (`type` 7), if one came.
    pub close_record: Option<Value>,
    /// The WebSocket close frame's code, if a close frame came.
    pub code: Option<u16>,
    /// The WebSocket close frame's reason.
    pub reason: Option<String>,
}

impl Refusal {
    /// Checks the refusal's status and its exact body.
    pub fn assert_is(&self, status: StatusCode, body: &str) {
        assert_eq!(self.status, status, "{self:?}");
        assert_eq!(self.body, body, "{self:?}");
    }

    /// Checks the refusal is a 401 whose body is `unauthorized: {reason}`.
    pub fn assert_unauthorized(&self, reason: &str) {
        self.assert_is(StatusCode::UNAUTHORIZED, &format!("unauthorized: {reason}"));
    }
}

impl Closed {
    /// The Close record, failing the test if none came.
    pub fn close_record(&self) -> &Value {
        self.close_record
            .as_ref()
            .unwrap_or_else(|| panic!("no Close record before the end: {self:?}"))
    }

    /// The close frame's code, failing the test if no close frame came.
    pub fn code(&self) -> u16 {
        self.code
            .unwrap_or_else(|| panic!("no WebSocket close frame before the end: {self:?}"))
    }
}

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A raw SignalR JSON client over a WebSocket, for what the official client never sends.
/// Every read is bounded by [`DEADLINE`].
#[derive(Debug)]
pub struct WsClient {
    socket: Socket,
    pending: VecDeque<String>,
}

impl WsClient {
    /// Connects to `url`, failing the test if the upgrade is refused.
    pub async fn connect(url: &str) -> Self {
        match Self::try_connect(url).await {
            Ok(client) => client,
            Err(refusal) => panic!("upgrade refused with {}: {}", refusal.status, refusal.body),
        }
    }

    /// Connects with `request` (a URL or a request with extra headers).
    ///
    /// # Errors
    /// [`Refusal`] when the gateway answers the upgrade with another status than 101.
    pub async fn try_connect(request: impl IntoClientRequest + Unpin) -> Result<Self, Refusal> {
        let connecting = tokio_tungstenite::connect_async(request);
        match within(DEADLINE, connecting, "the WebSocket upgrade").await {
            Ok((socket, _)) => Ok(Self::new(socket)),
            Err(tungstenite::Error::Http(response)) => Err(Refusal {
                status: response.status(),
                body: response
                    .body()
                    .as_deref()
                    .map(|b| String::from_utf8_lossy(b).into_owned())
                    .unwrap_or_default(),
            }),
            Err(e) => panic!("WebSocket upgrade failed: {e}"),
        }
    }

    /// Connects with an `Origin` header.
    ///
    /// # Errors
    /// [`Refusal`] when the upgrade is refused.
    pub async fn try_connect_from(url: &str, origin: &str) -> Result<Self, Refusal> {
        let mut request: Request<()> = url.into_client_request().expect("a valid hub URL");
        request.headers_mut().insert(
            "origin",
            HeaderValue::from_str(origin).expect("a valid origin"),
        );
        Self::try_connect(request).await
    }

    /// Connects through a socket whose kernel receive buffer is `receive_buffer` bytes, so a
    /// client that stops reading pushes back on the gateway quickly.
    pub async fn connect_with_receive_buffer(url: &str, receive_buffer: u32) -> Self {
        let request = url.into_client_request().expect("a valid hub URL");
        let host = request.uri().authority().expect("URL with a host").as_str();
        let addr: SocketAddr = host.parse().expect("hub URL with an IP address");
        let socket = TcpSocket::new_v4().expect("a TCP socket");
        socket
            .set_recv_buffer_size(receive_buffer)
            .expect("setting SO_RCVBUF");
        let stream = within(DEADLINE, socket.connect(addr), "the TCP connection")
            .await
            .expect("connecting to the gateway");
        let upgrade = tokio_tungstenite::client_async(request, MaybeTlsStream::Plain(stream));
        let (socket, _) = within(DEADLINE, upgrade, "the WebSocket upgrade")
            .await
            .expect("upgrading to a WebSocket");
        Self::new(socket)
    }

    fn new(socket: Socket) -> Self {
        Self {
            socket,
            pending: VecDeque::new(),
        }
    }

    /// Sends one text frame exactly as given.
    pub async fn send_text(&mut self, text: &str) {
        within(DEADLINE, self.socket.send(Message::text(text)), "a send")
            .await
            .expect("sending a text frame");
    }

    /// Sends `records`, each followed by the record separator, in one text frame.
    pub async fn send_records(&mut self, records: &[&str]) {
        let mut text = String::new();
        for record in records {
            text.push_str(record);
            text.push(RS);
        }
        self.send_text(&text).await;
    }

    /// Sends one binary frame.
    pub async fn send_binary(&mut self, bytes: &[u8]) {
        let message = Message::binary(bytes.to_vec());
        within(DEADLINE, self.socket.send(message), "a send")
            .await
            .expect("sending a binary frame");
    }

    /// Sends the JSON version 1 handshake and expects `{}`.
    pub async fn handshake(&mut self) {
        self.send_text(HANDSHAKE).await;
        let reply = self.next_record().await;
        assert_eq!(reply, "{}", "handshake refused");
    }

    /// Reads the next text frame and splits it into records (without their separators).
    /// Fails the test if the connection ends first or a record is unterminated.
    pub async fn next_records(&mut self) -> Vec<String> {
        loop {
            let message = within(DEADLINE, self.socket.next(), "a frame from the gateway").await;
            match message {
                Some(Ok(Message::Text(text))) => return split_records(&text),
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                Some(Ok(Message::Binary(bytes))) => {
                    panic!("unexpected binary frame of {} bytes", bytes.len())
                }
                Some(Ok(Message::Close(frame))) => {
                    panic!("connection closed while a record was expected: {frame:?}")
                }
                Some(Err(e)) => panic!("connection failed while a record was expected: {e}"),
                None => panic!("connection ended while a record was expected"),
            }
        }
    }

    /// The next record, whether or not it came in the same frame as the previous one.
    pub async fn next_record(&mut self) -> String {
        while self.pending.is_empty() {
            let records = self.next_records().await;
            self.pending.extend(records);
        }
        self.pending.pop_front().expect("a pending record")
    }

    /// The next record that is not a Ping, parsed.
    pub async fn next_message(&mut self) -> Value {
        loop {
            let record = self.next_record().await;
            let message: Value = serde_json::from_str(&record)
                .unwrap_or_else(|e| panic!("record `{record}` is not JSON: {e}"));
            if message["type"] != 6 {
                return message;
            }
        }
    }

    /// The next event (Invocation without id), as its target and the raw text of its single
    /// argument, skipping pings; fails on anything else.
    pub async fn next_event(&mut self) -> (String, String) {
        loop {
            let record = self.next_record().await;
            if record == "{\"type\":6}" {
                continue;
            }
            return parse_event(&record);
        }
    }

    /// Sends `{"type":1,"invocationId":id,"target":target,"arguments":arguments}` and returns
    /// the Completion for `id`.
    pub async fn invoke(&mut self, id: &str, target: &str, arguments: Value) -> Value {
        let invocation = serde_json::json!({
            "type": 1, "invocationId": id, "target": target, "arguments": arguments,
        });
        self.send_text(&format!("{invocation}{RS}")).await;
        let completion = self.next_message().await;
        assert_eq!(completion["type"], 3, "expected a Completion: {completion}");
        assert_eq!(
            completion["invocationId"], id,
            "Completion for another call"
        );
        completion
    }

    /// Invokes `target` and returns the error text of its Completion, failing the test if the
    /// call succeeded.
    pub async fn invoke_error(&mut self, id: &str, target: &str, arguments: Value) -> String {
        let completion = self.invoke(id, target, arguments).await;
        assert!(
            completion.get("result").is_none(),
            "expected an error Completion: {completion}"
        );
        completion["error"]
            .as_str()
            .unwrap_or_else(|| panic!("a Completion with neither result nor error: {completion}"))
            .to_owned()
    }

    /// Reads the next event, skipping pings, and checks its target and that its payload is
    /// exactly `payload`.
    pub async fn expect_event(&mut self, target: &str, payload: &str) {
        let (got_target, got_payload) = self.next_event().await;
        assert_eq!(got_target, target, "event target");
        assert_eq!(got_payload, payload, "event payload");
    }

    /// Joins `/dispatch/{region}`, failing the test if the hub refuses; returns the
    /// completion's result (the group's position).
    pub async fn join_dispatch(&mut self, id: &str, region: &str) -> Value {
        let completion = self
            .invoke(id, "JoinDispatchGroup", serde_json::json!([region]))
            .await;
        joined(&completion, &format!("/dispatch/{region}"))
    }

    /// The next event's target, payload and position, skipping pings.
    pub async fn next_positioned_event(&mut self) -> (String, String, Value) {
        loop {
            let record = self.next_record().await;
            if record != "{\"type\":6}" {
                return parse_positioned_event(&record);
            }
        }
    }

    /// Reads until the connection ends and reports how: the records received (pings left
    /// out), the Close record and the WebSocket close frame.
    pub async fn expect_close(&mut self) -> Closed {
        self.expect_close_within(DEADLINE).await
    }

    /// [`WsClient::expect_close`] with another deadline for the whole ending.
    pub async fn expect_close_within(&mut self, deadline: Duration) -> Closed {
        let mut closed = Closed::default();
        let pending: Vec<String> = self.pending.drain(..).collect();
        for record in pending {
            note_record(&mut closed, record);
        }
        let read = async {
            loop {
                match self.socket.next().await {
                    Some(Ok(Message::Text(text))) => {
                        for record in split_records(&text) {
                            note_record(&mut closed, record);
                        }
                    }
                    Some(Ok(Message::Close(frame))) => {
                        if let Some(frame) = frame {
                            closed.code = Some(u16::from(frame.code));
                            closed.reason = Some(frame.reason.to_string());
                        } else {
                            closed.code = Some(1005);
                        }
                        break;
                    }
                    Some(Ok(_)) => {}
                    Some(Err(_)) | None => break,
                }
            }
        };
        within(deadline, read, "the gateway to close the connection").await;
        closed
    }
}

fn note_record(closed: &mut Closed, record: String) {
    if record == "{\"type\":6}" {
        return;
    }
    if let Ok(value) = serde_json::from_str::<Value>(&record)
        && value["type"] == 7
    {
        closed.close_record = Some(value);
    }
    closed.records.push(record);
}
