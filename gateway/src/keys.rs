//! Key material: reads the files the configuration names and builds what `auth` and the broker
//! take from their bytes.
//!
//! The one module of the gateway that reads files. [`secret`] is how a secret given directly or
//! by file is read, by the server ([`Keys::load`]) and by `gateway token` alike. It never logs a
//! key, only which flag or file is wrong; like [`Config::validate`], [`Keys::load`] reports every
//! problem at once. Files are read with `std::fs` at startup: they are small, and nothing is
//! being served yet.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::auth::{self, Algorithm, ConnectionTokens, Verifier};
use crate::config::{Config, ConfigError, MIN_KEY_BYTES, Secret};

/// Key material read from the configuration and its files.
#[derive(Debug)]
pub struct Keys {
    /// Checks user tokens.
    pub verifier: Verifier,
    /// Signs and checks negotiate's connection tokens.
    pub connection_tokens: ConnectionTokens,
    /// The service key of `POST /api/v1/events`; `None` disables it.
    pub service_key: Option<Arc<str>>,
    /// The certificate authority (PEM) for a `rediss://` URL, from `--redis-ca-file`.
    pub redis_ca: Option<Vec<u8>>,
}

/// A key file that cannot be read.
#[derive(Debug, thiserror::Error)]
#[error("{}: {source}", path.display())]
pub struct KeyFileError {
    /// The file.
    pub path: PathBuf,
    /// Why it could not be read.
    #[source]
    pub source: std::io::Error,
}

impl Keys {
    /// Reads every key file and checks every key, reporting all problems at once.
    ///
    /// # Errors
    /// [`ConfigError`] naming each flag whose key is missing, unreadable or unusable.
    pub fn load(config: &Config) -> Result<Self, ConfigError> {
        let auth = &config.auth;
        let mut problems = Vec::new();
        let mut read = |flag: &str, value: &Option<Secret>, file: &Option<PathBuf>| {
            secret(value.as_ref(), file.as_deref())
                .map_err(|e| problems.push(format!("{flag} {e}")))
                .ok()
                .flatten()
        };
        let jwt_secret = read("--jwt-secret-file", &auth.jwt_secret, &auth.jwt_secret_file);
        let service_key = read(
            "--service-key-file",
            &auth.service_key,
            &auth.service_key_file,
        );
        let connection_secret = read(
            "--connection-token-secret-file",
            &auth.connection_token_secret,
            &auth.connection_token_secret_file,
        );
        let mut read_bytes = |flag: &str, file: &Option<PathBuf>| {
            let path = file.as_deref()?;
            std::fs::read(path)
                .map_err(|e| problems.push(format!("{flag} {}: {e}", path.display())))
                .ok()
        };
        let jwt_key = match auth.jwt_algorithm {
            Algorithm::Hs256 => jwt_secret.map(|s| s.expose().as_bytes().to_vec()),
            Algorithm::Rs256 | Algorithm::Es256 => {
                read_bytes("--jwt-public-key-file", &auth.jwt_public_key_file)
            }
        };
        let redis_ca = read_bytes("--redis-ca-file", &config.redis.ca_file);
        let verifier = jwt_key.and_then(|key| {
            Verifier::try_new(
                auth.jwt_algorithm,
                &key,
                auth.jwt_issuer.as_deref(),
                auth.jwt_audience.as_deref(),
            )
            .map(|v| v.with_leeway(auth.jwt_leeway.as_secs()))
            .map_err(|e| problems.push(format!("user token key: {e}")))
            .ok()
        });
        // Values given directly were checked by `Config::validate`; these came from files.
        for (flag, file, value) in [
            ("--service-key-file", &auth.service_key_file, &service_key),
            (
                "--connection-token-secret-file",
                &auth.connection_token_secret_file,
                &connection_secret,
            ),
        ] {
            if let (Some(path), Some(value)) = (file, value)
                && value.expose().len() < MIN_KEY_BYTES
            {
                problems.push(format!(
                    "{flag} {}: the key must be at least {MIN_KEY_BYTES} bytes",
                    path.display()
                ));
            }
        }
        let Some(verifier) = verifier.filter(|_| problems.is_empty()) else {
            if problems.is_empty() {
                problems.push("no key for user tokens is configured".to_owned());
            }
            return Err(ConfigError(problems));
        };
        if service_key.is_none() {
            tracing::warn!("no service key configured: POST /api/v1/events is disabled");
        }
        let connection_secret = connection_secret.unwrap_or_else(|| {
            tracing::warn!(
                "no connection token secret configured: negotiate tokens are valid on this replica only; set GATEWAY_CONNECTION_TOKEN_SECRET on every replica"
            );
            Secret::new(auth::dev::random_secret())
        });
        Ok(Self {
            verifier,
            connection_tokens: ConnectionTokens::new(connection_secret.expose().as_bytes()),
            service_key: service_key.map(|key| Arc::from(key.expose())),
            redis_ca,
        })
    }
}

/// A secret given directly (`value`) or by `file`, whose trailing newline is ignored; `None`
/// when neither is given.
///
/// # Errors
/// [`KeyFileError`] when the file cannot be read.
pub fn secret(value: Option<&Secret>, file: Option<&Path>) -> Result<Option<Secret>, KeyFileError> {
    if let Some(value) = value {
        return Ok(Some(value.clone()));
    }
    let Some(path) = file else {
        return Ok(None);
    };
    let text = std::fs::read_to_string(path).map_err(|source| KeyFileError {
        path: path.to_owned(),
        source,
    })?;
    Ok(Some(Secret::new(text.trim_end_matches(['\n', '\r']))))
}
