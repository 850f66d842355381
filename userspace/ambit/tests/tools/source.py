#!/usr/bin/env python3
"""Test client: sends BYTES random bytes to HOST:PORT, half-closes, reads the server's
"<bytes> <sha256>" answer and prints "sent=<bytes> <sha256> received=<answer>".
An IPv6 socket is used when HOST contains ':' (e.g. ::ffff:10.0.0.1, v4-mapped)."""
import hashlib
import os
import socket
import sys

host, port, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
family = socket.AF_INET6 if ":" in host else socket.AF_INET
s = socket.socket(family, socket.SOCK_STREAM)
s.settimeout(60)
s.connect((host, port))
digest, left = hashlib.sha256(), size
block = os.urandom(1 << 20)
i = 0
while left > 0:
    # Vary every block so that a reordered or repeated block changes the digest.
    chunk = (i.to_bytes(8, "little") + block[8:])[: min(left, len(block))]
    s.sendall(chunk)
    digest.update(chunk)
    left -= len(chunk)
    i += 1
s.shutdown(socket.SHUT_WR)
answer = b""
while True:
    data = s.recv(4096)
    if not data:
        break
    answer += data
print(f"sent={size} {digest.hexdigest()} received={answer.decode().strip()}")
