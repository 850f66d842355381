#!/usr/bin/env python3
"""Request/response and connection-rate benchmark tool (the same unmodified client for every mode).

  rr.py server PORT [PORT ...]      echo server on every PORT: answers every message with the
                                    same bytes
  rr.py latency HOST PORT SIZE N    N round trips of SIZE bytes on one connection; prints JSON
                                    {"p50_us":..,"p90_us":..,"p99_us":..}
  rr.py connrate HOST PORT SECONDS  connect, 1-byte exchange, close, repeated; prints JSON
                                    {"conn_per_s":.., "first_byte_p50_us":.., "first_byte_p99_us":..}
                                    (first byte: from connect() to the answer's byte)
"""
import json
import socket
import sys
import threading
import time

def serve(ports):
    for port in ports[1:]:
        threading.Thread(target=serve_one, args=(port,), daemon=True).start()
    serve_one(ports[0])

def serve_one(port):
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", port))
    srv.listen(1024)
    def echo(conn):
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with conn:
            while True:
                data = conn.recv(65536)
                if not data:
                    return
                conn.sendall(data)
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=echo, args=(conn,), daemon=True).start()

def recv_exact(s, n):
    got = 0
    while got < n:
        chunk = s.recv(n - got)
        if not chunk:
            raise EOFError("closed")
        got += len(chunk)

def latency(host, port, size, n):
    s = socket.create_connection((host, port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    msg = b"x" * size
    for _ in range(100):  # warm-up
        s.sendall(msg)
        recv_exact(s, size)
    samples = []
    for _ in range(n):
        t0 = time.perf_counter_ns()
        s.sendall(msg)
        recv_exact(s, size)
        samples.append((time.perf_counter_ns() - t0) / 1000)
    samples.sort()
    pick = lambda q: samples[min(len(samples) - 1, int(q * len(samples)))]
    print(json.dumps({"p50_us": pick(0.50), "p90_us": pick(0.90), "p99_us": pick(0.99)}))

def connrate(host, port, seconds):
    end, count, first_byte = time.monotonic() + seconds, 0, []
    start = time.monotonic()
    while time.monotonic() < end:
        t0 = time.perf_counter()
        s = socket.create_connection((host, port))
        s.sendall(b"x")
        recv_exact(s, 1)
        first_byte.append(time.perf_counter() - t0)
        s.close()
        count += 1
    first_byte.sort()
    pct = lambda p: first_byte[min(len(first_byte) - 1, int(len(first_byte) * p / 100))] * 1e6
    print(json.dumps({"conn_per_s": count / (time.monotonic() - start),
                      "first_byte_p50_us": pct(50), "first_byte_p99_us": pct(99)}))

cmd = sys.argv[1]
if cmd == "server":
    serve([int(p) for p in sys.argv[2:]])
elif cmd == "latency":
    latency(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
elif cmd == "connrate":
    connrate(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]))
