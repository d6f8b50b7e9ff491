//! User tokens: a JWT with a pinned algorithm, `exp`, and optionally `nbf`, `iss` and `aud`.

use std::str::FromStr;

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{DecodingKey, Validation};
use publisher_lib::contract::Group;
use serde::Deserialize;

use super::{Principal, Role};

/// The signature algorithms a deployment may pin. `none` is not among them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    /// HMAC-SHA256 with a shared secret.
    Hs256,
    /// RSA PKCS#1 v1.5 with SHA-256; the gateway holds the PEM public key.
    Rs256,
    /// ECDSA P-256 with SHA-256; the gateway holds the PEM public key.
    Es256,
}

/// Default clock skew tolerated on `exp` and `nbf`, in seconds.
pub const DEFAULT_LEEWAY_SECS: u64 = 30;

/// Shortest HS256 secret accepted, in bytes (RFC 7518 asks for at least the hash size).
pub const MIN_SECRET_BYTES: usize = 32;

/// Why a token was refused. Each variant has one metrics label; none of them echo the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No token on the request.
    #[error("no token")]
    Missing,
    /// Not a JWT at all, or an unknown algorithm such as `none`.
    #[error("malformed token")]
    Malformed,
    /// Signed with another algorithm than the pinned one.
    #[error("token signed with an algorithm other than the configured one")]
    WrongAlgorithm,
    /// The signature does not verify.
    #[error("bad token signature")]
    BadSignature,
    /// `exp` is in the past.
    #[error("token expired")]
    Expired,
    /// `nbf` is still in the future (beyond the clock skew leeway).
    #[error("token not valid yet")]
    NotYetValid,
    /// `iss` is not the configured issuer.
    #[error("token issuer not accepted")]
    WrongIssuer,
    /// `aud` does not contain the configured audience.
    #[error("token audience not accepted")]
    WrongAudience,
    /// A required claim is absent or has the wrong shape.
    #[error("token claims invalid: {0}")]
    BadClaims(String),
}

impl AuthError {
    /// Low-cardinality label for metrics and logs.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Missing => "missing",
            Self::Malformed => "malformed",
            Self::WrongAlgorithm => "wrong_algorithm",
            Self::BadSignature => "bad_signature",
            Self::Expired => "expired",
            Self::NotYetValid => "not_yet_valid",
            Self::WrongIssuer => "wrong_issuer",
            Self::WrongAudience => "wrong_audience",
            Self::BadClaims(_) => "bad_claims",
        }
    }
}

/// Why key material could not be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// An HS256 secret shorter than [`MIN_SECRET_BYTES`].
    #[error("HS256 secret must be at least {MIN_SECRET_BYTES} bytes, got {0}")]
    ShortSecret(usize),
    /// A PEM public key that does not parse for the algorithm.
    #[error("public key is not a valid PEM key for {algorithm}")]
    BadPublicKey {
        /// The algorithm the key was meant for.
        algorithm: Algorithm,
        /// The parser's complaint.
        #[source]
        source: jsonwebtoken::errors::Error,
    },
}

/// Checks user tokens against one key and one pinned algorithm.
pub struct Verifier {
    key: DecodingKey,
    validation: Validation,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("algorithms", &self.validation.algorithms)
            .finish_non_exhaustive()
    }
}

/// The claims the gateway reads. Unknown claims are ignored.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Claims {
    sub: String,
    role: String,
    #[serde(default)]
    regions: Vec<String>,
    contractor_id: Option<String>,
    exp: u64,
}

impl Verifier {
    /// A verifier for `algorithm`: `key` is the secret for HS256, a PEM public key otherwise.
    ///
    /// # Errors
    /// [`KeyError`] when the key does not fit the algorithm.
    pub fn try_new(
        algorithm: Algorithm,
        key: &[u8],
        issuer: Option<&str>,
        audience: Option<&str>,
    ) -> Result<Self, KeyError> {
        let key = match algorithm {
            Algorithm::Hs256 if key.len() < MIN_SECRET_BYTES => {
                return Err(KeyError::ShortSecret(key.len()));
            }
            Algorithm::Hs256 => DecodingKey::from_secret(key),
            Algorithm::Rs256 => DecodingKey::from_rsa_pem(key)
                .map_err(|source| KeyError::BadPublicKey { algorithm, source })?,
            Algorithm::Es256 => DecodingKey::from_ec_pem(key)
                .map_err(|source| KeyError::BadPublicKey { algorithm, source })?,
        };
        let mut validation = Validation::new(algorithm.into());
        validation.set_required_spec_claims(&["exp", "sub"]);
        validation.leeway = DEFAULT_LEEWAY_SECS;
        // `nbf` is optional, but a token that carries one is refused before it.
        validation.validate_nbf = true;
        if let Some(issuer) = issuer {
            validation.set_issuer(&[issuer]);
            validation.required_spec_claims.insert("iss".to_owned());
        }
        match audience {
            Some(audience) => {
                validation.set_audience(&[audience]);
                validation.required_spec_claims.insert("aud".to_owned());
            }
            None => validation.validate_aud = false,
        }
        Ok(Self { key, validation })
    }

