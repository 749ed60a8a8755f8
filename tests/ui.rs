//! Golden-file tests: every manifest under `tests/ui/` is invalid; `kapsel apply -f` must fail
//! with exactly the message in the matching `.err` file (what a user sees). Parse errors are
//! caught by the CLI (file, line, column, field); semantic ones by the server (422, field path).
//! `BLESS=1 cargo test --test ui` rewrites the `.err` files.

mod common;

use std::process::Command;

#[test]
fn invalid_manifests_give_the_expected_errors() {
    let k = common::Kapsel::start();
    let root = common::repo("");
    let mut cases: Vec<_> = std::fs::read_dir(root.join("tests/ui"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            matches!(
                p.extension().and_then(|e| e.to_str()),
                Some("yaml") | Some("json")
            )
        })
        .collect();
    cases.sort();
    assert!(cases.len() >= 8);
    let mut failures = Vec::new();
    for case in cases {
        let rel = case.strip_prefix(&root).unwrap();
        let out = Command::new(common::bin())
            .current_dir(&root)
            .args(["--server", &k.url, "apply", "-f"])
            .arg(rel)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{} was accepted", rel.display());
        let got = String::from_utf8_lossy(&out.stderr).to_string();
        let err_file = case.with_extension("err");
        if std::env::var("BLESS").is_ok() {
            std::fs::write(&err_file, &got).unwrap();
            continue;
        }
        let want = std::fs::read_to_string(&err_file).unwrap_or_default();
        if got != want {
            failures.push(format!("{}:\n  want: {want}  got:  {got}", rel.display()));
        }
    }
    // Nothing invalid was stored.
    let out = k.cli(&["get", "pods", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let names: Vec<&str> = v["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["metadata"]["name"].as_str())
        .collect();
    assert!(names.iter().all(|n| *n == "fine"), "stored: {names:?}");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Errors a user gets before any server is involved: one line each, every cause once, and the
/// `--server` address checked up front.
#[test]
fn client_side_errors_are_one_clear_line() {
    let run = |args: &[&str]| {
        let out = Command::new(common::bin()).args(args).output().unwrap();
        assert!(!out.status.success(), "{args:?} succeeded");
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    let err = run(&["apply", "-f", "/nonexistent/kapsel-manifest.yaml"]);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert_eq!(
        err.matches("os error 2").count(),
        1,
        "cause repeated: {err}"
    );
    assert!(err.contains("/nonexistent/kapsel-manifest.yaml"), "{err}");

    let err = run(&["--server", "http://127.0.0.1:1/api", "get", "pods"]);
    assert!(err.contains("no path"), "{err}");
    assert!(!err.contains("relative URL"), "{err}");

    // Node labels and taints are checked before anything starts; the error names the flag.
    for (flag, value, says) in [
        ("--node-label", "zone", "expected KEY=VALUE"),
        (
            "--node-label",
            "kubernetes.io/role=x",
            "may not set labels under kubernetes.io/",
        ),
        (
            "--node-label",
            "node-restriction.kubernetes.io/a=b",
            "reserved for administrators",
        ),
        ("--node-label", "a=b c", "label value"),
        (
            "--node-taint",
            "k=v:Sometimes",
            "is not NoSchedule, PreferNoSchedule or NoExecute",
        ),
        ("--node-taint", "k=v", "expected key[=value]:Effect"),
    ] {
        let err = run(&["agent", "--server", "https://127.0.0.1:1", flag, value]);
        assert!(
            err.contains(flag) && err.contains(says),
            "{flag} {value}: {err}"
        );
    }
}

/// A bare `HOST:PORT` works as `--server`.
#[test]
fn server_without_scheme_is_taken_as_http() {
    let k = common::Kapsel::start();
    let bare = k.url.trim_start_matches("http://").to_string();
    let out = Command::new(common::bin())
        .args(["--server", &bare, "get", "pods"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `--help` tells what each command takes; a missing argument's usage line does not make the
/// optional `--server` look required.
#[test]
fn help_texts_name_every_kind_and_flag() {
    let run = |args: &[&str]| {
        let out = Command::new(common::bin()).args(args).output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (ok, help, _) = run(&["get", "--help"]);
    assert!(ok);
    for kind in ["pods", "deployments", "replicasets", "nodes", "events"] {
        assert!(help.contains(kind), "get --help lacks {kind}: {help}");
    }
    let (ok, help, _) = run(&["logs", "--help"]);
    assert!(ok);
    for (flag, words) in [
        ("--container", "container"),
        ("--follow", "streaming"),
        ("--tail", "last"),
    ] {
        let line = help
            .lines()
            .skip_while(|l| !l.contains(flag))
            .take(2)
            .collect::<String>();
        assert!(line.contains(words), "{flag} has no help: {help}");
    }
    let (ok, _, err) = run(&["logs"]);
    assert!(!ok);
    let usage = err
        .lines()
        .find(|l| l.starts_with("Usage:"))
        .unwrap_or_default();
    assert!(usage.contains("<POD>"), "{err}");
    assert!(
        !usage.contains("--server"),
        "--server looks required: {err}"
    );
}
