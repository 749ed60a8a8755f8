//! RESP2/RESP3 framing for the ambassador: finding where a frame ends without copying it
//! ([`scan_frame`]), splitting client requests into arguments ([`parse_request`], multibulk and
//! inline), encoding commands, and a small value parser for the ambassador's own health and
//! Sentinel queries ([`parse_value`]).
//!
//! The scanner counts outstanding elements instead of recursing, so a deeply nested reply cannot
//! blow the stack, and it never allocates from a claimed length: a bulk of `$1000000000` only
//! ever costs the bytes that actually arrived.

use std::ops::Range;

/// A protocol violation. The text follows Redis's own `Protocol error: ...` messages.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    #[error("Protocol error: invalid multibulk length")]
    MultibulkLength,
    #[error("Protocol error: invalid bulk length")]
    BulkLength,
    #[error("Protocol error: expected '$', got '{0}'")]
    ExpectedBulk(char),
    #[error("Protocol error: too big inline request")]
    InlineTooBig,
    #[error("Protocol error: unbalanced quotes in request")]
    UnbalancedQuotes,
    #[error("Protocol error: unexpected type byte '{0}'")]
    BadType(char),
    #[error("Protocol error: missing CRLF")]
    MissingCrlf,
    #[error("Protocol error: streamed RESP3 aggregates are not supported")]
    Streamed,
}

/// Limits applied to what clients send.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest bulk string (Redis's `proto-max-bulk-len`, 512 MiB).
    pub max_bulk: usize,
    /// Most arguments in one command.
    pub max_args: usize,
    /// Longest inline command line (Redis: 64 KiB).
    pub max_inline: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_bulk: 512 << 20,
            max_args: 1 << 20,
            max_inline: 64 << 10,
        }
    }
}

/// Position of the first `\r\n` at or after `from`, as the index of `\r`.
fn find_crlf(buf: &[u8], from: usize) -> Option<usize> {
    let mut i = from;
    while i < buf.len() {
        let p = memchr::memchr(b'\r', &buf[i..])? + i;
        if p + 1 >= buf.len() {
            return None;
        }
        if buf[p + 1] == b'\n' {
            return Some(p);
        }
        i = p + 1;
    }
    None
}

/// Parse a signed decimal line (`-1`, `42`).
fn parse_int(s: &[u8]) -> Option<i64> {
    let (neg, digits) = match s.first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    if digits.is_empty() || digits.len() > 18 {
        return None;
    }
    let mut v: i64 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return None;
        }
        v = v * 10 + (d - b'0') as i64;
    }
    Some(if neg { -v } else { v })
}

/// Length of the complete frame at the start of `buf` (RESP2 or RESP3), `Ok(None)` if more
/// bytes are needed. Used on upstream replies, so it accepts every RESP3 type.
pub fn scan_frame(buf: &[u8]) -> Result<Option<usize>, ProtoError> {
    let mut pos = 0usize;
    // Elements still to read, in pre-order: an aggregate of n adds n (maps 2n).
    let mut need: u64 = 1;
    while need > 0 {
        if pos >= buf.len() {
            return Ok(None);
        }
        let t = buf[pos];
        let Some(eol) = find_crlf(buf, pos + 1) else {
            return Ok(None);
        };
        let line = &buf[pos + 1..eol];
        let next = eol + 2;
        need -= 1;
        match t {
            b'+' | b'-' | b':' | b'_' | b',' | b'#' | b'(' => pos = next,
            b'$' | b'!' | b'=' => {
                if line == b"?" {
                    return Err(ProtoError::Streamed);
                }
                let n = parse_int(line).ok_or(ProtoError::BulkLength)?;
                if n < 0 {
                    pos = next; // RESP2 null bulk
                } else {
                    let end = next + n as usize + 2;
                    if end > buf.len() {
                        return Ok(None);
                    }
                    if &buf[end - 2..end] != b"\r\n" {
                        return Err(ProtoError::MissingCrlf);
                    }
                    pos = end;
                }
            }
            b'*' | b'~' | b'>' | b'%' | b'|' => {
                if line == b"?" {
                    return Err(ProtoError::Streamed);
                }
                let n = parse_int(line).ok_or(ProtoError::MultibulkLength)?;
                if n > 0 {
                    let n = n as u64;
                    need += match t {
                        b'%' => 2 * n,
                        // An attribute map precedes the value it describes.
                        b'|' => 2 * n + 1,
                        _ => n,
                    };
                } else if t == b'|' {
                    need += 1;
                }
                pos = next;
            }
            other => return Err(ProtoError::BadType(other as char)),
        }
    }
    Ok(Some(pos))
}

