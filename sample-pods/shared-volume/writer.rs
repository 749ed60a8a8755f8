//! writer — appends a few lines to /data/messages.txt (an emptyDir shared with the
//! reader container), sleeping briefly between lines, then creates /data/done.
use std::fs::OpenOptions;
use std::io::Write;
use std::time::Duration;

fn main() {
    let count: u32 = std::env::var("COUNT").ok().and_then(|v| v.parse().ok()).unwrap_or(5);
    let mut file = match OpenOptions::new().create(true).append(true).open("/data/messages.txt") {
        Ok(f) => f,
        Err(e) => {
            eprintln!("writer: cannot open /data/messages.txt: {}", e);
            std::process::exit(1);
        }
    };
    for i in 1..=count {
        let line = format!("message {} from writer", i);
        if let Err(e) = writeln!(file, "{}", line) {
            eprintln!("writer: write failed: {}", e);
            std::process::exit(1);
        }
        let _ = file.flush();
        println!("writer: wrote \"{}\"", line);
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(file);
    if let Err(e) = std::fs::write("/data/done", b"done\n") {
        eprintln!("writer: cannot create /data/done: {}", e);
        std::process::exit(1);
    }
    println!("writer: done");
}
