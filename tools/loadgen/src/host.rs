//! What the tool reads from and asks of the local kernel: /proc figures, the monotonic clock,
//! the descriptor limit.
//!
//! The parsers are pure and tested; the readers are thin. Nothing here knows about the gateway
//! beyond its PID.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context;
use nix::sys::resource::{Resource, getrlimit, setrlimit};
use nix::time::{ClockId, clock_gettime};
use nix::unistd::{SysconfVar, sysconf};
use serde::{Deserialize, Serialize};

/// CPU time a process has used so far, in clock ticks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct CpuTicks {
    /// `utime`: user mode.
    pub(crate) user: u64,
    /// `stime`: kernel mode.
    pub(crate) system: u64,
}

impl CpuTicks {
    /// Ticks used between `earlier` and `self`.
    pub(crate) fn since(self, earlier: Self) -> Self {
        Self {
            user: self.user.saturating_sub(earlier.user),
            system: self.system.saturating_sub(earlier.system),
        }
    }

    /// User plus system ticks.
    pub(crate) fn total(self) -> u64 {
        self.user + self.system
    }
}

/// CPU ticks (user + system) each process has used so far, by PID.
///
/// Per-core figures from /proc/stat are not trustworthy on every virtual machine (on this
/// kind they miss most busy time), so load on the machine is summed over processes instead.
pub(crate) fn process_ticks() -> BTreeMap<u32, u64> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return BTreeMap::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| Some((pid, cpu_ticks(Some(pid)).ok()?.total())))
        .collect()
}

/// Ticks used between two `process_ticks` readings by processes not in `exclude`. Processes
/// started in between count in full; processes that ended in between are missed, so this is a
/// lower bound.
pub(crate) fn other_ticks(
    start: &BTreeMap<u32, u64>,
    end: &BTreeMap<u32, u64>,
    exclude: &[u32],
) -> u64 {
    end.iter()
        .filter(|(pid, _)| !exclude.contains(pid))
        .map(|(pid, ticks)| ticks.saturating_sub(start.get(pid).copied().unwrap_or(0)))
        .sum()
}

/// The current time of the machine's monotonic clock, in microseconds.
///
/// Every process on the machine reads the same clock, so a stamp written by one load process
/// can be read back by another.
pub(crate) fn now_micros() -> u64 {
    clock_gettime(ClockId::CLOCK_MONOTONIC).map_or(0, |ts| {
        let since_boot = Duration::new(
            u64::try_from(ts.tv_sec()).unwrap_or(0),
            u32::try_from(ts.tv_nsec()).unwrap_or(0),
        );
        u64::try_from(since_boot.as_micros()).unwrap_or(u64::MAX)
    })
}

/// Clock ticks per second (`getconf CLK_TCK`), normally 100.
pub(crate) fn clock_ticks_per_second() -> u64 {
    match sysconf(SysconfVar::CLK_TCK) {
        Ok(Some(ticks)) if ticks > 0 => ticks.unsigned_abs(),
        _ => 100,
    }
}

/// Raises the soft descriptor limit to the hard limit and returns it.
///
/// # Errors
/// When the limits cannot be read or set.
pub(crate) fn raise_nofile_limit() -> anyhow::Result<u64> {
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).context("getrlimit(RLIMIT_NOFILE)")?;
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).context("setrlimit(RLIMIT_NOFILE)")?;
    Ok(hard)
}

/// CPU ticks of process `pid` (or of this process with `None`).
///
/// # Errors
/// When /proc cannot be read or parsed (the process is gone).
pub(crate) fn cpu_ticks(pid: Option<u32>) -> anyhow::Result<CpuTicks> {
    let path = proc_path(pid, "stat");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    parse_stat(&text).with_context(|| format!("parsing {path}"))
}

/// Resident set size of process `pid`, in KiB.
///
/// # Errors
/// When /proc cannot be read or parsed (the process is gone).
pub(crate) fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let path = proc_path(Some(pid), "status");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    parse_vm_rss(&text).with_context(|| format!("no VmRSS in {path}"))
}

fn proc_path(pid: Option<u32>, file: &str) -> String {
    match pid {
        Some(pid) => format!("/proc/{pid}/{file}"),
        None => format!("/proc/self/{file}"),
    }
}

/// Fields 14 and 15 of /proc/PID/stat. The command name (field 2) may hold spaces and
/// parentheses, so fields are counted from the last `)`.
fn parse_stat(text: &str) -> Option<CpuTicks> {
    let after_name = &text[text.rfind(')')? + 1..];
    // The first field after the name is field 3 (state).
    let mut fields = after_name.split_whitespace().skip(14 - 3);
    let user = fields.next()?.parse().ok()?;
    let system = fields.next()?.parse().ok()?;
    Some(CpuTicks { user, system })
}

fn parse_vm_rss(text: &str) -> Option<u64> {
    let line = text.lines().find(|line| line.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_from_the_last_parenthesis() {
        let stat = "4242 (my (odd) name) S 1 4242 4242 0 -1 4194560 800 0 0 0 1234 567 0 0 20 0 9 0 100 200000 3000 18446744073709551615";
        assert_eq!(
            parse_stat(stat),
            Some(CpuTicks {
                user: 1234,
                system: 567
            })
        );
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn other_ticks_skip_excluded_processes_and_count_new_ones_in_full() {
        let start = BTreeMap::from([(1, 100), (2, 50), (3, 10)]);
        let end = BTreeMap::from([(1, 130), (2, 90), (4, 7)]);
        assert_eq!(other_ticks(&start, &end, &[2]), 30 + 7);
        assert!(process_ticks().contains_key(&std::process::id()));
    }

    #[test]
    fn vm_rss_is_read_in_kib() {
        let status = "Name:\tgateway\nVmPeak:\t  99999 kB\nVmRSS:\t   12345 kB\nThreads:\t3\n";
        assert_eq!(parse_vm_rss(status), Some(12345));
        assert_eq!(parse_vm_rss("Name:\tx\n"), None);
    }

    #[test]
    fn this_process_can_be_read() {
        assert!(cpu_ticks(None).is_ok());
        assert!(rss_kib(std::process::id()).unwrap() > 0);
        assert!(clock_ticks_per_second() > 0);
        let (a, b) = (now_micros(), now_micros());
        assert!(a > 0 && b >= a);
    }
}
