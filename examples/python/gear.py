#!/usr/bin/env python3
"""A gear written in Python, served to the whole mesh through one node's WebSocket interface.

It registers the gear `greeter` (name changeable with --gear) with two ports:
- `greet` ({"name": "..."} -> {"greeting": "hello ...", "served_by": "python"}),
- `slow` (waits until the caller gives up; shows cancellation).
Any node's gears and clients can call it like a Rust gear; when this script stops, the gear is
withdrawn at once.

    python3 gear.py --url wss://127.0.0.1:7070/v1/mesh --cafile dev-ca.crt --token "$TOKEN"
"""

import argparse
import asyncio
import json
import sys

from common import add_connection_args, connect, send


async def handle(ws, m: dict, tasks: dict) -> None:
    call = m["call"]
    try:
        if m["port"] == "greet":
            name = (m.get("arg") or {}).get("name", "world")
            await send(ws, type="reply", call=call, ok={"greeting": f"hello {name}", "served_by": "python"})
        elif m["port"] == "slow":
            await asyncio.sleep(3600)
        else:
            await send(ws, type="reply", call=call, error={"code": "not_found", "message": "no such port"})
    except asyncio.CancelledError:
        pass
    finally:
        tasks.pop(call, None)


async def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_connection_args(p)
    p.add_argument("--gear", default="greeter", help="the gear's name")
    args = p.parse_args()

    ws, welcome = await connect(args, scope=f"serve:{args.gear}")
    await send(
        ws,
        type="register",
        id="reg",
        gear=args.gear,
        version="1.0.0",
        description="a gear served from Python",
        ports=[
            {"name": "greet", "description": "says hello", "idempotent": True},
            {"name": "slow", "description": "answers only when cancelled"},
        ],
    )
    tasks: dict[int, asyncio.Task] = {}
    async for raw in ws:
        m = json.loads(raw)
        t = m["type"]
        if t == "registered":
            print(f"registered {m['gear']} on {welcome['node']['name']}", flush=True)
        elif t == "call":
            tasks[m["call"]] = asyncio.create_task(handle(ws, m, tasks))
        elif t == "cancel":
            task = tasks.pop(m["call"], None)
            if task:
                task.cancel()
            print(f"cancelled call {m['call']}", flush=True)
        elif t == "error":
            print(f"error: {json.dumps(m['error'])}", file=sys.stderr, flush=True)
            if m.get("id") == "reg":
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
