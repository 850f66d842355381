#!/usr/bin/env python3
"""Test client: opens N TCP connections to HOST:PORT without sending anything, prints "open N"
once every connect() returned, and holds them until stdin closes."""
import resource
import socket
import sys

host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
held = []
for _ in range(n):
    s = socket.create_connection((host, port), timeout=10)
    held.append(s)
print(f"open {len(held)}", flush=True)
sys.stdin.read()
