#!/usr/bin/env python3
"""Test client: what an app sees of connections that fail. Connects to HOST PORT N times; with
--send, sends a request and half-closes before waiting (an app whose bytes went out); without,
only waits (an app whose server speaks first). Prints how each one ended, counted, e.g.
"reset=3" or "eof=1 reset=2": reset (a reset at any point, connect() included), eof (an orderly
close, no bytes) or data."""
import socket
import sys

host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
send = "--send" in sys.argv[4:]
seen = {}
for _ in range(n):
    try:
        with socket.create_connection((host, port), timeout=10) as s:
            if send:
                s.sendall(b"GET / HTTP/1.0\r\n\r\n")
                s.shutdown(socket.SHUT_WR)
            what = "eof" if s.recv(100) == b"" else "data"
    except (ConnectionResetError, BrokenPipeError):
        what = "reset"
    seen[what] = seen.get(what, 0) + 1
print(" ".join(f"{k}={v}" for k, v in sorted(seen.items())))
