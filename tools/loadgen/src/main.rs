//! `loadgen`: a bounded load tool for the gateway, following docs on benchmarking.
//!
//! It holds N SignalR connections (real tokens, the JSON hub protocol) over G groups, publishes
//! over HTTP at stepped rates with a stamp in each event, and reports per step deliveries/s,
//! lost, duplicated and reordered deliveries, latency percentiles, the gateway's CPU per
//! delivery (user and system, from /proc) and RSS per connection. Loopback only; every mode
//! stops by itself.
//!
//! ```text
//! taskset -c 1 loadgen run --gateway-pid $(pidof gateway) --jwt-secret S --service-key K \
//!     --connections 5000 --groups 50 --rates 500,750,1000,1250
//! taskset -c 1 loadgen idle --gateway-pid $(pidof gateway) --jwt-secret S --connections 10000
//! ```
//!
//! Modules, in reading order: `cli` (flags, loopback checks), `modes` (the phases of `run` and
//! `idle`), `crew` (this process and child load processes), `fleet` (the connections),
//! `ws` (client WebSocket framing), `publisher` (paced HTTP lanes), `signalr` (the protocol
//! subset), `tally` (loss, duplicates, reordering, latency), `host` (/proc, clock, rlimit),
//! `report` (rows and markdown); `stream` (`publish-stream`), `bench` (`publish-bench`, the
//! publisher-lib path alone) and `churn` (the soak's load) stand apart.

mod bench;
mod churn;
mod cli;
mod crew;
mod fleet;
mod host;
mod modes;
mod publisher;
mod report;
mod signalr;
mod stream;
mod tally;
mod ws;

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

use crate::cli::{Cli, Mode};
use crate::modes::Report;

/// Time past `--max-secs` after which the process gives up on closing cleanly.
const HARD_DEADLINE_SLACK: Duration = Duration::from_secs(30);

fn main() -> ExitCode {
    // On one core (the benchmark pins the tool to one) a single-threaded runtime costs less
    // per message than a one-worker multi-threaded one, so the tool stays out of the way.
    let single = std::thread::available_parallelism().map_or(true, |n| n.get() == 1);
    let runtime = if single {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
    };
    match runtime {
        Ok(runtime) => runtime.block_on(run()),
        Err(e) => {
            eprintln!("loadgen: cannot start the runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> ExitCode {
    let cli = Cli::parse();
    let cli = match cli.mode {
        // Bounded by its own --secs and --flush-secs; it reports on stdout itself.
        Mode::PublishStream(args) => return stream::main(args).await,
        // Bounded by its own phases plus a deadline; it reports on stdout itself.
        Mode::Churn(args) => return churn::main(args).await,
        // Bounded by its own --max-secs; it reports on stdout itself.
        Mode::PublishBench(args) => return bench::main(args).await,
        mode => Cli { mode },
    };
    if let Err(e) = host::raise_nofile_limit() {
        eprintln!("loadgen: could not raise the descriptor limit: {e:#}");
    }
    let (max_secs, json) = match &cli.mode {
        Mode::Run(args) => (args.target.max_secs, args.observe.json),
        Mode::Idle(args) => (args.target.max_secs, args.observe.json),
        Mode::Receivers(args) => (args.target.max_secs, false),
        Mode::PublishStream(_) | Mode::Churn(_) | Mode::PublishBench(_) => {
            unreachable!("handled above")
        }
    };
    let work = async {
        match cli.mode {
            Mode::Run(args) => modes::run(args).await.map(Some),
            Mode::Idle(args) => modes::idle(args).await.map(Some),
            Mode::Receivers(args) => crew::serve(args).await.map(|()| None),
            Mode::PublishStream(_) | Mode::Churn(_) | Mode::PublishBench(_) => {
                unreachable!("handled above")
            }
        }
    };
    let limit = Duration::from_secs(max_secs) + HARD_DEADLINE_SLACK;
    let code = match tokio::time::timeout(limit, work).await {
        Ok(Ok(Some(report))) => {
            emit(&report, json);
            match &report {
                Report::Run { setting, .. } if setting.cut_short.is_some() => ExitCode::FAILURE,
                _ => ExitCode::SUCCESS,
            }
        }
        Ok(Ok(None)) => ExitCode::SUCCESS,
        Ok(Err(e)) => {
            eprintln!("loadgen: {e:#}");
            ExitCode::FAILURE
        }
        Err(_) => {
            eprintln!("loadgen: hard deadline ({limit:?}) reached; giving up");
            ExitCode::FAILURE
        }
    };
    // Leave at once: a runtime shutdown would wait for the blocking stdin reader of a child.
    std::process::exit(if code == ExitCode::SUCCESS { 0 } else { 1 })
}

/// Prints the report: markdown, or JSON lines with `--json`.
#[allow(clippy::print_stdout)] // The report on stdout is the tool's output.
fn emit(report: &Report, json: bool) {
    if json {
        match report {
            Report::Run { setting, steps } => {
                println!(
                    "{}",
                    serde_json::json!({ "kind": "setting", "setting": setting })
                );
                for step in steps {
                    println!("{}", serde_json::json!({ "kind": "step", "step": step }));
                }
            }
            Report::Idle(row) => println!("{}", serde_json::json!({ "kind": "idle", "idle": row })),
        }
    } else {
        match report {
            Report::Run { setting, steps } => print!("{}", report::run_markdown(setting, steps)),
            Report::Idle(row) => print!("{}", report::idle_markdown(row)),
        }
    }
}
