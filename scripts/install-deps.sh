#!/usr/bin/env bash
# install-deps.sh — install what Kapsel's guests, tests and benchmarks need on a fresh Debian 12 machine.
# Idempotent: installs only what is missing, and runs `apt-get update` only if an apt package is missing.
# Run as root (or with sudo available).
#   apt:  rustc lld-14 libstd-rust-dev-wasm32 (Debian's rustc 1.63 + wasm32-wasi std + the rust-lld it links with, for the preview-1 guests),
#         busybox-static (the test container image), hyperfine (benchmarks),
#         redis-server redis-tools redis-sentinel (ambassador tests), nutcracker (twemproxy, the ambassador's bench anchor),
#         prometheus (scrapes the metrics adapter in its test)
#   pip:  componentize-py (WASI 0.2 Python components)
#   docker image kapsel-test/busybox:1 (imported from busybox-static; skipped with a warning without docker)
set -euo pipefail

log()  { printf '[install-deps] %s\n' "$*"; }
warn() { printf '[install-deps] WARNING: %s\n' "$*" >&2; }
die()  { printf '[install-deps] error: %s\n' "$*" >&2; exit 1; }

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || die "run as root (or install sudo)"
    SUDO=(sudo)
fi

# ---------------------------------------------------------------- apt packages
APT_PKGS=(rustc lld-14 libstd-rust-dev-wasm32 busybox-static hyperfine time git python3 redis-server redis-tools redis-sentinel nutcracker prometheus)
missing=()
for p in "${APT_PKGS[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
        missing+=("$p")
    fi
done
if [ ${#missing[@]} -gt 0 ]; then
    log "installing apt packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt_log="$(mktemp)"
    if ! { "${SUDO[@]}" apt-get update -qq && "${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"; } >"$apt_log" 2>&1; then
        cat "$apt_log" >&2
        rm -f "$apt_log"
        die "apt-get failed (output above)"
    fi
    rm -f "$apt_log"
else
    log "apt packages present: ${APT_PKGS[*]}"
fi
[ -d /usr/lib/rustlib/wasm32-wasi ] || die "libstd-rust-dev-wasm32 installed but /usr/lib/rustlib/wasm32-wasi is missing"

# ---------------------------------------------------------------- componentize-py
if componentize-py --version >/dev/null 2>&1; then
    log "componentize-py present: $(componentize-py --version 2>/dev/null)"
else
    log "installing componentize-py (pip)"
    PIP=(python3 -m pip)
    "${PIP[@]}" --version >/dev/null 2>&1 || die "python3 -m pip not available (apt-get install python3-pip)"
    # Debian's system python is "externally managed" (PEP 668); a pyenv/venv python is not.
    pip_log="$(mktemp)"
    if ! "${PIP[@]}" install -q --disable-pip-version-check componentize-py >"$pip_log" 2>&1; then
        if grep -q externally-managed "$pip_log"; then
            "${PIP[@]}" install -q --disable-pip-version-check --break-system-packages componentize-py >"$pip_log" 2>&1 \
                || { cat "$pip_log" >&2; rm -f "$pip_log"; die "pip install componentize-py failed"; }
        else
            cat "$pip_log" >&2; rm -f "$pip_log"
            die "pip install componentize-py failed"
        fi
    fi
    rm -f "$pip_log"
    hash -r
    componentize-py --version >/dev/null 2>&1 \
        || die "componentize-py installed but not on PATH (check ~/.local/bin or your python's bin dir)"
    log "componentize-py installed: $(componentize-py --version 2>/dev/null)"
fi

# ---------------------------------------------------------------- docker test image
IMAGE=kapsel-test/busybox:1
if ! command -v docker >/dev/null 2>&1; then
    warn "docker CLI not found: skipping image $IMAGE (Docker-backed tests will be skipped or fail)"
elif ! docker info >/dev/null 2>&1; then
    warn "docker daemon unreachable: skipping image $IMAGE (Docker-backed tests will be skipped or fail)"
elif docker image inspect "$IMAGE" >/dev/null 2>&1; then
    log "docker image $IMAGE present"
else
    BUSYBOX=/bin/busybox
    [ -x "$BUSYBOX" ] || BUSYBOX="$(command -v busybox)" || die "busybox not found"
    file_out="$(file -b "$BUSYBOX" 2>/dev/null || true)"
    case "$file_out" in *dynamically*) warn "$BUSYBOX looks dynamically linked; the image may not run" ;; esac
    rootfs="$(mktemp -d)"
    trap 'rm -rf "$rootfs"' EXIT
    mkdir -p "$rootfs"/{bin,sbin,usr/bin,usr/sbin,etc,tmp,proc,sys,dev,root,data}
    chmod 1777 "$rootfs/tmp"
    cp "$BUSYBOX" "$rootfs/bin/busybox"
    # one symlink per applet; `busybox --list-full` gives install paths (bin/sh, usr/bin/wget, ...)
    n=0
    if "$BUSYBOX" --list-full >/dev/null 2>&1; then
        while IFS= read -r path; do
            [ "$path" = bin/busybox ] && continue
            mkdir -p "$rootfs/$(dirname "$path")"
            ln -sf /bin/busybox "$rootfs/$path"
            n=$((n + 1))
        done < <("$BUSYBOX" --list-full)
    fi
    # also every applet under /bin (what the brief's `busybox --list` gives), so PATH lookups always work
    while IFS= read -r applet; do
        [ "$applet" = busybox ] && continue
        [ -e "$rootfs/bin/$applet" ] || { ln -s busybox "$rootfs/bin/$applet"; n=$((n + 1)); }
    done < <("$BUSYBOX" --list)
    printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n' > "$rootfs/etc/passwd"
    printf 'root:x:0:\nnogroup:x:65534:\n' > "$rootfs/etc/group"
    log "importing docker image $IMAGE ($n applet links)"
    tar -C "$rootfs" -c . | docker import \
        -c 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        -c 'CMD ["/bin/sh"]' - "$IMAGE" >/dev/null
    rm -rf "$rootfs"
    trap - EXIT
    docker run --rm "$IMAGE" /bin/busybox true >/dev/null || die "image $IMAGE imported but does not run"
    docker run --rm "$IMAGE" true >/dev/null || die "image $IMAGE has no working applet symlinks"
    log "docker image $IMAGE ready"
fi

log "done"
