//! (filled by the churn hardening work)
