//! StatsD and DogStatsD line parsing: `name:value|type[|@rate][|#tag:v,tag2][|c:id][|T123]`,
//! several metrics per datagram separated by newlines, and the old multi-value form
//! `name:v1|c:v2|ms`. Malformed lines are an error value the caller counts; nothing panics.

/// A StatsD metric type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    /// `ms` timers, `h` histograms and `d` distributions: observations.
    Timer,
    Set,
}

/// One parsed sample.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample<'a> {
    pub name: &'a str,
    pub kind: Kind,
    pub value: f64,
    /// `+3`/`-3` on a gauge: relative.
    pub relative: bool,
    /// For sets, the member as sent.
    pub member: &'a str,
    pub rate: f64,
    /// DogStatsD `#k:v` tags (a tag without `:` has an empty value).
    pub tags: Vec<(&'a str, &'a str)>,
    /// Timers are in milliseconds on the wire; exposed in seconds.
    pub millis: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LineError {
    #[error("no ':' between name and value")]
    NoValue,
    #[error("empty metric name")]
    EmptyName,
    #[error("no '|type'")]
    NoType,
    #[error("unknown type {0:?}")]
    BadType(String),
    #[error("invalid value {0:?}")]
    BadValue(String),
    #[error("invalid sample rate {0:?}")]
    BadRate(String),
    #[error("not UTF-8")]
    NotUtf8,
}

/// Parse one line (without the trailing newline) into `out`, appending one sample per value.
pub fn parse_line<'a>(line: &'a str, out: &mut Vec<Sample<'a>>) -> Result<(), LineError> {
    let line = line.trim_end_matches('\r');
    let (name, rest) = line.split_once(':').ok_or(LineError::NoValue)?;
    let name = name.trim();
    if name.is_empty() {
        return Err(LineError::EmptyName);
    }
    // Multi-value: `a:1|c:2|c` — components separated by ':' after a type. Split the rest
    // into value groups: each group is `value|type[|...]`, a new group starts after a type
    // section when a ':' follows. DogStatsD tags contain ':' too, so only split on ':' that
    // does not follow a `|#` section.
    let mut groups: Vec<&str> = Vec::new();
    let mut start = 0;
    let bytes = rest.as_bytes();
    // Sections after the value: 1 is the type; a ':' there starts the next value. Later
    // sections (`@rate`, `#tags`, DogStatsD `c:container`) may contain ':' themselves.
    let mut section = 0;
    for (i, &b) in bytes.iter().enumerate() {
        match b {
            b'|' => section += 1,
            b':' if section == 1 => {
                groups.push(&rest[start..i]);
                start = i + 1;
                section = 0;
            }
            _ => {}
        }
    }
    groups.push(&rest[start..]);
    let before = out.len();
    for g in groups {
        match parse_group(name, g) {
            Ok(s) => out.push(s),
            Err(e) => {
                out.truncate(before);
                return Err(e);
            }
        }
    }
    Ok(())
}

fn parse_group<'a>(name: &'a str, g: &'a str) -> Result<Sample<'a>, LineError> {
    let mut parts = g.split('|');
    let value = parts.next().unwrap_or("").trim();
    let ty = parts.next().ok_or(LineError::NoType)?.trim();
    let kind = match ty {
        "c" => Kind::Counter,
        "g" => Kind::Gauge,
        "ms" | "h" | "d" => Kind::Timer,
        "s" => Kind::Set,
        other => return Err(LineError::BadType(other.to_string())),
    };
    let mut rate = 1.0;
    let mut tags = Vec::new();
    for p in parts {
        if let Some(r) = p.strip_prefix('@') {
            rate = r
                .parse::<f64>()
                .ok()
                .filter(|r| *r > 0.0 && *r <= 1.0)
                .ok_or_else(|| LineError::BadRate(r.to_string()))?;
        } else if let Some(t) = p.strip_prefix('#') {
            for tag in t.split(',').filter(|t| !t.is_empty()) {
                match tag.split_once(':') {
                    Some((k, v)) => tags.push((k, v)),
                    None => tags.push((tag, "")),
                }
            }
        }
        // `c:<container id>`, `T<unix ts>` and unknown extensions are ignored.
    }
    let (relative, num) = match (kind, value.as_bytes().first()) {
        (Kind::Gauge, Some(b'+')) | (Kind::Gauge, Some(b'-')) => (true, value),
        _ => (false, value),
    };
    let v = if kind == Kind::Set {
        0.0
    } else {
        num.parse::<f64>()
            .ok()
            .filter(|v| v.is_finite())
            .ok_or_else(|| LineError::BadValue(value.to_string()))?
    };
    if kind == Kind::Counter && v < 0.0 {
        return Err(LineError::BadValue(value.to_string()));
    }
    Ok(Sample {
        name,
        kind,
        value: v,
        relative,
        member: if kind == Kind::Set { value } else { "" },
        rate,
        tags,
        millis: ty == "ms",
    })
}

