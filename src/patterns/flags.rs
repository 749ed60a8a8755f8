//! One flag parser for the built-in pattern components (git-sync, the Redis ambassador, the
//! metrics adapter): each component declares its configuration as a `clap::Parser` struct, and
//! [`parse`] reads it from the container's `args` and `env` so `--help`, `--flag=value`,
//! `--flag value`, boolean forms, durations and the `GITSYNC_*` / `KAPSEL_*` variables behave
//! the same in every built-in, with clap's error wording.
//!
//! The built-ins run inside the Kapsel process, so their environment is the container spec's
//! `env`, not the process environment: clap's own `env` lookup would read the node's variables.
//! [`parse`] therefore reads each argument's declared `env = "NAME"` from the spec's `env` and
//! turns it into a flag placed before the explicit ones; a flag given explicitly wins over its
//! variable (for repeatable flags, the variable is ignored once the flag appears). clap's own
//! lookup is switched off (the node's variables never reach a built-in, nor its `--help`,
//! which names each variable without a value).
//!
//! Conventions for the config structs:
//! - booleans are written so that `--flag`, `--flag=true` and `--flag=false` all work (and so
//!   that a variable's `true`/`false` maps onto them): use [`bool_flag`] as the value parser with
//!   `num_args = 0..=1, default_missing_value = "true", action = ArgAction::Set`;
//! - durations use [`duration`] (humantime's `1m30s`, `500ms`, plus Go's fractional `1.5s`).

/// Why a built-in's flags were not accepted.
#[derive(Debug, thiserror::Error)]
pub enum FlagError {
    /// `--help` (or `-h`) was given: the text to print to the container's log; the container
    /// then exits 0 without starting.
    #[error("{0}")]
    Help(String),
    /// A flag or variable is unknown, missing or malformed; the message is clap's, one line,
    /// naming the flag (and the variable when the value came from one).
    #[error("{component}: {message}")]
    Invalid { component: String, message: String },
}

/// Parse a built-in's configuration `T` from the container's `args` and `env`.
pub fn parse<T: clap::Parser>(
    component: &'static str,
    args: &[String],
    env: &[(String, String)],
) -> Result<T, FlagError> {
    let cmd = T::command()
        .name(component)
        .bin_name(component)
        .no_binary_name(true)
        .args_override_self(true);
    // Each argument's variable, read from `env` below; clap read the node's own environment
    // into the arguments when they were built, so that is cleared.
    let vars: Vec<(String, String)> = cmd
        .get_arguments()
        .filter_map(|a| {
            Some((
                a.get_long()?.to_string(),
                a.get_env()?.to_str()?.to_string(),
            ))
        })
        .collect();
    let mut cmd = cmd.mut_args(|a| match a.get_env().and_then(|v| v.to_str()) {
        Some(var) => {
            let var = var.to_string();
            let help = a.get_help().map(|h| h.to_string()).unwrap_or_default();
            let long_help = a.get_long_help().map(|h| h.to_string());
            let a = a.env(None::<&str>).help(format!("{help} [env: {var}]"));
            match long_help {
                Some(l) => a.long_help(format!("{l} [env: {var}]")),
                None => a,
            }
        }
        None => a,
    });
    let mut argv: Vec<String> = Vec::new();
    // Which variable each synthesized flag came from, to name it in errors.
    let mut from_env: Vec<(String, String)> = Vec::new();
    for (long, var) in &vars {
        let (long, var) = (long.as_str(), var.as_str());
        let given = args.iter().any(|a| {
            a.strip_prefix("--")
                .and_then(|rest| rest.strip_prefix(long))
                .is_some_and(|tail| tail.is_empty() || tail.starts_with('='))
        });
        if given {
            continue;
        }
        // The last definition of a variable wins, as in a process environment.
        if let Some((_, value)) = env.iter().rev().find(|(k, _)| k == var) {
            argv.push(format!("--{long}={value}"));
            from_env.push((long.to_string(), var.to_string()));
        }
    }
    argv.extend(args.iter().cloned());
    let invalid = |e: clap::Error| {
        let text = e.render().to_string();
        let mut message = text
            .lines()
            .next()
            .unwrap_or_default()
            .trim_start_matches("error: ")
            .to_string();
        if let Some((long, var)) = from_env
            .iter()
            .find(|(long, _)| message.contains(&format!("--{long}")))
        {
            message.push_str(&format!(
                " (from the environment variable {var} for --{long})"
            ));
        }
        FlagError::Invalid {
            component: component.to_string(),
            message,
        }
    };
    let matches = match cmd.try_get_matches_from_mut(argv) {
        Ok(m) => m,
        Err(e)
            if matches!(
                e.kind(),
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion
            ) =>
        {
            return Err(FlagError::Help(e.render().to_string()));
        }
        Err(e) => return Err(invalid(e)),
    };
    T::from_arg_matches(&matches).map_err(invalid)
}

