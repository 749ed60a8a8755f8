"""redis-app — a WASI 0.2 component (componentize-py) using the real redis-py client over wasi:sockets.

Connects to Redis at 127.0.0.1:6379 (override with REDIS_HOST / REDIS_PORT) and, every ~1 s, does
INCR app:visits, SET/GET app:last and a MULTI/EXEC pipeline (INCR + GET), printing one line per
iteration. ITERATIONS=N stops after N iterations (default: forever). A failed iteration (e.g.
connection refused) prints the error and the loop goes on after 1 s; with ITERATIONS set, the
program exits 1 if none succeeded, else 0.
Build: sample-pods/redis-app/build.sh   (fetches redis==5.0.8 into a temp dir; writes app.wasm)
"""
import encodings.idna  # noqa: F401 -- componentize-py leaves it out; socket.create_connection needs it
import os
import sys
import time

import asyncio  # noqa: F401 -- import before the ssl shim, so asyncio itself still sees "no ssl"

try:
    import ssl  # noqa: F401
except ImportError:  # componentize-py's CPython has no _ssl; redis-py imports ssl unconditionally
    import ssl_shim

    sys.modules["ssl"] = ssl_shim

import redis  # the real redis-py (bundled from PyPI by build.sh)
import redis.connection

if sys.modules["ssl"].__name__ == "ssl_shim":
    # redis-py saw our stand-in as a working ssl; make Redis(ssl=True) fail with its own clear error instead
    redis.connection.SSL_AVAILABLE = False

from componentize_py_types import Err
from wit_world import exports


class Run(exports.Run):
    def run(self) -> None:
        host = os.environ.get("REDIS_HOST", "127.0.0.1")
        port = int(os.environ.get("REDIS_PORT", "6379"))
        iterations = int(os.environ.get("ITERATIONS", "0") or "0")  # 0 or unset = forever
        print("redis-app: redis-py {} -> {}:{} ({} iterations)".format(
            redis.__version__, host, port, iterations if iterations > 0 else "endless"), flush=True)
        r = redis.Redis(host=host, port=port, socket_timeout=5)
        i = ok = 0
        while iterations <= 0 or i < iterations:
            i += 1
            try:
                visits = r.incr("app:visits")
                r.set("app:last", i)
                last = r.get("app:last")
                pipe = r.pipeline(transaction=True)
                pipe.incr("app:visits")
                pipe.get("app:last")
                tx = pipe.execute()
                ok += 1
                print("iteration {}: visits={} last={} tx={}".format(
                    i, visits, last.decode() if last is not None else None, tx), flush=True)
            except Exception as e:  # redis.ConnectionError, TimeoutError, ...: report and retry, never crash
                print("iteration {}: {}: {} (retrying in 1 s)".format(i, type(e).__name__, e), flush=True)
                try:
                    r.connection_pool.disconnect()
                except Exception:
                    pass
            if iterations <= 0 or i < iterations:
                time.sleep(1)
        print("redis-app: done, {}/{} iterations succeeded".format(ok, i), flush=True)
        if ok == 0:
            raise Err(None)  # exit status 1: Redis was never reachable
