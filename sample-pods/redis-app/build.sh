#!/usr/bin/env bash
# build.sh — build sample-pods/redis-app/app.wasm: a WASI 0.2 component (wasi:cli/command) from
# redis_app.py + ssl_shim.py + the real redis-py from PyPI, via componentize-py.
#
# Usage: sample-pods/redis-app/build.sh        (REDIS_PY_VERSION=5.0.8 by default)
#
# redis-py is pip-installed (--no-deps, pure Python) into a temporary directory that is removed
# afterwards, so nothing is vendored in the tree. Set REDIS_PY_DIR=/some/dir to use an existing
# install (e.g. offline: pip install --target /some/dir redis==5.0.8 --no-deps) instead.
# The Python module is named redis_app.py (not app.py) on purpose: scripts/build-guests.sh
# --components builds every app.py without extra search paths, which would fail on `import redis`.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REDIS_PY_VERSION="${REDIS_PY_VERSION:-5.0.8}"
log() { printf '[redis-app] %s\n' "$*" >&2; }
die() { printf '[redis-app] error: %s\n' "$*" >&2; exit 1; }

command -v componentize-py >/dev/null 2>&1 || die "componentize-py missing: pip install componentize-py"

# Same WIT lookup as scripts/build-guests.sh (find_wit): wasmtime-wasi 48's p2 WIT from the cargo registry.
cargo_home="${CARGO_HOME:-$HOME/.cargo}"
WIT_DIR="$(ls -d "$cargo_home"/registry/src/*/wasmtime-wasi-48.*/src/p2/wit 2>/dev/null | sort -V | tail -n1 || true)"
[ -n "$WIT_DIR" ] || die "no wasmtime-wasi-48.*/src/p2/wit under $cargo_home/registry/src (run cargo fetch in the repo)"
WASI_CLI_VER="$(sed -n 's/^package wasi:cli@\([0-9.]*\);.*/\1/p' "$WIT_DIR/deps/cli.wit" | head -n1)"
[ -n "$WASI_CLI_VER" ] || die "cannot read the wasi:cli version from $WIT_DIR/deps/cli.wit"

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP" "$HERE/app.wasm.tmp" "$HERE/__pycache__"' EXIT

if [ -n "${REDIS_PY_DIR:-}" ]; then
    [ -d "$REDIS_PY_DIR/redis" ] || die "REDIS_PY_DIR=$REDIS_PY_DIR has no redis/ package"
    DEPS="$REDIS_PY_DIR"
else
    log "pip install redis==$REDIS_PY_VERSION (--no-deps) into $TMP/site"
    PIP_ROOT_USER_ACTION=ignore python3 -m pip install --quiet --disable-pip-version-check --no-deps --no-compile \
        --target "$TMP/site" "redis==$REDIS_PY_VERSION" || die "pip install redis==$REDIS_PY_VERSION failed"
    DEPS="$TMP/site"
fi

log "componentizing redis_app.py (wasi:cli/command@$WASI_CLI_VER, WIT $WIT_DIR)..."
cd "$HERE"
componentize-py -d "$WIT_DIR" -w "wasi:cli/command@$WASI_CLI_VER" \
    componentize -p "$HERE" -p "$DEPS" redis_app -o app.wasm.tmp >/dev/null \
    || die "componentize-py failed"
mv -f app.wasm.tmp app.wasm
log "built $HERE/app.wasm ($(stat -c %s app.wasm) bytes)"