    /// The same verifier tolerating `seconds` of clock skew on `exp` and `nbf` instead of the
    /// default.
    pub fn with_leeway(mut self, seconds: u64) -> Self {
        self.validation.leeway = seconds;
        self
    }

    /// Verifies a token and reads who it names.
    ///
    /// # Errors
    /// [`AuthError`] saying why the token is refused.
    pub fn verify(&self, token: &str) -> Result<Principal, AuthError> {
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        // A header that does not parse is not a JWT at all; claims that do not parse are a
        // JWT with the wrong content. Tell the two apart.
        jsonwebtoken::decode_header(token).map_err(|_| AuthError::Malformed)?;
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation)
            .map_err(|e| refusal(e.kind()))?;
        principal(data.claims, self.validation.leeway)
    }
}

impl From<Algorithm> for jsonwebtoken::Algorithm {
    fn from(algorithm: Algorithm) -> Self {
        match algorithm {
            Algorithm::Hs256 => Self::HS256,
            Algorithm::Rs256 => Self::RS256,
            Algorithm::Es256 => Self::ES256,
        }
    }
}

impl std::fmt::Display for Algorithm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Hs256 => "HS256",
            Self::Rs256 => "RS256",
            Self::Es256 => "ES256",
        })
    }
}

impl FromStr for Algorithm {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_uppercase().as_str() {
            "HS256" => Ok(Self::Hs256),
            "RS256" => Ok(Self::Rs256),
            "ES256" => Ok(Self::Es256),
            _ => Err(format!(
                "unsupported algorithm `{s}`; use HS256, RS256 or ES256"
            )),
        }
    }
}

fn principal(claims: Claims, leeway: u64) -> Result<Principal, AuthError> {
    let role = match claims.role.as_str() {
        "dispatcher" => Role::Dispatcher {
            regions: claims.regions,
        },
        "contractor" => {
            let id = claims.contractor_id.as_deref().unwrap_or(&claims.sub);
            let group = Group::try_contractor(id)
                .map_err(|e| AuthError::BadClaims(format!("contractorId {e}")))?;
            Role::Contractor { group }
        }
        _ => {
            return Err(AuthError::BadClaims(
                "role must be dispatcher or contractor".to_owned(),
            ));
        }
    };
    Ok(Principal {
        subject: claims.sub,
        role,
        // The check accepts a token while `now <= exp + leeway`: the first refused second is
        // one later, and that is when an open connection must close, so that the client's
        // reconnect with the same token is refused rather than let in and cut off again.
        valid_until: claims.exp.saturating_add(leeway).saturating_add(1),
    })
}

fn refusal(kind: &ErrorKind) -> AuthError {
    match kind {
        ErrorKind::ExpiredSignature => AuthError::Expired,
        ErrorKind::ImmatureSignature => AuthError::NotYetValid,
        ErrorKind::InvalidAlgorithm => AuthError::WrongAlgorithm,
        ErrorKind::InvalidSignature => AuthError::BadSignature,
        ErrorKind::InvalidIssuer => AuthError::WrongIssuer,
        ErrorKind::InvalidAudience => AuthError::WrongAudience,
        ErrorKind::InvalidClaimFormat(claim) => {
            AuthError::BadClaims(format!("claim `{claim}` is not a number of seconds"))
        }
        ErrorKind::MissingRequiredClaim(claim) => {
            AuthError::BadClaims(format!("missing claim `{claim}`"))
        }
        ErrorKind::Json(e) => {
            let message = e.to_string();
            let message = message
                .rfind(" at line ")
                .map_or(message.as_str(), |at| &message[..at]);
            AuthError::BadClaims(message.to_owned())
        }
        _ => AuthError::Malformed,
    }
}
