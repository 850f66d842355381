#!/usr/bin/env python3
"""Half-close from the server's side first (the reverse of sink.py/source.py).

server PORT: for each connection, sends "hello <n>\n" and half-closes (SHUT_WR); then reads
  what the client sends until its half-close and prints "<bytes> <sha256>" (one line, flushed).
client HOST PORT BYTES: reads until the server's half-close (it must get the greeting and an
  end of stream while its own direction stays open), then sends BYTES random bytes and
  half-closes; prints "greeting=<line> sent=<bytes> <sha256>"."""
import hashlib
import os
import socket
import sys
import threading


def serve(conn, n):
    with conn:
        try:
            conn.sendall(f"hello {n}\n".encode())
            conn.shutdown(socket.SHUT_WR)
            digest, total = hashlib.sha256(), 0
            while chunk := conn.recv(1 << 20):
                digest.update(chunk)
                total += len(chunk)
        except OSError:
            return  # e.g. a readiness probe that connected and left at once
        print(f"{total} {digest.hexdigest()}", flush=True)


def server(port):
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", port))
    srv.listen(64)
    n = 0
    while True:
        conn, _ = srv.accept()
        n += 1
        threading.Thread(target=serve, args=(conn, n), daemon=True).start()


def client(host, port, size):
    s = socket.create_connection((host, port), timeout=30)
    greeting = b""
    while data := s.recv(4096):
        greeting += data
    payload = os.urandom(size)
    s.sendall(payload)
    s.shutdown(socket.SHUT_WR)
    s.recv(1)  # the server closes after reading everything
    s.close()
    line = greeting.decode().strip()
    print(f"greeting={line} sent={size} {hashlib.sha256(payload).hexdigest()}")


if sys.argv[1] == "server":
    server(int(sys.argv[2]))
else:
    client(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
