"""http-server — a WASI 0.2 component (built with componentize-py) serving HTTP with plain sockets.

Listens on 0.0.0.0:$PORT (default 8080) through wasi:sockets and answers every request with
`200 OK` and a small text body naming the request path, then closes the connection.
Build: scripts/build-guests.sh --components   (output app.wasm is git-ignored, ~18 MB)
NOTE: top-level code runs at *build* time (componentize-py snapshots it); open sockets only in run().
"""
import os
import socket
import sys

from wit_world import exports

BODY_TEMPLATE = "hello from kapsel wasm component\npath: {path}\n"


def read_request(conn):
    """Read until the end of the request headers (or EOF); returns the raw bytes."""
    data = b""
    while b"\r\n\r\n" not in data and len(data) < 65536:
        chunk = conn.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def handle(conn):
    raw = read_request(conn)
    request_line = raw.split(b"\r\n", 1)[0].decode("latin-1", "replace")
    parts = request_line.split(" ")
    method = parts[0] if parts and parts[0] else "?"
    path = parts[1] if len(parts) > 1 else "/"
    body = BODY_TEMPLATE.format(path=path).encode("utf-8")
    head = (
        "HTTP/1.1 200 OK\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "Content-Length: {}\r\n"
        "Connection: close\r\n"
        "\r\n"
    ).format(len(body)).encode("ascii")
    conn.sendall(head + (body if method != "HEAD" else b""))
    print("{} {} -> 200".format(method, path), flush=True)


class Run(exports.Run):
    def run(self) -> None:
        port = int(os.environ.get("PORT", "8080"))
        srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("0.0.0.0", port))
        srv.listen(16)
        print("listening on {}".format(port), flush=True)
        while True:
            conn, _addr = srv.accept()
            try:
                handle(conn)
            except Exception as e:  # keep serving whatever one client does
                print("request failed: {}".format(e), file=sys.stderr, flush=True)
            finally:
                try:
                    conn.close()
                except Exception:
                    pass
