"""statsd-app — a WASI 0.2 component that emits StatsD over UDP (wasi:sockets) to the pod's
metrics adapter, the way an instrumented app does: a request counter with tags, a latency timer,
a queue-depth gauge and a set of users. Every ~0.5 s; ITERATIONS=N stops after N rounds.
Target: STATSD_HOST (127.0.0.1) and STATSD_PORT (9125)."""
import os
import random
import socket
import time

from wit_world import exports


class Run(exports.Run):
    def run(self) -> None:
        host = os.environ.get("STATSD_HOST", "127.0.0.1")
        port = int(os.environ.get("STATSD_PORT", "9125"))
        n = int(os.environ.get("ITERATIONS", "0") or "0")
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        print("statsd-app: sending to {}:{}".format(host, port), flush=True)
        i = 0
        while n <= 0 or i < n:
            i += 1
            route = random.choice(["/home", "/cart"])
            lines = [
                "shop.requests:1|c|#route:{}".format(route),
                "shop.request_time:{}|ms|#route:{}".format(random.randint(5, 300), route),
                "shop.queue_depth:{}|g".format(random.randint(0, 20)),
                "shop.users:user{}|s".format(random.randint(1, 5)),
            ]
            s.sendto("\n".join(lines).encode(), (host, port))
            if i % 10 == 0:
                print("statsd-app: {} rounds sent".format(i), flush=True)
            time.sleep(0.5)
