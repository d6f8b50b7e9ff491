//! The `gateway` binary: parse the command line, set up logging and metrics, run until
//! SIGTERM or SIGINT, drain, exit. Also `gateway token`, which mints development tokens.

use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::Parser;
use gateway::auth::dev::{self, TokenClaims};
use gateway::config::{Cli, Command, Config, ConfigError, DevCredentials, TokenArgs, TokenRole};
use gateway::keys;

/// mimalloc instead of glibc malloc: the publish path allocates per request (HTTP, JSON, the Redis
/// call) and glibc's slow paths (chunk consolidation) cost about 30% of the gateway's user CPU per
/// publish (docs/benchmarks.md, "Publish path").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Exit code for a bad configuration (sysexits' EX_USAGE).
const EXIT_USAGE: u8 = 64;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Token(args)) => token(&cli.config, &args),
        None => serve(cli.config),
    }
}

fn serve(mut config: Config) -> ExitCode {
    let dev = config.dev.then(|| config.apply_dev_defaults());
    if let Err(e) = config.validate() {
        eprintln!("gateway: {e}");
        return ExitCode::from(EXIT_USAGE);
    }
    if let Err(e) = gateway::telemetry::init(&config.log) {
        eprintln!("gateway: cannot set up logging: {e}");
        return ExitCode::from(EXIT_USAGE);
    }
    // Multi-threaded even with one worker. Measured on one core (docs/benchmarks.md): the
    // single-threaded scheduler answered a publish to a group of 5,000 only after running the
    // 5,000 connection tasks it woke (p99 75-110 ms, capping broadcast near 100k deliveries/s);
    // with this one the publisher is answered in 3-40 ms and broadcast reaches 400k/s.
    if config.worker_threads == 0 {
        config.worker_threads = std::thread::available_parallelism().map_or(1, usize::from);
    }
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.worker_threads(config.worker_threads());
    let runtime = match builder.enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("gateway: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config, dev)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if let Some(config_error) = e.downcast_ref::<ConfigError>() {
                eprintln!("gateway: {config_error}");
                return ExitCode::from(EXIT_USAGE);
            }
            tracing::error!(error = format!("{e:#}"), "gateway failed");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: Config, dev: Option<DevCredentials>) -> anyhow::Result<()> {
    let metrics = gateway::metrics::install()?;
    let issuer = config.auth.jwt_issuer.clone();
    let audience = config.auth.jwt_audience.clone();
    let gateway = gateway::start(config, metrics).await?;
    if let Some(dev) = dev {
        print_dev_banner(&dev, &gateway, issuer, audience)?;
    }
    wait_for_signal().await?;
    gateway.shutdown();
    gateway.wait().await
}

async fn wait_for_signal() -> anyhow::Result<()> {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = terminate.recv() => tracing::info!(signal = "SIGTERM", "signal received"),
        result = tokio::signal::ctrl_c() => {
            result?;
            tracing::info!(signal = "SIGINT", "signal received");
        }
    }
    Ok(())
}

/// Prints what a newcomer needs to try the gateway: tokens, the service key, and curl lines.
#[allow(clippy::print_stdout)] // The banner is this mode's intended output.
fn print_dev_banner(
    dev: &DevCredentials,
    gateway: &gateway::Gateway,
    iss: Option<String>,
    aud: Option<String>,
) -> anyhow::Result<()> {
    let public = gateway.public_addr();
    let admin = gateway.admin_addr();
    let key = dev
        .service_key
        .as_ref()
        .map_or("<the key in your --service-key-file>", |k| k.expose());
    println!(
        r#"
gateway is running in DEVELOPMENT mode (ephemeral secrets, any origin allowed)

  hub:      ws://{public}/hub/v1        (SignalR JSON protocol)
  publish:  http://{public}/api/v1/events
  admin:    http://{admin}/readyz  /metrics
  service key:  {key}"#
    );
    match &dev.jwt_secret {
        Some(secret) => {
            let exp = unix_now() + 12 * 3600;
            let mint = |sub: &str, role: &str, regions: &[&str], contractor: Option<&str>| {
                dev::mint(
                    secret.expose().as_bytes(),
                    &TokenClaims {
                        sub: sub.to_owned(),
                        role: role.to_owned(),
                        regions: regions.iter().map(|r| (*r).to_owned()).collect(),
                        contractor_id: contractor.map(str::to_owned),
                        exp,
                        iss: iss.clone(),
                        aud: aud.clone(),
                    },
                )
            };
            let contractor_id = "11111111-2222-4333-8444-555555555555";
            println!(
                r#"  GATEWAY_JWT_SECRET={jwt}   (for `gateway token`)
  dispatcher token (regions west, east), valid 12 h:
    {dispatcher}
  contractor token ({contractor_id}), valid 12 h:
    {contractor}"#,
                jwt = secret.expose(),
                dispatcher = mint("dev-dispatcher", "dispatcher", &["west", "east"], None)?,
                contractor = mint("dev-contractor", "contractor", &[], Some(contractor_id))?,
            );
        }
        None => println!("  user tokens: sign them with the key you configured"),
    }
    println!(
        r#"
publish an event:
  curl -i -X POST http://{public}/api/v1/events \
    -H 'Authorization: Bearer {key}' -H 'Content-Type: application/json' \
    -d '{{"type":"RecommendationReady","jobId":"7d9f4f3e-1c2b-4d5e-8f60-123456789abc","requestId":"0b1c2d3e-4f50-4a6b-9c8d-0e1f2a3b4c5d","region":"west","configVersion":1,"generatedAt":"2025-11-08T12:34:56Z"}}'
"#
    );
    Ok(())
}

/// `gateway token`: prints one HS256 token signed with the configured secret.
#[allow(clippy::print_stdout)] // The token is this command's output.
fn token(config: &Config, args: &TokenArgs) -> ExitCode {
    let auth = &config.auth;
    let secret = match keys::secret(auth.jwt_secret.as_ref(), auth.jwt_secret_file.as_deref()) {
        Ok(Some(secret)) => secret,
        Ok(None) => {
            eprintln!(
                "gateway token: set GATEWAY_JWT_SECRET or GATEWAY_JWT_SECRET_FILE to the gateway's HS256 secret"
            );
            return ExitCode::from(EXIT_USAGE);
        }
        Err(e) => {
            eprintln!("gateway token: cannot read {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let secret = secret.expose();
    if secret.len() < gateway::auth::token::MIN_SECRET_BYTES {
        eprintln!(
            "gateway token: the HS256 secret must be at least {} bytes",
            gateway::auth::token::MIN_SECRET_BYTES
        );
        return ExitCode::from(EXIT_USAGE);
    }
    let (role, regions) = match args.role {
        TokenRole::Dispatcher if args.regions.is_empty() => {
            eprintln!("gateway token: a dispatcher needs at least one --region");
            return ExitCode::from(EXIT_USAGE);
        }
        TokenRole::Dispatcher => ("dispatcher", args.regions.clone()),
        TokenRole::Contractor => ("contractor", Vec::new()),
    };
    let claims = TokenClaims {
        sub: args.sub.clone(),
        role: role.to_owned(),
        regions,
        contractor_id: args.contractor_id.clone(),
        exp: unix_now() + args.ttl.as_secs(),
        iss: config.auth.jwt_issuer.clone(),
        aud: config.auth.jwt_audience.clone(),
    };
    match dev::mint(secret.as_bytes(), &claims) {
        Ok(token) => {
            println!("{token}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("gateway token: {e}");
            ExitCode::FAILURE
        }
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs()
}
