#!/usr/bin/env bash
# test.sh — the whole test suite, from a fresh machine: installs what tests need (idempotent),
# builds the WASM guests, then runs unit, integration and golden-file tests in release mode
# (wasmtime compiles guests much faster in a release build).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

echo "== installing test dependencies (idempotent)"
scripts/install-deps.sh

echo "== fetching crates"
cargo fetch --locked -q

echo "== building WASM guests (components are built once, then cached)"
scripts/build-guests.sh --components

echo "== cargo test --release"
cargo test --release --locked --no-fail-fast "$@"
