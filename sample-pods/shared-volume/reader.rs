//! reader — waits until the writer container creates /data/done (polling every
//! 100 ms, giving up after TIMEOUT_SECS, default 30), then prints /data/messages.txt.
use std::time::{Duration, Instant};

fn main() {
    let timeout: u64 = std::env::var("TIMEOUT_SECS").ok().and_then(|v| v.parse().ok()).unwrap_or(30);
    let start = Instant::now();
    println!("reader: waiting for /data/done");
    while std::fs::metadata("/data/done").is_err() {
        if start.elapsed() > Duration::from_secs(timeout) {
            eprintln!("reader: timed out after {}s waiting for /data/done", timeout);
            std::process::exit(1);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    match std::fs::read_to_string("/data/messages.txt") {
        Ok(text) => {
            println!("reader: /data/messages.txt contains:");
            print!("{}", text);
        }
        Err(e) => {
            eprintln!("reader: cannot read /data/messages.txt: {}", e);
            std::process::exit(1);
        }
    }
}
