#!/usr/bin/env python3
"""Test server: an asyncio echo server on PORT for many concurrent connections (no thread per
connection): every byte read is written back until the client closes."""
import asyncio
import resource
import sys

async def echo(reader, writer):
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()

async def main(port):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    server = await asyncio.start_server(echo, "0.0.0.0", port, backlog=4096)
    async with server:
        await server.serve_forever()

asyncio.run(main(int(sys.argv[1])))
