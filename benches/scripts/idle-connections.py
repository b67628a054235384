#!/usr/bin/env python3
"""Memory per idle keep-alive connection of a running HTTP or TCP proxy.

Opens N connections in batches, sends one GET on each and reads the
response head, and keeps them all open, pausing between batches so that a
proxy that releases an idle connection's buffers (weft parks HTTP/1
connections idle for a second) can do so and reuse that memory for the
next batch. Reports the proxy's RSS growth per connection over all N, and
the marginal growth over the second half (the steady-state cost).

With TCP=1 in the environment each connection sends 16 bytes and reads
16 back (a TCP listener in front of an echo) instead of a GET. Each such
connection holds one of its cluster's `circuit_breakers.max_connections`
(1024 by default): raise it above N.

Usage: [TCP=1] idle-connections.py PORT N PID [PAUSE_SECONDS]
(raise `ulimit -n` above N first)
"""
import os
import socket
import sys
import time

BATCH = 500


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS"):
                return int(line.split()[1])
    raise SystemExit(f"no such process {pid}")


def open_one(port):
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    if os.environ.get("TCP") == "1":
        sock.sendall(b"0123456789abcdef")
        data = b""
        while len(data) < 16:
            chunk = sock.recv(16 - len(data))
            if not chunk:
                raise SystemExit("connection closed before the echo")
            data += chunk
        return sock
    sock.sendall(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n")
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            raise SystemExit("connection closed before a response")
        data += chunk
    return sock


def main():
    port, count, pid = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    pause = float(sys.argv[4]) if len(sys.argv) > 4 else 1.5
    held = [open_one(port)]  # warm up pools and allocator first
    time.sleep(pause)
    before = rss_kib(pid)
    half = None
    while len(held) - 1 < count:
        held += [open_one(port) for _ in range(min(BATCH, count - (len(held) - 1)))]
        time.sleep(pause)
        if half is None and len(held) - 1 >= count // 2:
            half = (len(held) - 1, rss_kib(pid))
    after = rss_kib(pid)
    per = (after - before) / count
    marginal = (after - half[1]) / max(count - half[0], 1)
    print(
        f"{count} idle {'TCP' if os.environ.get('TCP') == '1' else 'keep-alive'} connections: RSS {before} KiB -> {after} KiB, "
        f"{per:.2f} KiB per connection overall, {marginal:.2f} KiB per connection over the second half"
    )


if __name__ == "__main__":
    main()
