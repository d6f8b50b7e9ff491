//! The documentation tells the truth about the code it describes.

use std::collections::BTreeSet;

use clap::CommandFactory;
use e2e::workspace_root;
use gateway::config::Cli;

/// Every `GATEWAY_*` name in `text`.
fn variables(text: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("GATEWAY_") {
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_')
            .collect();
        rest = &rest[at + name.len()..];
        // `GATEWAY_*` in prose names the family, not a variable.
        if name.len() > "GATEWAY_".len() {
            found.insert(name);
        }
    }
    found
}

#[test]
fn configuration_md_documents_every_variable_in_help_and_no_other() {
    let help = Cli::command().render_long_help().to_string();
    let in_help = variables(&help);
    assert!(in_help.len() > 20, "help lists the variables: {in_help:?}");
    let doc = std::fs::read_to_string(workspace_root().join("docs/configuration.md")).unwrap();
    let in_doc = variables(&doc);
    let undocumented: Vec<_> = in_help.difference(&in_doc).collect();
    assert!(
        undocumented.is_empty(),
        "not in docs/configuration.md: {undocumented:?}"
    );
    let unknown: Vec<_> = in_doc.difference(&in_help).collect();
    assert!(
        unknown.is_empty(),
        "documented but not in --help: {unknown:?}"
    );
}

#[test]
fn the_readme_names_the_test_command_that_ci_runs() {
    let root = workspace_root();
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let ci = std::fs::read_to_string(root.join(".ci/run")).unwrap();
    assert!(readme.contains("\ntests/run\n"), "README shows `tests/run`");
    assert!(ci.contains("tests/run"), ".ci/run calls tests/run");
}
