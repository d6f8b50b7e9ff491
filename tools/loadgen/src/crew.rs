//! The load processes that hold the connections: this one and, for large N, child processes.
//!
//! A process holds at most `--conns-per-process` connections (descriptors are capped near
//! 20,000 here), so `Crew` splits N over this process and children running the hidden
//! `receivers` mode. The parent drives each child over its stdin and reads JSON lines from its
//! stdout; `Crew` hides which holder is local. Stamps use the machine's monotonic clock, so a
//! child measures latency against the parent's send times without any clock sync.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{ChildStdin, ChildStdout, Command};
use tokio::time::timeout;

use crate::cli::{Endpoint, ReceiversArgs, Target};
use crate::fleet::{ConnectReport, Fleet, FleetConfig};
use crate::host::{self, CpuTicks};
use crate::tally::StepTally;

/// How long a child may take to answer a command other than its connect phase.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// Extra lifetime of tokens beyond the run's hard deadline.
const TOKEN_SLACK: Duration = Duration::from_secs(3600);

/// One moment's view of a load process.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct Snapshot {
    /// Live members per group.
    pub(crate) members: Vec<u32>,
    /// Live connections.
    pub(crate) live: u64,
    /// CPU the process has used so far.
    pub(crate) cpu: CpuTicks,
    /// Connections ended by the server or network since the previous snapshot, by reason.
    pub(crate) ends: BTreeMap<String, u64>,
}

/// All load processes' view at one moment.
#[derive(Debug, Clone, Default)]
pub(crate) struct CrewSnapshot {
    /// Live members per group, over all processes.
    pub(crate) members: Vec<u32>,
    /// Live connections, over all processes.
    pub(crate) live: u64,
    /// CPU of each process, this one first.
    pub(crate) cpu: Vec<CpuTicks>,
    /// Ended connections by reason, over all processes.
    pub(crate) ends: BTreeMap<String, u64>,
}

/// This process's fleet and the children's.
#[derive(Debug)]
pub(crate) struct Crew {
    local: Fleet,
    children: Vec<Child>,
}

/// What a child is asked.
#[derive(Debug, Serialize, Deserialize)]
enum Request {
    Snapshot,
    Collect(u32),
    Stop,
}

/// What a child answers.
#[derive(Debug, Serialize, Deserialize)]
enum Reply {
    Ready(ConnectReport),
    Snapshot(Snapshot),
    Tally(StepTally),
    Stopped,
}

#[derive(Debug)]
struct Child {
    process: tokio::process::Child,
    stdin: ChildStdin,
    stdout: Lines<BufReader<ChildStdout>>,
}

impl Crew {
    /// Opens `connections` connections over `groups`, split into shares of at most
    /// `per_process`; this process holds the first share.
    ///
    /// # Errors
    /// When a child cannot be started or stops answering.
    pub(crate) async fn open(
        target: &Target,
        connections: usize,
        groups: usize,
        per_process: usize,
    ) -> anyhow::Result<(Self, ConnectReport)> {
        let processes = connections.div_ceil(per_process);
        let shares = split(connections, processes);
        let mut children = Vec::new();
        let mut first = shares[0];
        for &count in &shares[1..] {
            children.push(Child::spawn(target, first, count, groups)?);
            first += count;
        }
        let config = fleet_config(target, 0, shares[0], groups)?;
        let (local, mut report) = Fleet::open(config).await?;
        for child in &mut children {
            let ready = child.read(None).await?;
            let Reply::Ready(child_report) = ready else {
                bail!("a receivers process answered {ready:?} instead of Ready");
            };
            report.merge(&child_report);
        }
        Ok((Self { local, children }, report))
    }

    /// PIDs of the load processes, this one first.
    pub(crate) fn pids(&self) -> Vec<u32> {
        std::iter::once(std::process::id())
            .chain(self.children.iter().filter_map(|c| c.process.id()))
            .collect()
    }

    /// Load processes in use.
    pub(crate) fn processes(&self) -> usize {
        1 + self.children.len()
    }

    /// Members, CPU and ended connections of every process.
    ///
    /// # Errors
    /// When a child stops answering.
    pub(crate) async fn snapshot(&mut self) -> anyhow::Result<CrewSnapshot> {
        let local = local_snapshot(&self.local)?;
        let mut total = CrewSnapshot {
            members: local.members,
            live: local.live,
            cpu: vec![local.cpu],
            ends: local.ends,
        };
        for child in &mut self.children {
            let reply = child.ask(&Request::Snapshot).await?;
            let Reply::Snapshot(snapshot) = reply else {
                bail!("a receivers process answered {reply:?} instead of Snapshot");
            };
            for (mine, theirs) in total.members.iter_mut().zip(&snapshot.members) {
                *mine += theirs;
            }
            total.live += snapshot.live;
            total.cpu.push(snapshot.cpu);
            for (reason, count) in snapshot.ends {
                *total.ends.entry(reason).or_default() += count;
            }
        }
        Ok(total)
    }

    /// Closes step `step` on every process and returns the merged tally.
    ///
    /// # Errors
    /// When a child stops answering.
    pub(crate) async fn collect(&mut self, step: u32) -> anyhow::Result<StepTally> {
        let mut total = self.local.collect(step);
        for child in &mut self.children {
            let reply = child.ask(&Request::Collect(step)).await?;
            let Reply::Tally(tally) = reply else {
                bail!("a receivers process answered {reply:?} instead of Tally");
            };
            total.merge(&tally);
        }
        Ok(total)
    }

    /// Closes every connection and ends the children.
    pub(crate) async fn close(self) {
        let (local, children) = (self.local, self.children);
        let stop_children = async {
            for child in children {
                if let Err(e) = child.stop().await {
                    eprintln!("loadgen: a receivers process did not stop cleanly: {e:#}");
                }
            }
        };
        tokio::join!(local.close(), stop_children);
    }
}

