//! (filled by the controlplane hardening work)
