#!/usr/bin/env python3
"""Test client: opens N connections in total to an echo server, CONCURRENCY at a time (and at
most RATE per second, if given); on each sends 16 random bytes, checks they come back, and
closes first. Prints "ok N" or "failed K of N: <first error>" (exit 1)."""
import asyncio
import os
import resource
import sys

async def one(host, port, limit, errors, start):
    await asyncio.sleep(start)
    async with limit:
        try:
            reader, writer = await asyncio.open_connection(host, port)
            payload = os.urandom(16)
            writer.write(payload)
            await writer.drain()
            echoed = await asyncio.wait_for(reader.readexactly(16), 10)
            writer.close()
            await writer.wait_closed()
            if echoed != payload:
                errors.append("echo differs")
        except Exception as e:  # counted and reported, not raised
            errors.append(repr(e))

async def main(host, port, n, concurrency, rate):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    limit, errors = asyncio.Semaphore(concurrency), []
    await asyncio.gather(*(one(host, port, limit, errors, i / rate if rate else 0) for i in range(n)))
    if errors:
        print(f"failed {len(errors)} of {n}: {errors[0]}")
        sys.exit(1)
    print(f"ok {n}")

rate = float(sys.argv[5]) if len(sys.argv) > 5 else 0
asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), rate))
