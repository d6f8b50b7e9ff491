//! `realtime-publish`: publish one real-time event from a shell or a script.
//!
//! The event is validated with the contract's rules, then published either straight to Redis
//! (as a backend linking `publisher_lib::Publisher` would) or through a gateway's
//! `POST /api/v1/events`. The outcome is printed as one JSON object on stdout. Exit codes follow
//! sysexits: 0 published, 1 the publish failed, 64 bad usage or an invalid event.

use std::io::{Read, Write};
use std::process::ExitCode;
use std::time::Duration;

use clap::{ArgGroup, Parser};
use publisher_lib::contract::Event;
use publisher_lib::{DEFAULT_PREFIX, PublishError, Publisher, PublisherConfig};
use serde_json::json;

const EXIT_FAILED: u8 = 1;
const EXIT_USAGE: u8 = 64;

const EXAMPLES: &str = r#"Examples:
  # Publish straight to Redis (every gateway replica subscribed under rt: receives it)
  realtime-publish --redis-url redis://127.0.0.1:6379 \
    '{"type":"RecommendationReady","jobId":"7d9f4f3e-1c2b-4d5e-8f60-123456789abc",
      "requestId":"0b1c2d3e-4f50-4a6b-9c8d-0e1f2a3b4c5d","region":"west","configVersion":1,
      "generatedAt":"2025-11-08T12:34:56Z"}'

  # Retrying under the same key within 5 minutes is acknowledged as a duplicate
  realtime-publish --redis-url redis://127.0.0.1:6379 --idempotency-key order-42-assigned < event.json

  # Read the event from stdin and publish through a gateway with the service key
  realtime-publish --gateway-url http://127.0.0.1:8080 --key "$SERVICE_KEY" < event.json

Exit codes: 0 published, 1 publish failed, 64 bad usage or invalid event."#;

/// Publish one SmartScheduler real-time event (RecommendationReady or JobAssigned).
#[derive(Debug, Parser)]
#[command(name = "realtime-publish", version, after_help = EXAMPLES)]
#[command(group(ArgGroup::new("target").required(true).args(["redis_url", "gateway_url"])))]
struct Cli {
    /// The event as JSON; read from stdin when absent or `-`.
    event: Option<String>,

    /// Publish straight to this Redis: redis://127.0.0.1:6379, rediss://... (TLS),
    /// redis+sentinel://host:26379/MASTER or a Redis Cluster's seed nodes,
    /// redis+cluster://host:7000,host:7001 (rediss+cluster:// for TLS); several URLs
    /// separated by spaces for groups spread over independent servers.
    #[arg(long, value_name = "URL")]
    redis_url: Option<String>,

    /// PEM certificate authority of a TLS Redis, when not one of the system roots.
    #[arg(long, value_name = "FILE", requires = "redis_url")]
    redis_ca_file: Option<std::path::PathBuf>,

    /// Channel prefix the gateways subscribe under (with --redis-url).
    #[arg(long, default_value = DEFAULT_PREFIX, requires = "redis_url", value_parser = prefix)]
    prefix: String,

    /// Publish through this gateway's POST /api/v1/events, e.g. http://127.0.0.1:8080.
    #[arg(long, value_name = "URL", requires = "key")]
    gateway_url: Option<String>,

    /// The gateway's service key, sent as `Authorization: Bearer KEY` (with --gateway-url).
    #[arg(
        long,
        env = "REALTIME_PUBLISH_KEY",
        hide_env_values = true,
        requires = "gateway_url"
    )]
    key: Option<String>,

    /// Idempotency key: publishing again under the same key within the window (5 minutes by
    /// default) is acknowledged as a duplicate and not delivered twice. Defaults to the event's
    /// own id (requestId or assignmentId). Sent as `Idempotency-Key` with --gateway-url.
    #[arg(long, value_name = "KEY")]
    idempotency_key: Option<String>,

    /// Give up after this long, e.g. 2s or 500ms.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    timeout: Duration,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(EXIT_USAGE)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let raw = match read_event(cli.event.as_deref()) {
        Ok(raw) => raw,
        Err(e) => {
            return fail(
                EXIT_USAGE,
                &format!("cannot read the event from stdin: {e}"),
            );
        }
    };
    let raw = raw.trim();
    let event = match Event::from_json(raw.as_bytes()) {
        Ok(event) => event,
        Err(e) => return fail(EXIT_USAGE, &format!("invalid event: {e}")),
    };
    let outcome = match (&cli.redis_url, &cli.gateway_url, &cli.key) {
        (Some(url), _, _) => {
            via_redis(
                url,
                cli.redis_ca_file.as_deref(),
                &cli.prefix,
                cli.timeout,
                &event,
                cli.idempotency_key.as_deref(),
            )
            .await
        }
        (None, Some(url), Some(key)) => {
            via_gateway(url, key, cli.timeout, raw, cli.idempotency_key.as_deref()).await
        }
        _ => Err((
            EXIT_USAGE,
            "give --redis-url, or --gateway-url with --key".to_owned(),
        )),
    };
    match outcome {
        Ok(receipt) => {
            let mut stdout = std::io::stdout().lock();
            if writeln!(stdout, "{receipt}").is_err() {
                return ExitCode::from(EXIT_FAILED);
            }
            ExitCode::SUCCESS
        }
        Err((code, message)) => fail(code, &message),
    }
}

