#!/usr/bin/env python3
"""check-guests.py — smoke-test the preview-1 guests and .wat fixtures outside Kapsel.

Needs the `wasmtime` PyPI package (`pip install wasmtime`; any recent version). Runs every p1 module with
WASI (argv, env, preopens) and checks exit codes and output. Components are not checked here: the C API
behind wasmtime-py cannot enable TCP (wasmtime-wasi's `allow_tcp` defaults to false), so they need a real
wasmtime host with `WasiCtxBuilder::inherit_network().allow_tcp(true)`.
Usage: python3 scripts/check-guests.py      (exit 0 = all good)
"""
import os
import sys
import tempfile
import threading
import time

import wasmtime
from wasmtime import Config, Engine, Linker, Module, Store, WasiConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAILED = []


def run(path, args=(), env=None, preopens=(), fuel=None, mem_limit=None):
    """Runs a p1 module; returns (exit_code or 'trap: ...', stdout, stderr)."""
    cfg = Config()
    if fuel:
        cfg.consume_fuel = True
    engine = Engine(cfg)
    full = os.path.join(ROOT, path)
    module = Module(engine, open(full).read()) if full.endswith(".wat") else Module.from_file(engine, full)
    linker = Linker(engine)
    linker.define_wasi()
    store = Store(engine)
    if fuel:
        store.set_fuel(fuel)
    if mem_limit:
        store.set_limits(memory_size=mem_limit)
    with tempfile.TemporaryDirectory() as tmp:
        out, err = os.path.join(tmp, "out"), os.path.join(tmp, "err")
        w = WasiConfig()
        w.argv = [os.path.basename(path)] + list(args)
        w.env = list((env or {}).items())
        for host, guest in preopens:
            w.preopen_dir(host, guest)
        w.stdout_file, w.stderr_file = out, err
        store.set_wasi(w)
        try:
            linker.instantiate(store, module).exports(store)["_start"](store)
            code = 0
        except wasmtime.ExitTrap as e:
            code = e.code
        except wasmtime.Trap as e:
            code = "trap: " + str(e).strip().splitlines()[-1].strip()
        except wasmtime.WasmtimeError as e:
            code = "trap: " + str(e).strip().splitlines()[-1].strip()
        return code, open(out).read(), open(err).read()


def check(name, got, want_code, want_out=None, want_err=None):
    code, out, err = got
    ok = (code == want_code if not isinstance(want_code, str) else str(code).find(want_code) >= 0)
    ok = ok and (want_out is None or want_out in out) and (want_err is None or want_err in err)
    print("{} {}: exit={!r} out={!r} err={!r}".format("ok  " if ok else "FAIL", name, code, out[:80], err[:80]))
    if not ok:
        FAILED.append(name)


def main():
    check("quick.wat", run("tests/fixtures/quick.wat"), 0, "ok\n")
    check("exit3.wat", run("tests/fixtures/exit3.wat"), 3)
    check("trap.wat", run("tests/fixtures/trap.wat"), "unreachable", "about to trap\n")
    check("membomb.wat (16 MiB limit)", run("tests/fixtures/membomb.wat", mem_limit=16 << 20), "unreachable")
    check("spin.wat (fuel)", run("tests/fixtures/spin.wat", fuel=5_000_000), "fuel")
    result = {}
    t = threading.Thread(target=lambda: result.update(r=run("tests/fixtures/sleep.wat")), daemon=True)
    t.start()
    time.sleep(1.0)
    print("{} sleep.wat: still sleeping after 1 s".format("ok  " if t.is_alive() else "FAIL"))
    if not t.is_alive():
        FAILED.append("sleep.wat")
    try:
        Module.from_file(Engine(), os.path.join(ROOT, "tests/fixtures/not-wasm.wasm"))
        FAILED.append("not-wasm.wasm")
        print("FAIL not-wasm.wasm compiled")
    except wasmtime.WasmtimeError:
        print("ok   not-wasm.wasm: rejected")

    check("hello", run("sample-pods/hello/hello.wasm", ["Kapsel", "user"], {"GREETING": "Howdy"}), 0,
          "Howdy, Kapsel user!")
    with tempfile.TemporaryDirectory() as data, tempfile.TemporaryDirectory() as other:
        p = [(data, "/data")]
        res = {}
        reader = threading.Thread(target=lambda: res.update(r=run("sample-pods/shared-volume/reader.wasm", preopens=p)))
        reader.start()
        check("shared-volume writer", run("sample-pods/shared-volume/writer.wasm", preopens=p), 0, "writer: done")
        reader.join(35)
        check("shared-volume reader", res.get("r", ("hung", "", "")), 0, "message 5 from writer")

        f = "tests/fixtures/files/files.wasm"
        check("files write", run(f, ["write", "/data/a.txt", "hello"], preopens=p), 0)
        check("files read", run(f, ["read", "/data/a.txt"], preopens=p), 0, "hello")
        check("files ls", run(f, ["ls", "/data"], preopens=p), 0, "a.txt\n")
        check("files env", run(f, ["env"], {"B": "2", "A": "1"}), 0, "A=1\nB=2\n")
        check("files args", run(f, ["args", "x y"]), 0, "files.wasm\nargs\nx y\n")
        check("files pwd", run(f, ["pwd"], preopens=p), 0, "/")
        check("files read outside preopens", run(f, ["read", os.path.join(other, "x")], preopens=p), 1, None, "files:")
        check("files escape with ..", run(f, ["write", "/data/../x", "y"], preopens=p), 1, None, "files:")
        check("files exit 7", run(f, ["exit", "7"]), 7)
    start = time.time()
    check("ticker 3 5", run("tests/fixtures/ticker/ticker.wasm", ["3", "5"]), 5, "tick 1\ntick 2\ntick 3\n")
    print("     (ticker took {:.2f}s, expect ~0.2s)".format(time.time() - start))
    if FAILED:
        print("FAILED: " + ", ".join(FAILED))
        sys.exit(1)
    print("all guests OK")


if __name__ == "__main__":
    main()
