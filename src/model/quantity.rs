//! Parsing Kubernetes resource quantities: `128Mi`, `1G`, `500m`, `0.5`, `2`.

/// Bytes of a memory quantity (`128Mi`, `1G`, `1e6`, `4096`).
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult): (&str, f64) = {
        const SUFFIXES: &[(&str, f64)] = &[
            ("Ki", 1024.0),
            ("Mi", 1024.0 * 1024.0),
            ("Gi", 1024.0 * 1024.0 * 1024.0),
            ("Ti", 1024.0 * 1024.0 * 1024.0 * 1024.0),
            ("k", 1e3),
            ("K", 1e3),
            ("M", 1e6),
            ("G", 1e9),
            ("T", 1e12),
        ];
        SUFFIXES
            .iter()
            .find_map(|(suf, m)| s.strip_suffix(suf).map(|n| (n, *m)))
            .unwrap_or((s, 1.0))
    };
    let v: f64 = num
        .parse()
        .map_err(|_| format!("invalid memory quantity {s:?} (examples: 64Mi, 1Gi, 500M)"))?;
    if !v.is_finite() || v < 0.0 {
        return Err(format!("invalid memory quantity {s:?}: must be >= 0"));
    }
    Ok((v * mult).round() as u64)
}

/// Millicores of a CPU quantity (`500m` → 500, `2` → 2000, `0.25` → 250).
pub fn parse_millicpu(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let err = || format!("invalid cpu quantity {s:?} (examples: 500m, 0.5, 2)");
    if let Some(m) = s.strip_suffix('m') {
        let v: u64 = m.parse().map_err(|_| err())?;
        return Ok(v);
    }
    let v: f64 = s.parse().map_err(|_| err())?;
    if !v.is_finite() || v < 0.0 {
        return Err(err());
    }
    Ok((v * 1000.0).round() as u64)
}

/// A byte count as a readable quantity (`64Mi`).
pub fn format_bytes(b: u64) -> String {
    const UNITS: &[(&str, u64)] = &[("Gi", 1 << 30), ("Mi", 1 << 20), ("Ki", 1 << 10)];
    for (u, m) in UNITS {
        if b >= *m && b.is_multiple_of(*m) {
            return format!("{}{}", b / m, u);
        }
    }
    b.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory() {
        assert_eq!(parse_bytes("64Mi").unwrap(), 64 << 20);
        assert_eq!(parse_bytes("1G").unwrap(), 1_000_000_000);
        assert_eq!(parse_bytes("4096").unwrap(), 4096);
        assert_eq!(parse_bytes("1.5Ki").unwrap(), 1536);
        assert!(parse_bytes("lots").is_err());
        assert!(parse_bytes("-1Mi").is_err());
        assert_eq!(format_bytes(64 << 20), "64Mi");
    }

    #[test]
    fn cpu() {
        assert_eq!(parse_millicpu("500m").unwrap(), 500);
        assert_eq!(parse_millicpu("2").unwrap(), 2000);
        assert_eq!(parse_millicpu("0.25").unwrap(), 250);
        assert!(parse_millicpu("fast").is_err());
    }
}
