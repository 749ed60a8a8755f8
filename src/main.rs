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
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("kapsel")
        .build()
        .expect("tokio runtime");
    let code = rt.block_on(async {
        match kapsel::cli::run(cli).await {
            Ok(code) => code,
            Err(e) => {
                eprintln!("error: {}", format!("{e:#}").replace('\n', " "));
                1
            }
        }
    });
    rt.shutdown_timeout(std::time::Duration::from_secs(2));
    std::process::exit(code);
}
