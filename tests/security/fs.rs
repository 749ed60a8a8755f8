//! (filled by the fs hardening work)
