#!/usr/bin/env python3
"""Test client: latency over time. On one connection to an echo server at HOST:PORT, sends a
100-byte message every 10 ms for SECONDS seconds and checks that it comes back. After every
WINDOW seconds prints "window <i> n=<round trips> p50_us=<median> p99_us=<99th percentile>".
Any error (a short or different echo, a closed connection) prints "error: ..." and exits 1."""
import os
import socket
import sys
import time

host, port, seconds, window = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])

def percentile(sorted_values, p):
    return sorted_values[min(len(sorted_values) - 1, int(len(sorted_values) * p))]

try:
    s = socket.create_connection((host, port), timeout=10)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    end = time.monotonic() + seconds
    index, window_end, rtts = 0, time.monotonic() + window, []
    while time.monotonic() < end:
        payload = os.urandom(100)
        started = time.perf_counter()
        s.sendall(payload)
        echoed = b""
        while len(echoed) < len(payload):
            data = s.recv(len(payload) - len(echoed))
            if not data:
                raise ConnectionError("echo server closed the connection")
            echoed += data
        rtts.append((time.perf_counter() - started) * 1e6)
        if echoed != payload:
            raise ValueError("echo differs")
        if time.monotonic() >= window_end:
            rtts.sort()
            print(f"window {index} n={len(rtts)} p50_us={percentile(rtts, 0.5):.0f} "
                  f"p99_us={percentile(rtts, 0.99):.0f}", flush=True)
            index, window_end, rtts = index + 1, window_end + window, []
        time.sleep(0.01)
except Exception as e:
    print(f"error: {e!r}", flush=True)
    sys.exit(1)