/// Value parser for boolean flags: `true/false`, `1/0`, `yes/no`, `on/off` (any case).
pub fn bool_flag(s: &str) -> Result<bool, String> {
    match s.to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" | "y" | "t" => Ok(true),
        "false" | "0" | "no" | "off" | "n" | "f" => Ok(false),
        _ => Err(format!("`{s}` is not a boolean (true or false)")),
    }
}

/// Value parser for listen addresses, shared by the built-ins: `:9102` (every interface, IPv4),
/// `127.0.0.1:9102`, `[::1]:9102`, `[::]:9102`. Only IP literals: a listen address names an
/// interface of the pod, never a host to resolve.
pub fn listen_addr(s: &str) -> Result<std::net::SocketAddr, String> {
    let t = s.trim();
    let hint = "use [host]:port, e.g. :9102, 127.0.0.1:9102 or [::1]:9102";
    let full = match t.strip_prefix(':') {
        Some(port) => format!("0.0.0.0:{port}"),
        None => t.to_string(),
    };
    if !full.contains(':') {
        return Err(format!("`{s}` has no port ({hint})"));
    }
    full.parse()
        .map_err(|_| format!("`{s}` is not an IP address and port ({hint})"))
}

/// Value parser for durations: humantime's forms (`30s`, `1m30s`, `500ms`, `2h 5m`) and Go's
/// fractional ones (`1.5s`, `0.25m`), as git-sync and statsd_exporter users write them. A bare
/// `0` is zero.
pub fn duration(s: &str) -> Result<std::time::Duration, String> {
    let t = s.trim();
    if t == "0" {
        return Ok(std::time::Duration::ZERO);
    }
    if let Ok(d) = humantime::parse_duration(t) {
        return Ok(d);
    }
    // Go allows a fraction on every unit: `1.5s`, `2.5h`.
    let unit_start = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(|| format!("`{s}` has no unit (use e.g. 10s, 500ms, 1m30s)"))?;
    let (num, unit) = t.split_at(unit_start);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration (use e.g. 10s, 500ms, 1m30s)"))?;
    let secs = match unit {
        "ns" => n / 1e9,
        "us" | "µs" => n / 1e6,
        "ms" => n / 1e3,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => {
            return Err(format!(
                "`{s}` is not a duration (use e.g. 10s, 500ms, 1m30s)"
            ))
        }
    };
    std::time::Duration::try_from_secs_f64(secs).map_err(|e| format!("`{s}`: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{ArgAction, Parser};
    use std::time::Duration;

    #[derive(Parser, Debug)]
    struct Demo {
        /// Where to listen.
        #[arg(long, env = "DEMO_LISTEN", default_value = ":7000")]
        listen: String,
        #[arg(long = "replica", env = "DEMO_REPLICA", value_delimiter = ',')]
        replicas: Vec<String>,
        #[arg(long, env = "DEMO_ONE_TIME", value_parser = bool_flag, num_args = 0..=1,
              default_missing_value = "true", action = ArgAction::Set, default_value = "false")]
        one_time: bool,
        #[arg(long, env = "DEMO_PERIOD", value_parser = duration, default_value = "10s")]
        period: Duration,
    }

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }
    fn e(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn both_flag_forms_booleans_durations_and_env() {
        let d: Demo = parse(
            "demo",
            &s(&["--listen", ":1", "--one-time", "--period=1m30s"]),
            &[],
        )
        .unwrap();
        assert_eq!(d.listen, ":1");
        assert!(d.one_time);
        assert_eq!(d.period, Duration::from_secs(90));
        let d: Demo = parse(
            "demo",
            &s(&["--one-time=false"]),
            &e(&[("DEMO_PERIOD", "1.5s"), ("DEMO_REPLICA", "a:1,b:2")]),
        )
        .unwrap();
        assert!(!d.one_time);
        assert_eq!(d.period, Duration::from_millis(1500));
        assert_eq!(d.replicas, vec!["a:1", "b:2"]);
    }

    #[test]
    fn flags_win_over_variables() {
        let d: Demo = parse(
            "demo",
            &s(&["--listen=:2", "--replica", "c:3"]),
            &e(&[("DEMO_LISTEN", ":9"), ("DEMO_REPLICA", "a:1")]),
        )
        .unwrap();
        assert_eq!(d.listen, ":2");
        assert_eq!(d.replicas, vec!["c:3"]);
        let d: Demo = parse("demo", &s(&["--listen=:2", "--listen=:3"]), &[]).unwrap();
        assert_eq!(d.listen, ":3");
    }

    #[test]
    fn errors_name_the_flag_and_the_variable() {
        let err = parse::<Demo>("demo", &s(&["--nope"]), &[]).unwrap_err();
        assert!(
            matches!(&err, FlagError::Invalid { message, .. } if message.contains("--nope")),
            "{err}"
        );
        let err = parse::<Demo>("demo", &[], &e(&[("DEMO_PERIOD", "soon")])).unwrap_err();
        let text = err.to_string();
        assert!(text.starts_with("demo: "), "{text}");
        assert!(
            text.contains("--period") && text.contains("DEMO_PERIOD"),
            "{text}"
        );
        let err = parse::<Demo>("demo", &s(&["--one-time=maybe"]), &[]).unwrap_err();
        assert!(err.to_string().contains("--one-time"), "{err}");
    }

    #[test]
    fn help_is_its_own_outcome() {
        match parse::<Demo>("demo", &s(&["--help"]), &[]) {
            Err(FlagError::Help(text)) => {
                assert!(
                    text.contains("--listen") && text.contains("DEMO_LISTEN"),
                    "{text}"
                )
            }
            other => panic!("expected help, got {other:?}"),
        }
    }

    #[derive(Parser, Debug)]
    struct NodeEnv {
        #[arg(long, env = "KAPSEL_FLAGS_TEST_ONLY_ON_THE_NODE")]
        secret: Option<String>,
    }

    #[test]
    fn the_nodes_own_environment_stays_out() {
        // Only this test reads or sets the variable.
        std::env::set_var("KAPSEL_FLAGS_TEST_ONLY_ON_THE_NODE", "node-value");
        let n: NodeEnv = parse("demo", &[], &[]).unwrap();
        assert_eq!(n.secret, None);
        let n: NodeEnv = parse(
            "demo",
            &[],
            &e(&[("KAPSEL_FLAGS_TEST_ONLY_ON_THE_NODE", "pod-value")]),
        )
        .unwrap();
        assert_eq!(n.secret.as_deref(), Some("pod-value"));
        match parse::<NodeEnv>("demo", &s(&["--help"]), &[]) {
            Err(FlagError::Help(text)) => {
                assert!(
                    text.contains("KAPSEL_FLAGS_TEST_ONLY_ON_THE_NODE"),
                    "{text}"
                );
                assert!(!text.contains("node-value"), "{text}");
            }
            other => panic!("expected help, got {other:?}"),
        }
    }

    #[test]
    fn listen_addresses() {
        assert_eq!(listen_addr(":9102").unwrap().to_string(), "0.0.0.0:9102");
        assert_eq!(
            listen_addr("127.0.0.1:9102").unwrap().to_string(),
            "127.0.0.1:9102"
        );
        assert_eq!(listen_addr("[::1]:9102").unwrap().to_string(), "[::1]:9102");
        assert!(listen_addr("9102").unwrap_err().contains("no port"));
        assert!(listen_addr("localhost:9102").is_err());
        assert!(listen_addr(":99999").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(duration("0").unwrap(), Duration::ZERO);
        assert_eq!(duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(duration("2h").unwrap(), Duration::from_secs(7200));
        assert_eq!(duration("0.5m").unwrap(), Duration::from_secs(30));
        assert!(duration("10").is_err());
        assert!(duration("ten seconds").is_err());
    }
}
