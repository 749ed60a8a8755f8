#!/usr/bin/env bash
# build-guests.sh — rebuild Kapsel's WASM guests from source.
#
# Usage:
#   scripts/build-guests.sh                 build the small WASI preview-1 modules (Rust, committed .wasm)
#   scripts/build-guests.sh --components    also build the WASI 0.2 components (componentize-py, ~18 MB each,
#                                           git-ignored; ~10-15 s each)
#   scripts/build-guests.sh --components-only            only the components
#   scripts/build-guests.sh --component-if-missing DIR|DIR/app.wasm
#                                           build just the component in DIR (from DIR/app.py) unless
#                                           DIR/app.wasm exists and is newer than app.py; prints the .wasm path.
#                                           Used by tests / `kapsel up` when e.g. sample-pods/http-server/app.wasm
#                                           is absent.
#
# Preview-1 guests: every *.rs under sample-pods/ and tests/fixtures/ is a
# standalone, dependency-free program; X.rs -> X.wasm beside it. Uses rustup's `wasm32-wasip1` target when
# installed, else Debian's rustc 1.63 (/usr/bin/rustc, `apt-get install rustc libstd-rust-dev-wasm32`) with
# `wasm32-wasi`. Keep the sources compatible with Rust 1.63 (no let-else etc.).
# Components: every app.py under sample-pods/ and tests/fixtures/ -> app.wasm, built with
#   componentize-py -d <wasmtime-wasi-48 src/p2/wit> -w wasi:cli/command@<ver> componentize app -o app.wasm
# The WIT dir comes from the wasmtime-wasi 48 crate source in ~/.cargo/registry (run `cargo fetch` if absent).
# .wat fixtures need no build: wasmtime compiles them directly.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

log() { printf '[build-guests] %s\n' "$*" >&2; }
die() { printf '[build-guests] error: %s\n' "$*" >&2; exit 1; }

# ---------------------------------------------------------------- preview-1 (Rust) modules
RUSTC=()
pick_rustc() {
    if command -v rustup >/dev/null 2>&1 && rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip1; then
        RUSTC=(rustc --edition 2021 --target wasm32-wasip1)
    elif [ -x /usr/bin/rustc ] && [ -d /usr/lib/rustlib/wasm32-wasi ]; then
        RUSTC=(/usr/bin/rustc --edition 2021 --target wasm32-wasi)
    else
        die "no Rust wasm32-wasip1/wasm32-wasi toolchain: run scripts/install-deps.sh (needs rustc libstd-rust-dev-wasm32)"
    fi
}

build_p1() {
    pick_rustc
    local n=0 src out
    while IFS= read -r src; do
        out="${src%.rs}.wasm"
        "${RUSTC[@]}" -C opt-level=s -C strip=symbols "$src" -o "$out"
        chmod 644 "$out"
        log "built ${out#"$ROOT"/} ($(stat -c %s "$out") bytes)"
        n=$((n + 1))
    done < <(find sample-pods tests/fixtures -name '*.rs' -type f | sort)
    log "$n preview-1 module(s) built with ${RUSTC[0]}"
}

# ---------------------------------------------------------------- WASI 0.2 components (Python)
WIT_DIR=""
WASI_CLI_VER=""
find_wit() {
    [ -n "$WIT_DIR" ] && return 0
    local cargo_home="${CARGO_HOME:-$HOME/.cargo}" d
    d="$(ls -d "$cargo_home"/registry/src/*/wasmtime-wasi-48.*/src/p2/wit 2>/dev/null | sort -V | tail -n1 || true)"
    if [ -z "$d" ]; then
        log "wasmtime-wasi 48 source not in $cargo_home/registry; running cargo fetch"
        cargo fetch --manifest-path "$ROOT/Cargo.toml" >/dev/null 2>&1 || die "cargo fetch failed"
        d="$(ls -d "$cargo_home"/registry/src/*/wasmtime-wasi-48.*/src/p2/wit 2>/dev/null | sort -V | tail -n1 || true)"
    fi
    [ -n "$d" ] || die "no wasmtime-wasi-48.*/src/p2/wit under $cargo_home/registry/src"
    WASI_CLI_VER="$(sed -n 's/^package wasi:cli@\([0-9.]*\);.*/\1/p' "$d/deps/cli.wit" | head -n1)"
    [ -n "$WASI_CLI_VER" ] || die "cannot read the wasi:cli version from $d/deps/cli.wit"
    WIT_DIR="$d"
}

build_component() {   # $1 = directory holding app.py
    local dir="$1"
    [ -f "$dir/app.py" ] || die "$dir/app.py not found"
    command -v componentize-py >/dev/null 2>&1 || die "componentize-py missing: pip install componentize-py"
    find_wit
    log "componentizing ${dir#"$ROOT"/}/app.py (wasi:cli/command@$WASI_CLI_VER)..."
    (cd "$dir" && componentize-py -d "$WIT_DIR" -w "wasi:cli/command@$WASI_CLI_VER" componentize app -o app.wasm.tmp >/dev/null \
        && mv -f app.wasm.tmp app.wasm && rm -rf __pycache__) || { rm -f "$dir/app.wasm.tmp"; die "componentize-py failed for $dir"; }
    log "built ${dir#"$ROOT"/}/app.wasm ($(stat -c %s "$dir/app.wasm") bytes)"
}

build_components() {
    local app
    while IFS= read -r app; do
        build_component "$(dirname "$app")"
    done < <(find sample-pods tests/fixtures -name app.py -type f | sort)
    # The redis-py sample bundles a PyPI package, so it has its own build script.
    local ra="$ROOT/sample-pods/redis-app"
    if [ ! -f "$ra/app.wasm" ] || [ "$ra/redis_app.py" -nt "$ra/app.wasm" ] || [ "$ra/ssl_shim.py" -nt "$ra/app.wasm" ]; then
        "$ra/build.sh"
    else
        log "sample-pods/redis-app/app.wasm is up to date"
    fi
}

component_if_missing() {   # $1 = component dir or its app.wasm path; prints the absolute .wasm path
    local target="$1" dir
    case "$target" in
        *.wasm) dir="$(dirname "$target")" ;;
        *) dir="$target" ;;
    esac
    dir="$(cd "$dir" && pwd)" || die "no such directory: $target"
    if [ ! -f "$dir/app.wasm" ] || [ "$dir/app.py" -nt "$dir/app.wasm" ]; then
        # serialize concurrent callers (parallel tests) on a lock file
        exec 9>"$dir/.build.lock"
        flock 9
        if [ ! -f "$dir/app.wasm" ] || [ "$dir/app.py" -nt "$dir/app.wasm" ]; then
            build_component "$dir"
        fi
        flock -u 9
    fi
    printf '%s\n' "$dir/app.wasm"
}

case "${1:-}" in
    "") build_p1 ;;
    --components) build_p1; build_components ;;
    --components-only) build_components ;;
    --component-if-missing)
        [ $# -eq 2 ] || die "usage: $0 --component-if-missing DIR|DIR/app.wasm"
        component_if_missing "$2" ;;
    -h|--help) sed -n '2,20p' "$0" ;;
    *) die "unknown argument: $1 (see --help)" ;;
esac
