#!/usr/bin/env python3
"""Test client: plays a new node process that gives up half-way. On a running node's handover
socket SOCKET it says hello, takes the pods' listeners (received as SCM_RIGHTS), prints
"pods=<n> fds=<m>", and, after HOLD seconds (0 if not given) holding them, hangs up without
telling the node to drain."""
import json
import os
import socket
import sys
import time

s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
s.connect(sys.argv[1])
s.send(json.dumps({"type": "hello", "version": "test", "map_abi": 0}).encode())
hello = json.loads(s.recv(65536))
assert hello["type"] == "hello", hello
s.send(json.dumps({"type": "take_listeners"}).encode())
pods = fds = 0
while True:
    data, received, _, _ = socket.recv_fds(s, 65536, 16)
    message = json.loads(data)
    for fd in received:
        os.close(fd)
    if message["type"] == "listeners_sent":
        assert message["pods"] == pods, message
        break
    assert message["type"] == "pod", message
    pods += 1
    fds += len(received)
print(f"pods={pods} fds={fds}", flush=True)
time.sleep(float(sys.argv[2]) if len(sys.argv) > 2 else 0)
s.close()