fn read_event(argument: Option<&str>) -> std::io::Result<String> {
    match argument {
        Some(json) if json != "-" => Ok(json.to_owned()),
        _ => {
            let mut json = String::new();
            std::io::stdin().read_to_string(&mut json)?;
            Ok(json)
        }
    }
}

async fn via_redis(
    url: &str,
    ca_file: Option<&std::path::Path>,
    prefix: &str,
    timeout: Duration,
    event: &Event,
    idempotency_key: Option<&str>,
) -> Result<serde_json::Value, (u8, String)> {
    let mut config = PublisherConfig::new(url)
        .with_prefix(prefix)
        .with_publish_timeout(timeout);
    if let Some(path) = ca_file {
        let pem = std::fs::read(path).map_err(|e| {
            (
                EXIT_USAGE,
                format!("--redis-ca-file {}: {e}", path.display()),
            )
        })?;
        config = config.with_ca_certificate(pem);
    }
    let publisher = Publisher::new(config).map_err(|e| (EXIT_USAGE, chain(&e)))?;
    let key = idempotency_key.map_or_else(|| event.unique_id(), str::to_owned);
    let receipt = publisher
        .publish_with_key(event, &key)
        .await
        .map_err(|e| match e {
            PublishError::Invalid(_) => (EXIT_USAGE, chain(&e)),
            _ => (EXIT_FAILED, chain(&e)),
        })?;
    let groups: Vec<_> = receipt
        .deliveries
        .iter()
        .map(|d| {
            json!({
                "group": d.group.name(),
                "channel": d.group.channel(prefix),
                "subscribers": d.subscribers,
                "epoch": d.position.epoch,
                "seq": d.position.seq,
                "duplicate": d.duplicate,
            })
        })
        .collect();
    Ok(json!({
        "via": "redis",
        "id": receipt.id,
        "idempotencyKey": key,
        "type": receipt.kind.name(),
        "groups": groups,
    }))
}

async fn via_gateway(
    url: &str,
    key: &str,
    timeout: Duration,
    body: &str,
    idempotency_key: Option<&str>,
) -> Result<serde_json::Value, (u8, String)> {
    let endpoint = format!("{}/api/v1/events", url.trim_end_matches('/'));
    let client = reqwest::Client::builder()
        .timeout(timeout)
        .build()
        .map_err(|e| (EXIT_FAILED, format!("cannot build the HTTP client: {e}")))?;
    let mut request = client
        .post(&endpoint)
        .bearer_auth(key)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(body.to_owned());
    if let Some(idempotency_key) = idempotency_key {
        request = request.header("Idempotency-Key", idempotency_key);
    }
    let response = request.send().await.map_err(|e| {
        (
            EXIT_FAILED,
            format!("POST {endpoint} failed: {}", chain(&e)),
        )
    })?;
    let status = response.status();
    let text = response.text().await.unwrap_or_default();
    let answer: serde_json::Value =
        serde_json::from_str(&text).unwrap_or_else(|_| json!({ "body": text }));
    if status.is_success() {
        let mut receipt = json!({ "via": "gateway", "status": status.as_u16() });
        if let (Some(out), Some(fields)) = (receipt.as_object_mut(), answer.as_object()) {
            out.extend(fields.clone());
        }
        Ok(receipt)
    } else {
        let code = if status == reqwest::StatusCode::BAD_REQUEST {
            EXIT_USAGE
        } else {
            EXIT_FAILED
        };
        Err((code, format!("gateway answered {status}: {answer}")))
    }
}

/// The error and its sources, joined with `: `.
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

fn fail(code: u8, message: &str) -> ExitCode {
    eprintln!("realtime-publish: {message}");
    ExitCode::from(code)
}

/// A channel prefix the contract accepts ([`publisher_lib::contract::check_prefix`]).
fn prefix(text: &str) -> Result<String, String> {
    publisher_lib::contract::check_prefix(text)
        .map(|()| text.to_owned())
        .map_err(|rule| format!("the prefix {rule}"))
}
