#!/usr/bin/env python3
"""Holds N idle connections open (for the RSS-per-connection figure of `cargo xtask bench`).

  hold.py HOST PORT N   opens N connections to an echo server, exchanges one byte on each (so
                        each is established end to end), prints "open N", and holds them until
                        stdin closes or SIGTERM/SIGINT arrives
"""
import asyncio
import resource
import signal
import sys

async def open_one(host, port, limit):
    async with limit:
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"x")
        await writer.drain()
        await reader.readexactly(1)
        return writer

async def main(host, port, n):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < n + 64:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(n + 64, hard), hard))
    limit = asyncio.Semaphore(64)  # connections being opened at once
    writers = await asyncio.gather(*(open_one(host, port, limit) for _ in range(n)))
    print(f"open {len(writers)}", flush=True)

    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, done.set)
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)

    async def until_stdin_closes():
        while await stdin.read(4096):
            pass
        done.set()

    watcher = asyncio.create_task(until_stdin_closes())
    await done.wait()
    watcher.cancel()
    for w in writers:
        w.close()

asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
