//! Minting HS256 user tokens, for `--dev` and the `gateway token` command.
//!
//! Production tokens come from the application's identity provider; this exists so a newcomer
//! can connect in one command and so tests can make real tokens.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{EncodingKey, Header};
use serde::Serialize;

/// The claims of a minted token, exactly as the gateway reads them.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TokenClaims {
    /// Subject (user id).
    pub sub: String,
    /// `dispatcher` or `contractor`.
    pub role: String,
    /// Regions a dispatcher may join.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub regions: Vec<String>,
    /// A contractor's id; `sub` is used when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub contractor_id: Option<String>,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
    /// Issuer, when the gateway checks one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    /// Audience, when the gateway checks one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub aud: Option<String>,
}

/// A fresh random secret of 32 bytes, URL-safe base64 encoded (43 characters).
pub fn random_secret() -> String {
    let bytes: [u8; 32] = rand::random();
    URL_SAFE_NO_PAD.encode(bytes)
}

/// Signs `claims` with HS256 and `secret`.
///
/// # Errors
/// Only if the claims cannot be encoded, which does not happen for [`TokenClaims`].
pub fn mint(secret: &[u8], claims: &TokenClaims) -> Result<String, jsonwebtoken::errors::Error> {
    jsonwebtoken::encode(
        &Header::new(jsonwebtoken::Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret),
    )
}
