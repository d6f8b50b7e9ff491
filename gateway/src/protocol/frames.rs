//! What the server says after the handshake, in the gateway's own terms: an event's WebSocket
//! frame, a join's completion, an invocation's error, and the position object they share.
//!
//! `codec` knows the record shapes; this module knows what goes in them, so nothing outside
//! `protocol` spells a position, a join result or ASP.NET Core's wording of a hub error.

use std::fmt::Display;

use bytes::Bytes;
use publisher_lib::contract::{EventKind, Group, Position};
use serde::Serialize;

use super::codec;

/// An event's place in its group as clients see it: `{"epoch","group","seq"}` (keys in the
/// order `docs/events.md` shows). The second argument of every positioned event, the result of
/// a join, and what a publish returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct GroupPosition<'a> {
    /// The history's epoch.
    pub epoch: &'a str,
    /// The group's name (`/dispatch/west`).
    pub group: &'a str,
    /// The event's sequence number in that epoch (for a head: the newest one, 0 when empty).
    pub seq: u64,
}

impl<'a> GroupPosition<'a> {
    /// `position` in `group`.
    pub fn new(group: &'a Group, position: &'a Position) -> Self {
        Self {
            group: group.name(),
            epoch: &position.epoch,
            seq: position.seq,
        }
    }
}

/// What a join completes with: the group's head and, for a resume, whether the client has
/// everything after its position.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct JoinResult<'a> {
    /// The head of the group's history when the join read it.
    #[serde(flatten)]
    pub head: GroupPosition<'a>,
    /// `None` without a position; `Some(false)` when the client must refetch.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recovered: Option<bool>,
}

/// An event's WebSocket frame: the SignalR invocation of `kind` with the payload copied in
/// unchanged and, when it has one, its position as a second argument. Built once per
/// publication and group; the same bytes go to every recipient (server frames are unmasked).
pub fn event_frame(
    group: &Group,
    kind: EventKind,
    payload: &[u8],
    position: Option<&Position>,
) -> Bytes {
    let position = position.map(|p| position_bytes(GroupPosition::new(group, p)));
    ws_frame::server::text_frame(&codec::encode_invocation(
        kind.name(),
        payload,
        position.as_deref(),
    ))
}

/// The position object as JSON, for answers outside the hub (the publish endpoint).
pub fn position_value(group: &Group, position: &Position) -> serde_json::Value {
    serde_json::to_value(GroupPosition::new(group, position)).unwrap_or_default()
}

/// The Completion record of a successful join of `group`, whose history's head is `head`;
/// `recovered` as in [`JoinResult`].
pub fn join_completion(
    invocation_id: &str,
    group: &Group,
    head: &Position,
    recovered: Option<bool>,
) -> String {
    let result = JoinResult {
        head: GroupPosition::new(group, head),
        recovered,
    };
    let value = serde_json::to_value(result).unwrap_or_default();
    codec::encode_completion_result(invocation_id, &value)
}

/// The Completion record of a failed invocation, with `error` as the client reads it.
pub fn error_completion(invocation_id: &str, error: &str) -> String {
    codec::encode_completion(invocation_id, Some(error))
}

/// The Completion record of a successful invocation without a result.
pub fn ok_completion(invocation_id: &str) -> String {
    codec::encode_completion(invocation_id, None)
}

/// How an ASP.NET Core hub words a `HubException` thrown by `method`: the error a client sees
/// for a refused invocation, with the gateway's reason.
pub fn hub_exception(method: &str, reason: impl Display) -> String {
    format!(
        "An unexpected error occurred invoking '{method}' on the server. HubException: {reason}"
    )
}

/// A position object serialized; it holds only strings and numbers, so it cannot fail.
fn position_bytes(position: GroupPosition<'_>) -> Vec<u8> {
    serde_json::to_vec(&position).unwrap_or_default()
}
