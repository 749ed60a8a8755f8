"""pinger — a WASI 0.2 component (componentize-py) that talks to a container over the pod's localhost.

Every $INTERVAL seconds (default 2) it connects to 127.0.0.1:$PORT (default 9000), sends
"ping from wasm", and prints the reply. Used by sample-pods/mixed.yaml next to a busybox echo server.
Build: scripts/build-guests.sh --component-if-missing sample-pods/pinger   (app.wasm is git-ignored)
"""
import encodings.idna  # noqa: F401 -- componentize-py leaves it out; socket.create_connection needs it
import os
import socket
import time

from wit_world import exports


class Run(exports.Run):
    def run(self) -> None:
        port = int(os.environ.get("PORT", "9000"))
        interval = float(os.environ.get("INTERVAL", "2"))
        while True:
            try:
                s = socket.create_connection(("127.0.0.1", port), timeout=5)
                s.sendall(b"ping from wasm\n")
                data = b""
                while not data.endswith(b"\n"):
                    chunk = s.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                s.close()
                print("pinger: container answered: {}".format(data.decode("utf-8", "replace").strip()), flush=True)
            except Exception as e:
                print("pinger: waiting for the container on 127.0.0.1:{} ({})".format(port, e), flush=True)
            time.sleep(interval)