/// True if the frame at the start of `buf` is an error (`-` or RESP3 `!`).
pub fn is_error(frame: &[u8]) -> bool {
    matches!(frame.first(), Some(b'-') | Some(b'!'))
}

/// One parsed client request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Bytes the request occupies in the input buffer.
    pub consumed: usize,
    /// `true` for an inline (telnet-style) command, which must be re-encoded before forwarding.
    pub inline: bool,
}

/// Parse one client request at the start of `buf`, filling `args` with the byte ranges of its
/// arguments. `Ok(None)`: incomplete. An empty request (`*0`, blank inline line) yields
/// `consumed > 0` and no args; callers skip it as Redis does.
pub fn parse_request(
    buf: &[u8],
    limits: &Limits,
    args: &mut Vec<Range<usize>>,
) -> Result<Option<Request>, ProtoError> {
    args.clear();
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    if first != b'*' {
        return parse_inline(buf, limits, args);
    }
    let Some(eol) = find_crlf(buf, 1) else {
        if buf.len() > 32 {
            return Err(ProtoError::MultibulkLength);
        }
        return Ok(None);
    };
    let n = parse_int(&buf[1..eol]).ok_or(ProtoError::MultibulkLength)?;
    if n > limits.max_args as i64 {
        return Err(ProtoError::MultibulkLength);
    }
    let mut pos = eol + 2;
    if n <= 0 {
        return Ok(Some(Request {
            consumed: pos,
            inline: false,
        }));
    }
    for _ in 0..n {
        if pos >= buf.len() {
            return Ok(None);
        }
        if buf[pos] != b'$' {
            return Err(ProtoError::ExpectedBulk(buf[pos] as char));
        }
        let Some(eol) = find_crlf(buf, pos + 1) else {
            if buf.len() - pos > 32 {
                return Err(ProtoError::BulkLength);
            }
            return Ok(None);
        };
        let len = parse_int(&buf[pos + 1..eol]).ok_or(ProtoError::BulkLength)?;
        if len < 0 || len as u64 > limits.max_bulk as u64 {
            return Err(ProtoError::BulkLength);
        }
        let start = eol + 2;
        let end = start + len as usize;
        if end + 2 > buf.len() {
            return Ok(None);
        }
        if &buf[end..end + 2] != b"\r\n" {
            return Err(ProtoError::MissingCrlf);
        }
        args.push(start..end);
        pos = end + 2;
    }
    Ok(Some(Request {
        consumed: pos,
        inline: false,
    }))
}

fn parse_inline(
    buf: &[u8],
    limits: &Limits,
    args: &mut Vec<Range<usize>>,
) -> Result<Option<Request>, ProtoError> {
    let Some(nl) = memchr::memchr(b'\n', buf) else {
        if buf.len() > limits.max_inline {
            return Err(ProtoError::InlineTooBig);
        }
        return Ok(None);
    };
    if nl > limits.max_inline {
        return Err(ProtoError::InlineTooBig);
    }
    let line_end = if nl > 0 && buf[nl - 1] == b'\r' {
        nl - 1
    } else {
        nl
    };
    let mut i = 0;
    while i < line_end {
        while i < line_end && (buf[i] == b' ' || buf[i] == b'\t') {
            i += 1;
        }
        if i >= line_end {
            break;
        }
        if buf[i] == b'"' || buf[i] == b'\'' {
            // Quoted argument without escapes (the common case for inline use).
            let q = buf[i];
            let start = i + 1;
            let Some(close) = memchr::memchr(q, &buf[start..line_end]) else {
                return Err(ProtoError::UnbalancedQuotes);
            };
            args.push(start..start + close);
            i = start + close + 1;
        } else {
            let start = i;
            while i < line_end && buf[i] != b' ' && buf[i] != b'\t' {
                i += 1;
            }
            args.push(start..i);
        }
    }
    Ok(Some(Request {
        consumed: nl + 1,
        inline: true,
    }))
}

