//! (filled by the api hardening work)
