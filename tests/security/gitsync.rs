//! (filled by the gitsync hardening work)
