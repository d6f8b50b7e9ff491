//! Tokens for test users: dispatcher and contractor claims, and tokens signed with the test
//! secret or with any algorithm and key (for the refusals).

use std::time::{SystemTime, UNIX_EPOCH};

use gateway::auth::dev::{TokenClaims, mint};

use crate::TEST_SECRET;

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("the clock is after 1970")
        .as_secs()
}

/// Claims of a dispatcher for `regions`, valid for an hour.
pub fn dispatcher(sub: &str, regions: &[&str]) -> TokenClaims {
    TokenClaims {
        sub: sub.to_owned(),
        role: "dispatcher".to_owned(),
        regions: regions.iter().map(|r| (*r).to_owned()).collect(),
        contractor_id: None,
        exp: unix_now() + 3600,
        iss: None,
        aud: None,
    }
}

/// Claims of a contractor whose id is `contractor_id`, valid for an hour.
pub fn contractor(sub: &str, contractor_id: &str) -> TokenClaims {
    TokenClaims {
        sub: sub.to_owned(),
        role: "contractor".to_owned(),
        regions: Vec::new(),
        contractor_id: Some(contractor_id.to_owned()),
        exp: unix_now() + 3600,
        iss: None,
        aud: None,
    }
}

/// An HS256 token signed with [`TEST_SECRET`].
pub fn hs256_token(claims: &TokenClaims) -> String {
    mint(TEST_SECRET.as_bytes(), claims).expect("test claims always encode")
}

/// Signs `claims` with `algorithm` and `key` (any algorithm, for tests of the refusals).
pub fn sign(
    algorithm: jsonwebtoken::Algorithm,
    key: &jsonwebtoken::EncodingKey,
    claims: &TokenClaims,
) -> String {
    jsonwebtoken::encode(&jsonwebtoken::Header::new(algorithm), claims, key)
        .expect("test claims always encode")
}
