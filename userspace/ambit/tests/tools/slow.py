#!/usr/bin/env python3
"""Test client: one long-lived connection to HOST:PORT (a sink.py server) that sends a small
chunk every 100 ms for SECONDS seconds, then half-closes and prints
"sent=<bytes> <sha256> received=<answer>" like source.py."""
import hashlib
import os
import socket
import sys
import time

host, port, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
s = socket.create_connection((host, port), timeout=30)
digest, total = hashlib.sha256(), 0
end = time.monotonic() + seconds
while time.monotonic() < end:
    chunk = os.urandom(512)
    s.sendall(chunk)
    digest.update(chunk)
    total += len(chunk)
    time.sleep(0.1)
s.shutdown(socket.SHUT_WR)
answer = b""
while True:
    data = s.recv(4096)
    if not data:
        break
    answer += data
print(f"sent={total} {digest.hexdigest()} received={answer.decode().strip()}")
