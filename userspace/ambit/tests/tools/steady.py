#!/usr/bin/env python3
"""Test client: for SECONDS seconds opens a new connection to HOST:PORT (an echo server) RATE
times a second, each on its own (a slow one does not delay the next): sends 16 random bytes,
checks they come back, closes. Prints one JSON line: how many ended how ("ok", "refused",
"reset", "timeout", "other"), the first error, and the start time (time.time()) of every
connection that succeeded."""
import asyncio
import json
import os
import resource
import sys
import time

async def one(host, port, at, outcome):
    await asyncio.sleep(max(0.0, at - time.monotonic()))
    started = time.time()
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 10)
        try:
            payload = os.urandom(16)
            writer.write(payload)
            await writer.drain()
            echoed = await asyncio.wait_for(reader.readexactly(16), 10)
        finally:
            writer.close()
        if echoed != payload:
            raise ValueError("echo differs")
        outcome["ok"] += 1
        outcome["ok_at"].append(started)
    except ConnectionRefusedError as e:
        note(outcome, "refused", e)
    except (ConnectionResetError, BrokenPipeError, asyncio.IncompleteReadError) as e:
        note(outcome, "reset", e)
    except asyncio.TimeoutError as e:
        note(outcome, "timeout", e)
    except Exception as e:  # counted and reported, not raised
        note(outcome, "other", e)

def note(outcome, kind, error):
    outcome[kind] += 1
    if outcome["first_error"] is None:
        outcome["first_error"] = f"{kind}: {error!r} at {time.time():.3f}"

async def main(host, port, seconds, rate):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    outcome = {k: 0 for k in ("ok", "refused", "reset", "timeout", "other")}
    outcome.update(first_error=None, ok_at=[])
    start = time.monotonic()
    n = int(seconds * rate)
    await asyncio.gather(*(one(host, port, start + i / rate, outcome) for i in range(n)))
    print(json.dumps(outcome))

asyncio.run(main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])))
