//! git-sync vs plain git doing the same work, side by side in one run, on a repository with
//! 10,000 files: time and peak RSS (GNU time's %M, which covers the git children) of
//!   - the first sync: `kapsel git-sync --one-time` vs `git clone --depth 1`;
//!   - an incremental sync after a commit touching 100 files: `kapsel git-sync --one-time` on the
//!     same root vs `git fetch --depth 1` + `git worktree add` of the fetched commit.
//!
//! Run: `cargo bench --bench gitsync_sync` (BENCH_N runs per measurement, default 5).

use std::path::Path;
use std::process::Command;

fn run(dir: &Path, args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .current_dir(dir)
        .env("GIT_AUTHOR_NAME", "b")
        .env("GIT_AUTHOR_EMAIL", "b@example.com")
        .env("GIT_COMMITTER_NAME", "b")
        .env("GIT_COMMITTER_EMAIL", "b@example.com")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// (seconds, peak RSS in MiB) of a command, by GNU time.
fn timed(dir: &Path, args: &[&str]) -> (f64, f64) {
    let out = Command::new("/usr/bin/time")
        .args(["-f", "%e %M"])
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    let last = err.lines().last().unwrap();
    let mut it = last.split_whitespace();
    let secs: f64 = it.next().unwrap().parse().unwrap();
    let kib: f64 = it.next().unwrap().parse().unwrap();
    (secs, kib / 1024.0)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    let n: usize = std::env::var("BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let kapsel = env!("CARGO_BIN_EXE_kapsel");
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let bare = t.join("big.git");
    let work = t.join("work");
    std::fs::create_dir_all(&work).unwrap();
    run(
        t,
        &[
            "git",
            "init",
            "-q",
            "--bare",
            "-b",
            "main",
            bare.to_str().unwrap(),
        ],
    );
    run(&work, &["git", "init", "-q", "-b", "main"]);
    for d in 0..100 {
        let dir = work.join(format!("d{d}"));
        std::fs::create_dir_all(&dir).unwrap();
        for f in 0..100 {
            std::fs::write(
                dir.join(format!("f{f}.txt")),
                format!("file {d}/{f}\n{}\n", "x".repeat(200)),
            )
            .unwrap();
        }
    }
    run(&work, &["git", "add", "-A"]);
    run(&work, &["git", "commit", "-q", "-m", "10k files"]);
    run(
        &work,
        &[
            "git",
            "push",
            "-q",
            bare.to_str().unwrap(),
            "HEAD:refs/heads/main",
        ],
    );
    let url = format!("file://{}", bare.display());

    let (mut gs_first, mut gs_first_rss, mut git_first, mut git_first_rss) =
        (vec![], vec![], vec![], vec![]);
    let (mut gs_inc, mut gs_inc_rss, mut git_inc, mut git_inc_rss) =
        (vec![], vec![], vec![], vec![]);
    for i in 0..n {
        let root = t.join(format!("gs{i}"));
        let clone = t.join(format!("clone{i}"));
        let (s, m) = timed(
            t,
            &[
                kapsel,
                "git-sync",
                &format!("--repo={url}"),
                &format!("--root={}", root.display()),
                "--one-time",
                "--depth=1",
                "--link=site",
            ],
        );
        gs_first.push(s);
        gs_first_rss.push(m);
        let (s, m) = timed(
            t,
            &[
                "git",
                "clone",
                "-q",
                "--depth",
                "1",
                &url,
                clone.to_str().unwrap(),
            ],
        );
        git_first.push(s);
        git_first_rss.push(m);
        // A commit touching 100 files.
        for f in 0..100 {
            std::fs::write(
                work.join(format!("d{}/f{f}.txt", i % 100)),
                format!("changed {i}\n"),
            )
            .unwrap();
        }
        run(&work, &["git", "commit", "-q", "-am", "change"]);
        run(
            &work,
            &[
                "git",
                "push",
                "-q",
                bare.to_str().unwrap(),
                "HEAD:refs/heads/main",
            ],
        );
        let (s, m) = timed(
            t,
            &[
                kapsel,
                "git-sync",
                &format!("--repo={url}"),
                &format!("--root={}", root.display()),
                "--one-time",
                "--depth=1",
                "--link=site",
            ],
        );
        gs_inc.push(s);
        gs_inc_rss.push(m);
        let (s1, m1) = timed(
            &clone,
            &["git", "fetch", "-q", "--depth", "1", &url, "main"],
        );
        let (s2, m2) = timed(
            &clone,
            &[
                "git",
                "worktree",
                "add",
                "-q",
                "--detach",
                &format!("../wt{i}"),
                "FETCH_HEAD",
            ],
        );
        git_inc.push(s1 + s2);
        git_inc_rss.push(m1.max(m2));
    }
    println!("### git-sync on a 10,000-file repository ({n} runs, medians)\n");
    println!("| measurement | time | peak RSS | time vs git |");
    println!("|---|---|---|---|");
    let (a, b) = (median(gs_first), median(git_first));
    println!(
        "| first sync: `kapsel git-sync --one-time --depth=1` | {:.2} s | {:.1} MiB | {:.2}× |",
        a,
        median(gs_first_rss),
        a / b
    );
    println!(
        "| first sync: `git clone --depth 1` | {:.2} s | {:.1} MiB | 1.00× |",
        b,
        median(git_first_rss)
    );
    let (a, b) = (median(gs_inc), median(git_inc));
    println!("| incremental (100 files changed): `kapsel git-sync --one-time` | {:.2} s | {:.1} MiB | {:.2}× |", a, median(gs_inc_rss), a / b);
    println!(
        "| incremental: `git fetch --depth 1` + `git worktree add` | {:.2} s | {:.1} MiB | 1.00× |",
        b,
        median(git_inc_rss)
    );
}
