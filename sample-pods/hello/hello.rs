//! hello — the smallest Kapsel WASM guest (WASI preview 1).
//! Prints a greeting built from the GREETING env var and its argv, then exits 0.
//! Build: scripts/build-guests.sh (or: rustc --edition 2021 --target wasm32-wasi -C opt-level=s -C strip=symbols hello.rs)
use std::io::Write;

fn main() {
    let greeting = std::env::var("GREETING").unwrap_or_else(|_| "Hello".to_string());
    let args: Vec<String> = std::env::args().skip(1).collect();
    let who = if args.is_empty() { "world".to_string() } else { args.join(" ") };
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{}, {}! (from a WASM container in a Kapsel pod)", greeting, who);
    let _ = writeln!(out, "argv: {:?}", std::env::args().collect::<Vec<_>>());
    let _ = out.flush();
}