/// Append a multibulk encoding of `args` to `out`.
pub fn encode_command<A: AsRef<[u8]>>(out: &mut Vec<u8>, args: &[A]) {
    out.push(b'*');
    out.extend_from_slice(args.len().to_string().as_bytes());
    out.extend_from_slice(b"\r\n");
    for a in args {
        let a = a.as_ref();
        out.push(b'$');
        out.extend_from_slice(a.len().to_string().as_bytes());
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
}

/// An error reply line (`-ERR ...\r\n`); CR/LF in the message become spaces.
pub fn error_reply(msg: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(msg.len() + 3);
    v.push(b'-');
    v.extend(
        msg.bytes()
            .map(|b| if b == b'\r' || b == b'\n' { b' ' } else { b }),
    );
    v.extend_from_slice(b"\r\n");
    v
}

/// A decoded reply, for the ambassador's own small queries (INFO, SENTINEL, ROLE).
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Simple(String),
    Error(String),
    Int(i64),
    Bulk(Vec<u8>),
    Nil,
    Array(Vec<Value>),
}

impl Value {
    pub fn as_text(&self) -> Option<String> {
        match self {
            Value::Simple(s) => Some(s.clone()),
            Value::Bulk(b) => Some(String::from_utf8_lossy(b).into_owned()),
            Value::Int(i) => Some(i.to_string()),
            _ => None,
        }
    }
}

/// Decode one complete frame (RESP2, and RESP3 types mapped onto the RESP2 shapes).
pub fn parse_value(buf: &[u8]) -> Result<Option<(Value, usize)>, ProtoError> {
    let Some(len) = scan_frame(buf)? else {
        return Ok(None);
    };
    let mut pos = 0;
    let v = decode(buf, &mut pos)?;
    debug_assert_eq!(pos, len);
    Ok(Some((v, len)))
}

