#!/usr/bin/env python3
"""Test server: accepts connections on PORT (IPv4 and IPv6); for each, reads until the client
half-closes, then answers "<bytes> <sha256>\n" and closes. Proves large transfers arrive intact
and that a half-closed connection still carries the answer back."""
import hashlib
import socket
import sys
import threading

def serve(conn):
    with conn:
        digest, total = hashlib.sha256(), 0
        try:
            while True:
                chunk = conn.recv(1 << 20)
                if not chunk:
                    break
                digest.update(chunk)
                total += len(chunk)
            conn.sendall(f"{total} {digest.hexdigest()}\n".encode())
        except OSError:
            # A broken connection (tests break them on purpose) gets no answer, which is what
            # its client checks. Under the fast path a blocking recv() woken by a reset raises
            # EAGAIN instead of ECONNRESET (docs/fast-path.md), hence OSError, not just resets.
            pass

def main():
    srv = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # IPv4 too, v4-mapped
    srv.bind(("::", int(sys.argv[1])))
    srv.listen(4096)  # a burst of 1000 connections must not overflow the accept queue
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()

main()
