#!/usr/bin/env python3
"""Memory per idle keep-alive connection of a running HTTP proxy.

Opens N connections one after another, sends one GET on each and reads the
response head, keeps them all open, and reports the growth of the proxy
process's RSS divided by N.

Usage: idle-connections.py PORT N PID   (raise `ulimit -n` above N first)
"""
import socket
import sys
import time


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS"):
                return int(line.split()[1])
    raise SystemExit(f"no such process {pid}")


def open_one(port):
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
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
    held = [open_one(port)]  # warm up pools and allocator first
    time.sleep(0.5)
    before = rss_kib(pid)
    held += [open_one(port) for _ in range(count)]
    time.sleep(1)
    after = rss_kib(pid)
    per = (after - before) / count
    print(f"{count} idle keep-alive connections: RSS {before} KiB -> {after} KiB, {per:.2f} KiB per connection")


if __name__ == "__main__":
    main()