/// Escape a StatsD name into a Prometheus one as statsd_exporter does: every character but
/// `[A-Za-z0-9_]` becomes `_` (a run of `-` becomes one `_`), and a leading digit gets a `_`
/// in front: `a.b-c` → `a_b_c`, `foo--bar` → `foo_bar`, `9lives` → `_9lives`.
pub fn escape_name(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 1);
    if name.as_bytes().first().is_some_and(|b| b.is_ascii_digit()) {
        out.push('_');
    }
    let mut prev = '\0';
    for c in name.chars() {
        if c.is_ascii_alphanumeric() || c == '_' {
            out.push(c);
        } else if c == '-' && prev == '-' {
            continue;
        } else {
            out.push('_');
        }
        prev = c;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(l: &str) -> Sample<'_> {
        let mut v = Vec::new();
        parse_line(l, &mut v).unwrap();
        assert_eq!(v.len(), 1);
        v.pop().unwrap()
    }

    #[test]
    fn parses_statsd_and_dogstatsd() {
        let s = one("api.hits:3|c|@0.5");
        assert_eq!(
            (s.name, s.kind, s.value, s.rate),
            ("api.hits", Kind::Counter, 3.0, 0.5)
        );
        let s = one("queue.depth:-4|g");
        assert!(s.relative);
        assert_eq!(s.value, -4.0);
        let s = one("req.latency:12.5|ms|#route:/a,method:GET,canary");
        assert_eq!(s.kind, Kind::Timer);
        assert!(s.millis);
        assert_eq!(
            s.tags,
            vec![("route", "/a"), ("method", "GET"), ("canary", "")]
        );
        let s = one("users:alice|s");
        assert_eq!((s.kind, s.member), (Kind::Set, "alice"));
        let mut v = Vec::new();
        parse_line("multi:1|c:2|c", &mut v).unwrap();
        assert_eq!(v.len(), 2);
        assert_eq!(one("d.x:1|d|c:abc|T1700000000").kind, Kind::Timer);
    }

    #[test]
    fn rejects_malformed_lines() {
        let mut v = Vec::new();
        for bad in [
            "nocolon", ":1|c", "a:1", "a:x|c", "a:1|zz", "a:1|c|@2", "a:-1|c", "a:NaN|g",
        ] {
            assert!(parse_line(bad, &mut v).is_err(), "{bad}");
        }
        assert!(v.is_empty());
        assert_eq!(escape_name("a.b-c/d"), "a_b_c_d");
        assert_eq!(escape_name("9lives"), "_9lives");
        assert_eq!(escape_name("foo--bar.c"), "foo_bar_c");
        assert_eq!(escape_name("a.-b:c"), "a__b_c");
    }

    /// Property: arbitrary input never panics, and accepted lines yield finite values.
    #[test]
    fn fuzz_never_panics() {
        let mut seed = 0x2545f4914f6cdd1du64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let alphabet = "ab.:|#@,cgmshd0123456789-+.eE\u{e9} ";
        let chars: Vec<char> = alphabet.chars().collect();
        for _ in 0..200_000 {
            let mut out = Vec::new();
            let len = (next() % 20) as usize;
            let s: String = (0..len)
                .map(|_| chars[(next() % chars.len() as u64) as usize])
                .collect();
            if parse_line(&s, &mut out).is_ok() {
                assert!(out.iter().all(|x| x.value.is_finite() && x.rate > 0.0));
            }
        }
    }
}
