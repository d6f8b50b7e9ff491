//! Close codes (RFC 6455 §7.4): which ones an endpoint may send, and the ones this workspace
//! uses.

/// Normal closure.
pub const NORMAL: u16 = 1000;
/// The endpoint is going away (server shutdown, page navigation).
pub const GOING_AWAY: u16 = 1001;
/// The peer broke the protocol.
pub const PROTOCOL_ERROR: u16 = 1002;
/// The peer sent a kind of data the endpoint does not accept.
pub const UNSUPPORTED_DATA: u16 = 1003;
/// A text message or close reason that is not UTF-8.
pub const INVALID_PAYLOAD: u16 = 1007;
/// A message that breaks the endpoint's policy.
pub const POLICY_VIOLATION: u16 = 1008;
/// A message too big to process.
pub const MESSAGE_TOO_BIG: u16 = 1009;

/// Whether `code` may appear in a close frame on the wire.
///
/// The RFC's own codes 1000-1003 and 1007-1011, the IANA-registered 1012-1014, and the ranges
/// for libraries (3000-3999) and applications (4000-4999). Never on the wire: below 1000,
/// 1004 (reserved), 1005 and 1006 (only reported locally, "no code" and "dropped"), 1015 (TLS
/// failure, local), the unassigned 1016-2999, and 5000 and above.
pub fn is_valid_on_wire(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// The status code at the start of a close frame's payload, if it carries one.
pub fn code_of(payload: &[u8]) -> Option<u16> {
    match payload {
        [a, b, ..] => Some(u16::from_be_bytes([*a, *b])),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_registered_and_private_codes_are_valid_on_the_wire() {
        for valid in [
            1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, 3000, 3999,
            4000, 4999,
        ] {
            assert!(is_valid_on_wire(valid), "{valid} is valid");
        }
        for invalid in [
            0, 1, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535,
        ] {
            assert!(!is_valid_on_wire(invalid), "{invalid} is invalid");
        }
    }

    #[test]
    fn the_code_is_read_from_the_first_two_bytes() {
        assert_eq!(code_of(&[0x03, 0xE8, b'b', b'y', b'e']), Some(1000));
        assert_eq!(code_of(&[0x03, 0xE9]), Some(1001));
        assert_eq!(code_of(&[0x03]), None);
        assert_eq!(code_of(&[]), None);
    }
}
