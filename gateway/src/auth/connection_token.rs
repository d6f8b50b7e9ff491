//! Connection tokens: what negotiate hands out and any replica can check at the upgrade.
//!
//! A token is `base64url(id ‖ expiry ‖ flags) . base64url(HMAC-SHA256(key, id ‖ expiry ‖ flags ‖
//! subject))`; the one flag says the connection was negotiated with stateful reconnect.
//! Replicas share the key, so no replica needs state from the negotiate that issued it (no
//! sticky sessions), and binding the MAC to the token's subject means a leaked connection token is
//! useless to another user.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// How long a connection token stays valid after negotiate, in seconds. The client connects
/// straight after negotiating; every reconnect negotiates again.
pub const TOKEN_TTL_SECS: u64 = 300;

const ID_BYTES: usize = 16;
const EXPIRY_END: usize = ID_BYTES + 8;
const PAYLOAD_BYTES: usize = EXPIRY_END + 1;
/// The flags byte's bit for a stateful connection.
const STATEFUL: u8 = 1;

/// Issues and checks connection tokens with one shared key.
#[derive(Clone)]
pub struct ConnectionTokens {
    key: Vec<u8>,
}

impl std::fmt::Debug for ConnectionTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ConnectionTokens(<key>)")
    }
}

/// A negotiated connection: the public id and the secret token the client connects with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    /// `connectionId` in the negotiate response (22 URL-safe characters).
    pub connection_id: String,
    /// `connectionToken` in the negotiate response; the client sends it back as `id=`.
    pub connection_token: String,
}

/// What a genuine connection token says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionClaims {
    /// The public connection id.
    pub connection_id: String,
    /// Negotiated with stateful reconnect.
    pub stateful: bool,
    /// When it stops being good for a new connection (Unix seconds); a stateful connection
    /// that is still alive may be resumed with it after that.
    pub expires: u64,
}

/// Why a connection token was refused; the upgrade answers 404 as ASP.NET does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ConnectionTokenError {
    /// Not a token this gateway issued (or issued for another user).
    #[error("unknown connection token")]
    Unknown,
    /// Issued longer ago than [`TOKEN_TTL_SECS`].
    #[error("connection token expired")]
    Expired,
}

impl ConnectionTokens {
    /// Tokens signed with `key` (shared by every replica).
    pub fn new(key: &[u8]) -> Self {
        Self { key: key.to_vec() }
    }

    /// Issues a token for connection `id`, bound to `subject`, valid from `now` (Unix seconds).
    pub fn issue(&self, id: [u8; ID_BYTES], subject: &str, now: u64) -> Negotiated {
        self.issue_for(id, subject, now, false)
    }

    /// [`ConnectionTokens::issue`], for a connection negotiated with stateful reconnect when
    /// `stateful`.
    pub fn issue_for(
        &self,
        id: [u8; ID_BYTES],
        subject: &str,
        now: u64,
        stateful: bool,
    ) -> Negotiated {
        let mut payload = [0u8; PAYLOAD_BYTES];
        payload[..ID_BYTES].copy_from_slice(&id);
        payload[ID_BYTES..EXPIRY_END].copy_from_slice(&(now + TOKEN_TTL_SECS).to_be_bytes());
        payload[EXPIRY_END] = if stateful { STATEFUL } else { 0 };
        let mac = self.mac(&payload, subject).finalize().into_bytes();
        Negotiated {
            connection_id: URL_SAFE_NO_PAD.encode(id),
            connection_token: format!(
                "{}.{}",
                URL_SAFE_NO_PAD.encode(payload),
                URL_SAFE_NO_PAD.encode(mac)
            ),
        }
    }

    /// Checks a token presented by `subject` at `now`, returning the connection id.
    ///
    /// # Errors
    /// [`ConnectionTokenError`] when the token is forged, for another subject, or expired.
    pub fn verify(
        &self,
        token: &str,
        subject: &str,
        now: u64,
    ) -> Result<String, ConnectionTokenError> {
        let claims = self.open(token, subject)?;
        if claims.expires < now {
            return Err(ConnectionTokenError::Expired);
        }
        Ok(claims.connection_id)
    }

    /// Checks that `token` is genuine and `subject`'s, whatever its expiry, and reads it.
    ///
    /// # Errors
    /// [`ConnectionTokenError::Unknown`] when the token is forged or for another subject.
    pub fn open(
        &self,
        token: &str,
        subject: &str,
    ) -> Result<ConnectionClaims, ConnectionTokenError> {
        let (payload, mac) = token.split_once('.').ok_or(ConnectionTokenError::Unknown)?;
        let payload = URL_SAFE_NO_PAD
            .decode(payload)
            .map_err(|_| ConnectionTokenError::Unknown)?;
        let mac = URL_SAFE_NO_PAD
            .decode(mac)
            .map_err(|_| ConnectionTokenError::Unknown)?;
        if payload.len() != PAYLOAD_BYTES {
            return Err(ConnectionTokenError::Unknown);
        }
        self.mac(&payload, subject)
            .verify_slice(&mac)
            .map_err(|_| ConnectionTokenError::Unknown)?;
        let mut expiry = [0u8; 8];
        expiry.copy_from_slice(&payload[ID_BYTES..EXPIRY_END]);
        Ok(ConnectionClaims {
            connection_id: URL_SAFE_NO_PAD.encode(&payload[..ID_BYTES]),
            stateful: payload[EXPIRY_END] & STATEFUL != 0,
            expires: u64::from_be_bytes(expiry),
        })
    }

    fn mac(&self, payload: &[u8], subject: &str) -> Hmac<Sha256> {
        let mut mac =
            Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC accepts keys of any length");
        mac.update(payload);
        mac.update(subject.as_bytes());
        mac
    }
}
