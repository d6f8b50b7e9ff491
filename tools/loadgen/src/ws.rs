//! The client side of the WebSocket wire format, from the workspace's `ws-frame` crate, under
//! the names the fleet and the churn load use.
//!
//! The tool frames its own WebSocket so that the receive path of thousands of connections on
//! one core costs little per frame: server frames are read in place from one buffer, with no
//! per-message allocation. Server frames are expected as the gateway writes them: unmasked,
//! unfragmented, without extensions; anything else is an error, not guessed at.

pub(crate) use ws_frame::client::{
    Frame, FrameError, frame as client_frame, frame_head, key as client_key, next_frame,
    upgrade_request, upgrade_response,
};
pub(crate) use ws_frame::close::code_of as close_code;
pub(crate) use ws_frame::{OPCODE_CLOSE, OPCODE_PING, OPCODE_PONG, OPCODE_TEXT};
