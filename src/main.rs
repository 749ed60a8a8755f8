//! The `kapsel` binary: parse the command line, run it, turn errors into one line on stderr.

use clap::Parser;

fn main() {
    let cli = kapsel::cli::Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("KAPSEL_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if matches!(cli.command, kapsel::cli::Command::Agent { .. }) {
        // A node process: few threads, few malloc arenas (see runtime::residency).
        kapsel::runtime::residency::limit_malloc_arenas();
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        rt.worker_threads(cores.min(kapsel::runtime::residency::AGENT_WORKER_THREADS));
    }
    let rt = rt
        .enable_all()
        .thread_name("kapsel")
        .build()
        .expect("tokio runtime");
    let code = rt.block_on(async {
        match kapsel::cli::run(cli).await {
            Ok(code) => code,
            Err(e) => {
                eprintln!("error: {}", one_line(&e));
                1
            }
        }
    });
    rt.shutdown_timeout(std::time::Duration::from_secs(2));
    std::process::exit(code);
}

/// The error and its causes on one line, each cause once: a layer whose message already
/// quotes its source (`#[error("{0}")]` over an io::Error) does not repeat it.
fn one_line(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let msg = cause.to_string();
        if msg.is_empty() || out.contains(&msg) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&msg);
    }
    out.replace('\n', " ")
}
