//! The command table: which commands a replica may answer, and which ones change the state of
//! the connection they arrive on (and so must stay on the master, or be mirrored to the replica
//! connection, or switch the session to a raw pipe).
//!
//! Anything not listed is a write (or an admin command) and goes to the master: an unknown
//! command reaches the master and its own error comes back verbatim.

/// What the ambassador does with one command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Read-only: a healthy replica may answer it.
    Read,
    /// Everything else: the master.
    Write,
    /// `SELECT`, `AUTH`, `HELLO`: sent to the master and mirrored on the replica connection so
    /// both answer in the same database, protocol and identity.
    SessionState,
    /// `MULTI`: the master until `EXEC`/`DISCARD`.
    Multi,
    /// `EXEC`/`DISCARD`: end a transaction (and a `WATCH`).
    EndTx,
    /// `WATCH`: reads go to the master until the transaction ends, so they see what it guards.
    Watch,
    /// `UNWATCH`.
    Unwatch,
    /// `SUBSCRIBE`, `PSUBSCRIBE`, `SSUBSCRIBE`, `MONITOR`, `CLIENT TRACKING ON`: the master
    /// sends unsolicited messages, so the session becomes a raw pipe to it.
    Pipe,
    /// `CLIENT REPLY`: would break matching replies to commands; refused.
    Refused,
    /// `QUIT`: answered `+OK` by the ambassador, which then closes.
    Quit,
    /// `RESET`: the master, and the session's mirrored state is forgotten.
    Reset,
}

/// Commands a replica can answer exactly as the master would (Redis's `readonly` flag).
const READ_ONLY: &[&str] = &[
    "GET",
    "MGET",
    "STRLEN",
    "GETRANGE",
    "SUBSTR",
    "EXISTS",
    "TYPE",
    "TTL",
    "PTTL",
    "EXPIRETIME",
    "PEXPIRETIME",
    "HGET",
    "HMGET",
    "HGETALL",
    "HKEYS",
    "HVALS",
    "HLEN",
    "HEXISTS",
    "HSTRLEN",
    "HRANDFIELD",
    "HSCAN",
    "LRANGE",
    "LLEN",
    "LINDEX",
    "LPOS",
    "SMEMBERS",
    "SISMEMBER",
    "SMISMEMBER",
    "SCARD",
    "SRANDMEMBER",
    "SSCAN",
    "SINTER",
    "SINTERCARD",
    "SUNION",
    "SDIFF",
    "ZRANGE",
    "ZRANGEBYSCORE",
    "ZREVRANGEBYSCORE",
    "ZRANGEBYLEX",
    "ZREVRANGEBYLEX",
    "ZREVRANGE",
    "ZCARD",
    "ZCOUNT",
    "ZLEXCOUNT",
    "ZSCORE",
    "ZMSCORE",
    "ZRANK",
    "ZREVRANK",
    "ZSCAN",
    "ZRANDMEMBER",
    "ZINTER",
    "ZUNION",
    "ZDIFF",
    "ZINTERCARD",
    "GETBIT",
    "BITCOUNT",
    "BITPOS",
    "BITFIELD_RO",
    "GEOPOS",
    "GEODIST",
    "GEOHASH",
    "GEOSEARCH",
    "GEORADIUS_RO",
    "GEORADIUSBYMEMBER_RO",
    "PFCOUNT",
    "XRANGE",
    "XREVRANGE",
    "XLEN",
    "XINFO",
    "XPENDING",
    "SCAN",
    "KEYS",
    "RANDOMKEY",
    "DBSIZE",
    "DUMP",
    "LCS",
    "SORT_RO",
    "EVAL_RO",
    "EVALSHA_RO",
    "FCALL_RO",
];

/// Classify a command from its name (any case) and its arguments after the name.
pub fn classify(name: &[u8], rest: &[&[u8]]) -> Class {
    let mut upper = [0u8; 24];
    if name.len() > upper.len() {
        return Class::Write;
    }
    for (d, s) in upper.iter_mut().zip(name) {
        *d = s.to_ascii_uppercase();
    }
    let name = &upper[..name.len()];
    let arg = |i: usize| -> Vec<u8> {
        rest.get(i)
            .map(|a| a.to_ascii_uppercase())
            .unwrap_or_default()
    };
    match name {
        b"GET" | b"MGET" => Class::Read,
        b"SELECT" | b"AUTH" | b"HELLO" => Class::SessionState,
        b"MULTI" => Class::Multi,
        b"EXEC" | b"DISCARD" => Class::EndTx,
        b"WATCH" => Class::Watch,
        b"UNWATCH" => Class::Unwatch,
        b"SUBSCRIBE" | b"PSUBSCRIBE" | b"SSUBSCRIBE" | b"MONITOR" => Class::Pipe,
        b"QUIT" => Class::Quit,
        b"RESET" => Class::Reset,
        b"CLIENT" => match arg(0).as_slice() {
            b"REPLY" => Class::Refused,
            b"TRACKING" if arg(1) == b"ON" => Class::Pipe,
            _ => Class::Write,
        },
        // XREAD is read-only unless it blocks; a blocking read waits on the master, which is
        // where the data it waits for is written.
        b"XREAD" => {
            if rest.iter().any(|a| a.eq_ignore_ascii_case(b"BLOCK")) {
                Class::Write
            } else {
                Class::Read
            }
        }
        _ => {
            // Table lookup, names are ASCII upper case.
            if READ_ONLY.iter().any(|c| c.as_bytes() == name) {
                Class::Read
            } else {
                Class::Write
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies() {
        assert_eq!(classify(b"get", &[b"k"]), Class::Read);
        assert_eq!(classify(b"ZRangeByScore", &[]), Class::Read);
        assert_eq!(classify(b"SET", &[b"k", b"v"]), Class::Write);
        assert_eq!(classify(b"EVAL", &[]), Class::Write);
        assert_eq!(classify(b"EVAL_RO", &[]), Class::Read);
        assert_eq!(classify(b"BLPOP", &[b"q", b"0"]), Class::Write);
        assert_eq!(classify(b"XREAD", &[b"STREAMS", b"s", b"0"]), Class::Read);
        assert_eq!(
            classify(b"xread", &[b"block", b"0", b"STREAMS", b"s", b"$"]),
            Class::Write
        );
        assert_eq!(classify(b"client", &[b"reply", b"off"]), Class::Refused);
        assert_eq!(classify(b"CLIENT", &[b"tracking", b"on"]), Class::Pipe);
        assert_eq!(classify(b"CLIENT", &[b"SETNAME", b"x"]), Class::Write);
        assert_eq!(classify(b"subscribe", &[b"c"]), Class::Pipe);
        assert_eq!(classify(b"select", &[b"1"]), Class::SessionState);
        assert_eq!(
            classify(b"NOSUCHCOMMANDATALLREALLYLONGNAME", &[]),
            Class::Write
        );
    }
}
