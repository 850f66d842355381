#!/usr/bin/env python3
"""Stream checks for the fast path, as unmodified apps use sockets: blocking sockets, half-close,
MSG_PEEK, sendfile() both ways, a reader that starts late, a reset.

  streams.py server PORT          serve the checks (one thread per connection)
  streams.py client HOST PORT     run every check against a server; prints "ok <check>" per
                                  check, exits non-zero at the first failure
"""
import hashlib
import os
import socket
import struct
import sys
import tempfile
import threading
import time

MIB = 1 << 20


def recv_all(conn):
    digest, total = hashlib.sha256(), 0
    while True:
        chunk = conn.recv(1 << 20)
        if not chunk:
            return total, digest.hexdigest()
        digest.update(chunk)
        total += len(chunk)


def read_line(conn):
    """The command line, or None for a connection closed before sending one (a readiness
    probe)."""
    line = b""
    while not line.endswith(b"\n"):
        byte = conn.recv(1)
        if not byte:
            if line:
                raise EOFError(f"connection closed inside the command {line!r}")
            return None
        line += byte
    return line.decode().split()


def pattern(n):
    """n deterministic bytes (not all equal, so that reordering shows)."""
    block = bytes(range(256)) * 4096
    out = bytearray()
    while len(out) < n:
        out += block
    return bytes(out[:n])


def serve(conn):
    with conn:
        cmd = read_line(conn)
        if cmd is None:
            return
        if cmd[0] == "echo":  # echo until EOF, then close
            while True:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                conn.sendall(chunk)
        elif cmd[0] == "digest":  # read until EOF (after a delay), answer "<bytes> <sha256>"
            time.sleep(float(cmd[1]))
            total, digest = recv_all(conn)
            conn.sendall(f"{total} {digest}\n".encode())
        elif cmd[0] == "peek":  # MSG_PEEK the next n bytes, then read them: the same bytes
            n = int(cmd[1])
            peeked = b""
            while len(peeked) < n:
                peeked = conn.recv(n, socket.MSG_PEEK)
            got = b""
            while len(got) < n:
                got += conn.recv(n - len(got))
            conn.sendall(b"same\n" if peeked == got else b"differ\n")
        elif cmd[0] == "sendfile":  # send n bytes from a file with sendfile(), then close
            n = int(cmd[1])
            with tempfile.TemporaryFile() as f:
                f.write(pattern(n))
                f.flush()
                f.seek(0)
                conn.sendfile(f)  # os.sendfile() underneath
        elif cmd[0] == "reset":  # close with a reset (SO_LINGER 0)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def server(port):
    srv = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    srv.bind(("::", port))
    srv.listen(128)
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


def connect(host, port, command):
    conn = socket.create_connection((host, port), timeout=30)
    conn.sendall(command.encode() + b"\n")
    return conn


def check(name, ok, detail=""):
    if not ok:
        print(f"FAILED {name}: {detail}", flush=True)
        sys.exit(1)
    print(f"ok {name}", flush=True)


def client(host, port):
    # Half-close: 4 MiB out, shutdown(SHUT_WR), 4 MiB echoed back in order, then EOF.
    data = pattern(4 * MIB)
    conn = connect(host, port, "echo")
    sender = threading.Thread(target=lambda: (conn.sendall(data), conn.shutdown(socket.SHUT_WR)))
    sender.start()
    got = bytearray()
    while True:
        chunk = conn.recv(1 << 20)
        if not chunk:
            break
        got += chunk
    sender.join()
    conn.close()
    check("echo-half-close", bytes(got) == data, f"{len(got)} bytes back")

    # Many small writes, each answered: the request/response pattern, in order.
    conn = connect(host, port, "echo")
    ok = True
    for i in range(200):
        msg = f"message {i:05d}\n".encode()
        conn.sendall(msg)
        back = b""
        while len(back) < len(msg):
            back += conn.recv(len(msg) - len(back))
        ok = ok and back == msg
    conn.close()
    check("echo-small-writes", ok)

    # A reader that starts late: 16 MiB written while the server sleeps, all delivered intact.
    data = pattern(16 * MIB)
    conn = connect(host, port, "digest 2")
    conn.sendall(data)
    conn.shutdown(socket.SHUT_WR)
    answer = conn.recv(1024).decode().split()
    conn.close()
    check("slow-reader", answer == [str(len(data)), hashlib.sha256(data).hexdigest()], answer)

    # MSG_PEEK on the server's socket sees the bytes it then reads.
    conn = connect(host, port, "peek 1000")
    conn.sendall(pattern(1000))
    check("peek", conn.recv(64) == b"same\n")
    conn.close()

    # sendfile() on the server's socket: 8 MiB from a file.
    n = 8 * MIB
    conn = connect(host, port, f"sendfile {n}")
    total, digest = recv_all(conn)
    conn.close()
    check("sendfile-from-server", (total, digest) == (n, hashlib.sha256(pattern(n)).hexdigest()),
          f"{total} bytes")

    # sendfile() on the client's socket.
    conn = connect(host, port, "digest 0")
    with tempfile.TemporaryFile() as f:
        f.write(pattern(n))
        f.flush()
        f.seek(0)
        conn.sendfile(f)  # os.sendfile() underneath (with poll, the socket has a timeout)
    conn.shutdown(socket.SHUT_WR)
    answer = conn.recv(1024).decode().split()
    conn.close()
    check("sendfile-from-client", answer == [str(n), hashlib.sha256(pattern(n)).hexdigest()],
          answer)

    # A reset by the server reaches the client as a reset, not as an orderly end.
    conn = connect(host, port, "reset")
    try:
        rest = conn.recv(1024)
        outcome = "eof" if rest == b"" else "data"
    except ConnectionResetError:
        outcome = "reset"
    conn.close()
    check("reset", outcome == "reset", outcome)


if __name__ == "__main__":
    if sys.argv[1] == "server":
        server(int(sys.argv[2]))
    else:
        client(sys.argv[2], int(sys.argv[3]))
