#!/usr/bin/env python3
"""Test server: accepts connections on PORT; for each, reads until the client half-closes,
then answers "<bytes> <sha256>\n" and closes. Proves large transfers arrive intact and that a
half-closed connection still carries the answer back."""
import hashlib
import socket
import sys
import threading

def serve(conn):
    with conn:
        digest, total = hashlib.sha256(), 0
        while True:
            chunk = conn.recv(1 << 20)
            if not chunk:
                break
            digest.update(chunk)
            total += len(chunk)
        conn.sendall(f"{total} {digest.hexdigest()}\n".encode())

def main():
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", int(sys.argv[1])))
    srv.listen(4096)  # a burst of 1000 connections must not overflow the accept queue
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()

main()