fn decode(buf: &[u8], pos: &mut usize) -> Result<Value, ProtoError> {
    let t = buf[*pos];
    let eol = find_crlf(buf, *pos + 1).ok_or(ProtoError::MissingCrlf)?;
    let line = &buf[*pos + 1..eol];
    *pos = eol + 2;
    let text = || String::from_utf8_lossy(line).into_owned();
    Ok(match t {
        b'+' | b',' | b'(' | b'#' => Value::Simple(text()),
        b'-' => Value::Error(text()),
        b':' => match parse_int(line) {
            Some(i) => Value::Int(i),
            None => Value::Simple(text()),
        },
        b'_' => Value::Nil,
        b'$' | b'!' | b'=' => {
            let n = parse_int(line).ok_or(ProtoError::BulkLength)?;
            if n < 0 {
                Value::Nil
            } else {
                let b = buf[*pos..*pos + n as usize].to_vec();
                *pos += n as usize + 2;
                if t == b'!' {
                    Value::Error(String::from_utf8_lossy(&b).into_owned())
                } else {
                    Value::Bulk(b)
                }
            }
        }
        b'*' | b'~' | b'>' | b'%' | b'|' => {
            let n = parse_int(line).ok_or(ProtoError::MultibulkLength)?;
            if n < 0 && t == b'|' {
                // No attributes: the annotated value follows (as the scanner counts it).
                return decode(buf, pos);
            }
            if n < 0 {
                return Ok(Value::Nil);
            }
            let n = if t == b'%' || t == b'|' { 2 * n } else { n } as usize;
            let mut items = Vec::with_capacity(n.min(1024));
            for _ in 0..n {
                items.push(decode(buf, pos)?);
            }
            if t == b'|' {
                // Skip the attribute, return the value it annotates.
                return decode(buf, pos);
            }
            Value::Array(items)
        }
        other => return Err(ProtoError::BadType(other as char)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    type Parsed = Option<(Request, Vec<Vec<u8>>)>;

    fn req(s: &[u8]) -> Result<Parsed, ProtoError> {
        let mut args = Vec::new();
        Ok(parse_request(s, &Limits::default(), &mut args)?
            .map(|r| (r, args.iter().map(|a| s[a.clone()].to_vec()).collect())))
    }

    #[test]
    fn multibulk_and_inline_requests() {
        let (r, a) = req(b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\nrest").unwrap().unwrap();
        assert_eq!(r.consumed, 20);
        assert_eq!(a, vec![b"GET".to_vec(), b"k".to_vec()]);
        assert!(req(b"*2\r\n$3\r\nGET\r\n$1\r\n").unwrap().is_none());
        let (r, a) = req(b"set  k 'a b'\r\nx").unwrap().unwrap();
        assert!(r.inline);
        assert_eq!(r.consumed, 14);
        assert_eq!(a, vec![b"set".to_vec(), b"k".to_vec(), b"a b".to_vec()]);
        assert_eq!(req(b"*1\r\n:3\r\n"), Err(ProtoError::ExpectedBulk(':')));
        assert_eq!(
            req(b"*1\r\n$99999999999\r\n"),
            Err(ProtoError::BulkLength),
            "a bulk past 512 MiB is refused before any byte of it arrives"
        );
        assert_eq!(req(b"*x\r\n"), Err(ProtoError::MultibulkLength));
        assert_eq!(req(b"*1\r\n$1\r\nab\r\n"), Err(ProtoError::MissingCrlf));
        assert_eq!(req(b"GET \"k\r\n"), Err(ProtoError::UnbalancedQuotes));
    }

    #[test]
    fn scans_resp2_and_resp3_replies() {
        for (frame, len) in [
            (&b"+OK\r\n"[..], 5),
            (b"$-1\r\n", 5),
            (b"$3\r\nabc\r\n", 9),
            (b"*2\r\n$1\r\na\r\n:1\r\n", 15),
            (b"*-1\r\n", 5),
            (b"%1\r\n+a\r\n*1\r\n_\r\n", 15),
            (b"|1\r\n+k\r\n+v\r\n:5\r\n", 16),
            (b">2\r\n+m\r\n#t\r\n", 12),
            (b"*0\r\n", 4),
        ] {
            let mut buf = frame.to_vec();
            buf.extend_from_slice(b"+NEXT\r\n");
            assert_eq!(scan_frame(&buf), Ok(Some(len)), "{frame:?}");
            for cut in 0..len {
                assert_eq!(scan_frame(&frame[..cut]), Ok(None), "{frame:?} cut {cut}");
            }
        }
        assert!(scan_frame(b"?x\r\n").is_err());
    }

    #[test]
    fn decodes_values() {
        let (v, _) = parse_value(b"*2\r\n$2\r\nip\r\n:6379\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(
            v,
            Value::Array(vec![Value::Bulk(b"ip".to_vec()), Value::Int(6379)])
        );
        let mut out = Vec::new();
        encode_command(&mut out, &["INFO", "replication"]);
        assert_eq!(out, b"*2\r\n$4\r\nINFO\r\n$11\r\nreplication\r\n");
    }

    /// Property: random byte soup never panics either parser, and whatever the scanner
    /// accepts, it accepts at the same length when followed by more data.
    #[test]
    fn fuzz_never_panics() {
        let mut seed = 0x9e3779b97f4a7c15u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let alphabet = b"*$+-:_%>|~!=,#(\r\n0123456789-?ab ";
        let mut args = Vec::new();
        for _ in 0..200_000 {
            let len = (next() % 24) as usize;
            let buf: Vec<u8> = (0..len)
                .map(|_| alphabet[(next() % alphabet.len() as u64) as usize])
                .collect();
            let _ = parse_request(&buf, &Limits::default(), &mut args);
            if let Ok(Some(n)) = scan_frame(&buf) {
                let mut more = buf.clone();
                more.extend_from_slice(b"+x\r\n");
                assert_eq!(scan_frame(&more), Ok(Some(n)));
                assert!(parse_value(&buf).unwrap().is_some());
            }
        }
    }
}
