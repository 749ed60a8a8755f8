//! `kapsel describe pod` on pods with built-in pattern containers: each is marked
//! `Built-in: KIND` and its own status is shown (git-sync's synced commit, the adapter's
//! series), served by the node at `GET .../pods/{name}/builtins`.

mod common;

use std::time::{Duration, Instant};

use common::*;

/// `kapsel describe pod NAME` until `ok` holds for its output (deadline `secs`).
async fn describe_until(k: &Kapsel, pod: &str, secs: u64, ok: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let out = k.cli(&["describe", "pod", pod]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() && ok(&text) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "describe pod {pod} never showed what was expected:\n{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The value of the first `LABEL:  value` line of a describe output.
fn field<'a>(text: &'a str, label: &str) -> Option<&'a str> {
    text.lines()
        .find_map(|l| l.trim_start().strip_prefix(&format!("{label}:")))
        .map(str::trim)
}

#[tokio::test(flavor = "multi_thread")]
async fn describe_shows_git_syncs_commit_and_the_adapters_series() {
    let k = Kapsel::start();

    // git-sync: its commit, then the next one once pushed.
    let remote = Remote::new();
    let first = remote.commit_text("v1\n");
    let args = vec![
        format!("--repo={}", remote.url()),
        "--root=/git".into(),
        "--period=200ms".into(),
    ];
    let idle = format!("  - name: idle\n    image: {}\n", fixture("sleep.wat"));
    k.apply("site", &gitsync_pod("site", &args, &idle));
    let text = describe_until(&k, "site", 60, |t| t.contains(&first)).await;
    assert_eq!(field(&text, "Built-in"), Some("git-sync"), "{text}");
    assert!(text.contains("Pattern components:"), "{text}");
    assert_eq!(field(&text, "Last synced commit"), Some(first.as_str()));
    assert!(
        field(&text, "Syncs").is_some_and(|s| s.ends_with("ok, 0 failed")),
        "{text}"
    );
    assert_eq!(field(&text, "Last error"), Some("<none>"), "{text}");
    let second = remote.commit_text("v2\n");
    let text = describe_until(&k, "site", 20, |t| {
        field(t, "Last synced commit") == Some(second.as_str())
    })
    .await;
    // The plain app container is not marked.
    let idle_block = text.split("  idle:").nth(1).unwrap();
    assert!(
        !idle_block
            .split("Pattern components:")
            .next()
            .unwrap()
            .contains("Built-in"),
        "{text}"
    );

    // The API behind it: JSON per container, 404 for an unknown pod.
    let (code, v) = k.get("/api/v1/namespaces/default/pods/site/builtins").await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["git-sync"]["kind"], "git-sync", "{v}");
    assert!(v.get("idle").is_none(), "{v}");
    let (code, _) = k
        .get("/api/v1/namespaces/default/pods/no-such-pod/builtins")
        .await;
    assert_eq!(code, 404);

    // The adapter: its series count, as many as the pod's values.
    let cfg = tempfile::tempdir().unwrap();
    std::fs::write(
        cfg.path().join("sources.yaml"),
        "lines:\n- name: status\n  file: /etc/adapter/status.txt\n  interval: 100ms\n  rules:\n  - {regex: '^jobs (?P<n>\\d+)$', name: shop_jobs, value: '$n'}\n  - {regex: '^worker=(?P<w>\\w+) busy=(?P<b>\\d+)$', name: shop_worker_busy, value: '$b', labels: {worker: '$w'}}\n",
    )
    .unwrap();
    std::fs::write(
        cfg.path().join("status.txt"),
        "jobs 42\nworker=a busy=3\nworker=b busy=1\n",
    )
    .unwrap();
    k.apply(
        "metrics",
        &format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: metrics}}\nspec:\n  volumes: [{{name: cfg, hostPath: {{path: {}}}}}]\n  containers:\n  - name: adapter\n    image: builtin/metrics-adapter\n    args: [\"--config=/etc/adapter/sources.yaml\", \"--web.listen-address=127.0.0.1:9102\"]\n    volumeMounts: [{{name: cfg, mountPath: /etc/adapter}}]\n",
            cfg.path().display()
        ),
    );
    let text = describe_until(&k, "metrics", 60, |t| {
        field(t, "Series").and_then(|s| s.parse::<u64>().ok()) >= Some(3)
    })
    .await;
    assert_eq!(field(&text, "Built-in"), Some("metrics-adapter"), "{text}");
    let (_, values) = k
        .get("/api/v1/namespaces/default/pods/metrics/metrics")
        .await;
    let series = values["items"].as_array().unwrap().len();
    assert_eq!(
        field(&text, "Series"),
        Some(series.to_string().as_str()),
        "{text}\n{values}"
    );
}
