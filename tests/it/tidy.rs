//! Architecture rules checked on the source text: the pure core names no runtime, web
//! framework or broker, metric names live in one file, only `http/` names axum, only the binary
//! reads process state, only `keys` reads files, and the tasks spawned outside a tracker are the
//! known short ones.

use std::path::{Path, PathBuf};

use e2e::workspace_root;

/// Every `.rs` file under `dir`, recursively, sorted.
fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        let entries =
            std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()));
        for entry in entries {
            let path = entry.expect("a directory entry").path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// The lines of `text` that are code, with their numbers: comment lines (including doc
/// comments) are prose and may name anything.
fn code_lines(text: &str) -> impl Iterator<Item = (usize, &str)> {
    text.lines()
        .enumerate()
        .map(|(i, line)| (i + 1, line))
        .filter(|(_, line)| !line.trim_start().starts_with("//"))
}

#[test]
fn pure_core_names_no_runtime_framework_or_broker() {
    let root = workspace_root();
    let src = root.join("gateway/src");
    let mut files = rust_files(&src.join("protocol"));
    files.extend(rust_files(&src.join("auth")));
    files.push(src.join("hub.rs"));
    files.extend(rust_files(&root.join("ws-frame/src")));
    files.extend(rust_files(&root.join("publisher-lib/src/contract")));
    assert!(files.len() >= 8, "the core files were not found: {files:?}");

    let mut offences = Vec::new();
    for file in &files {
        let text = read(file);
        for (number, line) in code_lines(&text) {
            for forbidden in ["tokio::", "axum::", "redis"] {
                if line.contains(forbidden) {
                    offences.push(format!(
                        "{}:{number}: `{forbidden}` in `{}`",
                        file.strip_prefix(&root).unwrap_or(file).display(),
                        line.trim()
                    ));
                }
            }
        }
    }
    assert!(
        offences.is_empty(),
        "the pure core (protocol, auth, hub, ws-frame, contract) must not depend on tokio, axum or redis:\n{}",
        offences.join("\n")
    );
}

#[test]
fn metric_names_appear_only_in_metrics_rs() {
    let root = workspace_root();
    let src = root.join("gateway/src");
    let files = rust_files(&src);
    assert!(
        files.iter().any(|f| f.ends_with("metrics.rs")),
        "gateway/src/metrics.rs not found"
    );
    let mut offences = Vec::new();
    for file in files.iter().filter(|f| **f != src.join("metrics.rs")) {
        let text = read(file);
        for (number, line) in text.lines().enumerate() {
            if line.contains("\"gateway_") {
                offences.push(format!(
                    "{}:{}: {}",
                    file.strip_prefix(&root).unwrap_or(file).display(),
                    number + 1,
                    line.trim()
                ));
            }
        }
    }
    assert!(
        offences.is_empty(),
        "metric names belong in gateway/src/metrics.rs only:\n{}",
        offences.join("\n")
    );
}

/// The gateway's non-test source files, relative to `gateway/src`, with their text.
fn gateway_sources() -> Vec<(String, String)> {
    let src = workspace_root().join("gateway/src");
    let sources: Vec<_> = rust_files(&src)
        .into_iter()
        .map(|file| {
            let name = file
                .strip_prefix(&src)
                .expect("a file under gateway/src")
                .display()
                .to_string();
            (name, read(&file))
        })
        .filter(|(name, _)| !name.ends_with("tests.rs") && !name.contains("/tests/"))
        .collect();
    assert!(
        sources.iter().any(|(name, _)| name == "lib.rs"),
        "gateway/src/lib.rs not found"
    );
    sources
}

/// Fails, naming `rule` and each offending line, when a code line of the gateway outside the
/// files `allowed` accepts contains any of `patterns`.
fn assert_named_only_where_allowed(patterns: &[&str], allowed: impl Fn(&str) -> bool, rule: &str) {
    let mut offences = Vec::new();
    for (name, text) in gateway_sources().iter().filter(|(name, _)| !allowed(name)) {
        for (number, line) in code_lines(text) {
            if let Some(pattern) = patterns.iter().find(|p| line.contains(*p)) {
                offences.push(format!(
                    "gateway/src/{name}:{number}: `{pattern}` in `{}`",
                    line.trim()
                ));
            }
        }
    }
    assert!(offences.is_empty(), "{rule}:\n{}", offences.join("\n"));
}

/// Where the gateway may name what: (patterns, the files allowed to, the rule).
type Boundary = (&'static [&'static str], fn(&str) -> bool, &'static str);

const BOUNDARIES: &[Boundary] = &[
    (
        &["axum::", "use axum"],
        |name| name.starts_with("http/"),
        "axum belongs in gateway/src/http/ only",
    ),
    (
        &["std::env", "env::var", "available_parallelism"],
        |name| name == "main.rs",
        "the environment and the machine are read by main.rs only (config reads GATEWAY_* through clap)",
    ),
    (
        &["std::fs", "tokio::fs", "File::open"],
        |name| name == "keys.rs",
        "key files are read in gateway/src/keys.rs only",
    ),
    // lib.rs holds the servers' and the drain's handles and awaits them; every other task
    // (connections, the broker, the Redis probe, gap-repair reads) goes through a tracker.
    (
        &["tokio::spawn", "runtime.spawn", "task::spawn"],
        |name| name == "lib.rs",
        "spawn through a tracker (`Shutdown::connections`/`background`) so shutdown waits for it",
    ),
];

#[test]
fn axum_process_state_files_and_untracked_tasks_stay_where_they_belong() {
    for (patterns, allowed, rule) in BOUNDARIES {
        assert_named_only_where_allowed(patterns, allowed, rule);
    }
}

/// Who may frame, encode and spell what clients read.
const WIRE_BOUNDARIES: &[Boundary] = &[
    (
        &["ws_frame", "websocket::", "codec", "tokio::net"],
        |name| {
            !(name.starts_with("groups/") || name.starts_with("broker/") || name == "outbound.rs")
        },
        "groups, broker and outbound hand on frames that protocol built: they neither frame nor encode, and the queue names no socket",
    ),
    (
        &["json!"],
        |name| name.starts_with("protocol/") || name.starts_with("http/"),
        "what clients read is written by gateway/src/protocol (and HTTP answers by http/)",
    ),
    (
        &["An unexpected error occurred invoking"],
        |name| name.starts_with("protocol/"),
        "ASP.NET Core's wording of a refused invocation is protocol::frames::hub_exception",
    ),
];

#[test]
fn protocol_alone_frames_encodes_and_words_what_clients_read() {
    for (patterns, allowed, rule) in WIRE_BOUNDARIES {
        assert_named_only_where_allowed(patterns, allowed, rule);
    }
}
