#!/usr/bin/env python3
"""Test client: opens N connections to HOST:PORT (a sink.py server) so that all are open at
once, then on each sends 1 KiB, half-closes and checks the server's "<bytes> <sha256>" answer.
Prints "ok <N>" when every connection completed correctly."""
import asyncio
import hashlib
import os
import sys

async def main(host, port, n):
    conns = await asyncio.gather(*(asyncio.open_connection(host, port) for _ in range(n)))
    async def exchange(reader, writer):
        payload = os.urandom(1024)
        writer.write(payload)
        await writer.drain()
        writer.write_eof()
        answer = (await reader.read()).decode().strip()
        writer.close()
        return answer == f"{len(payload)} {hashlib.sha256(payload).hexdigest()}"
    results = await asyncio.gather(*(exchange(r, w) for r, w in conns))
    bad = results.count(False)
    if bad:
        print(f"failed {bad} of {n}")
        sys.exit(1)
    print(f"ok {n}")

asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
