//! (filled by the wasm hardening work)