impl Child {
    fn spawn(target: &Target, first: usize, count: usize, groups: usize) -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("finding the loadgen executable")?;
        let mut command = Command::new(exe);
        command
            .arg("receivers")
            .args(["--url", &target.url])
            .args([
                "--connect-concurrency",
                &target.connect_concurrency.to_string(),
            ])
            .args([
                "--connect-timeout-secs",
                &target.connect_timeout_secs.to_string(),
            ])
            .args(["--max-secs", &target.max_secs.to_string()])
            .args(["--first", &first.to_string()])
            .args(["--count", &count.to_string()])
            .args(["--groups", &groups.to_string()])
            .env("LOADGEN_JWT_SECRET", &target.jwt_secret)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        if let Some(origin) = &target.origin {
            command.args(["--origin", origin]);
        }
        if target.no_spread {
            command.arg("--no-spread");
        }
        if target.stateful {
            command.arg("--stateful");
        }
        let mut process = command.spawn().context("starting a receivers process")?;
        let (Some(stdin), Some(stdout)) = (process.stdin.take(), process.stdout.take()) else {
            bail!("a receivers process has no pipes");
        };
        Ok(Self {
            process,
            stdin,
            stdout: BufReader::new(stdout).lines(),
        })
    }

    async fn ask(&mut self, command: &Request) -> anyhow::Result<Reply> {
        let mut line = serde_json::to_string(command)?;
        line.push('\n');
        self.stdin.write_all(line.as_bytes()).await?;
        self.stdin.flush().await?;
        self.read(Some(ANSWER_TIMEOUT)).await
    }

    /// Reads one reply; `None` waits as long as the child lives (its own deadline bounds it).
    async fn read(&mut self, limit: Option<Duration>) -> anyhow::Result<Reply> {
        let next = self.stdout.next_line();
        let line = match limit {
            Some(limit) => timeout(limit, next)
                .await
                .context("a receivers process did not answer in time")??,
            None => next.await?,
        };
        let line = line.context("a receivers process ended early")?;
        serde_json::from_str(&line).with_context(|| format!("unreadable reply `{line}`"))
    }

    async fn stop(mut self) -> anyhow::Result<()> {
        let reply = self.ask(&Request::Stop).await?;
        if !matches!(reply, Reply::Stopped) {
            bail!("answered {reply:?} instead of Stopped");
        }
        timeout(ANSWER_TIMEOUT, self.process.wait()).await??;
        Ok(())
    }
}

/// The hidden `receivers` mode: hold a share of connections and answer the parent.
///
/// # Errors
/// When the connections cannot be set up or stdout is gone.
pub(crate) async fn serve(args: ReceiversArgs) -> anyhow::Result<()> {
    let config = fleet_config(&args.target, args.first, args.count, args.groups)?;
    let (fleet, report) = Fleet::open(config).await?;
    let mut stdout = tokio::io::stdout();
    send(&mut stdout, &Reply::Ready(report)).await?;
    let mut commands = BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = commands.next_line().await? {
        let reply = match serde_json::from_str::<Request>(&line) {
            Ok(Request::Snapshot) => Reply::Snapshot(local_snapshot(&fleet)?),
            Ok(Request::Collect(step)) => Reply::Tally(fleet.collect(step)),
            Ok(Request::Stop) => break,
            Err(e) => bail!("unreadable command `{line}`: {e}"),
        };
        send(&mut stdout, &reply).await?;
    }
    fleet.close().await;
    // The parent may be gone already (stdin closed); that is fine.
    let _ = send(&mut stdout, &Reply::Stopped).await;
    Ok(())
}

async fn send(stdout: &mut tokio::io::Stdout, reply: &Reply) -> anyhow::Result<()> {
    let mut line = serde_json::to_string(reply)?;
    line.push('\n');
    stdout.write_all(line.as_bytes()).await?;
    stdout.flush().await?;
    Ok(())
}

fn local_snapshot(fleet: &Fleet) -> anyhow::Result<Snapshot> {
    Ok(Snapshot {
        members: fleet.members(),
        live: fleet.live(),
        cpu: host::cpu_ticks(None)?,
        ends: fleet.take_ends(),
    })
}

fn fleet_config(
    target: &Target,
    first: usize,
    count: usize,
    groups: usize,
) -> anyhow::Result<FleetConfig> {
    Ok(FleetConfig {
        endpoint: Endpoint::try_loopback(&target.url)?,
        jwt_secret: target.jwt_secret.clone(),
        origin: target.origin.clone(),
        spread: !target.no_spread,
        first,
        count,
        groups,
        concurrency: target.connect_concurrency,
        connect_timeout: Duration::from_secs(target.connect_timeout_secs),
        token_lifetime: Duration::from_secs(target.max_secs) + TOKEN_SLACK,
        stateful: target.stateful,
    })
}

/// `total` split into `parts` shares that differ by at most one, larger first.
fn split(total: usize, parts: usize) -> Vec<usize> {
    let parts = parts.max(1);
    (0..parts)
        .map(|i| total / parts + usize::from(i < total % parts))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_split_evenly_over_processes() {
        assert_eq!(split(5000, 1), [5000]);
        assert_eq!(split(20_001, 2), [10_001, 10_000]);
        assert_eq!(split(10, 3), [4, 3, 3]);
        assert_eq!(split(3, 0), [3]);
    }

    #[test]
    fn commands_and_replies_are_one_json_line() {
        let line = serde_json::to_string(&Request::Collect(3)).unwrap();
        assert!(matches!(
            serde_json::from_str(&line).unwrap(),
            Request::Collect(3)
        ));
        assert!(!line.contains('\n'));
    }
}
