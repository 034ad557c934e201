#!/usr/bin/env python3
"""Watches a gearmesh mesh live through one node's WebSocket interface.

Prints the snapshot, then every change (nodes, links, gears, routes), events on the topics you
ask for, sampled call traces and per-node stats. Attached to any node, it sees the whole mesh.

    python3 observer.py --url wss://127.0.0.1:7070/v1/mesh --cafile dev-ca.crt --token "$TOKEN" \
        --topics orders.placed --traces --stats

With --seconds N it stops after N seconds; with --summary it then prints one JSON line with what it
saw (the mesh it holds after applying every change to the snapshot), for scripts and tests.
"""

import argparse
import asyncio
import json
import sys

from common import add_connection_args, connect, send


class MeshModel:
    """The snapshot with every later change applied: what the observer believes the mesh is."""

    def __init__(self, snapshot: dict):
        self.seq = snapshot["seq"]
        self.nodes = {n["id"]: n for n in snapshot["nodes"]}
        self.links = set()
        for n in snapshot["nodes"]:
            for l in n["links"]:
                self.links.add(tuple(sorted((n["id"], l["peer"]))))

    def apply(self, m: dict) -> None:
        if m.get("seq", 0) <= self.seq:
            return  # already in the snapshot
        self.seq = m["seq"]
        t = m["type"]
        if t in ("node_joined", "node_updated"):
            old = self.nodes.get(m["node"]["id"], {})
            self.nodes[m["node"]["id"]] = {**old, **m["node"]}
        elif t == "node_removed":
            self.nodes.pop(m["node"], None)
        elif t in ("node_suspected", "node_alive", "node_left"):
            state = {"node_suspected": "suspect", "node_alive": "alive"}.get(t)
            if state is None:
                state = "left" if m.get("graceful") else "dead"
            if m["node"] in self.nodes:
                self.nodes[m["node"]]["state"] = state
        elif t == "gear_added":
            n = self.nodes.get(m["node"])
            if n is not None:
                n["gears"] = [g for g in n["gears"] if g["name"] != m["gear"]["name"]] + [m["gear"]]
        elif t == "gear_removed":
            n = self.nodes.get(m["node"])
            if n is not None:
                n["gears"] = [g for g in n["gears"] if g != m["gear"]]
        elif t == "link_up":
            self.links.add(tuple(sorted((m["a"], m["b"]))))
        elif t == "link_down":
            self.links.discard(tuple(sorted((m["a"], m["b"]))))

    def summary(self) -> dict:
        return {
            "nodes": sorted(
                (
                    {"id": n["id"], "name": n["name"], "state": n["state"], "gears": sorted(g["name"] for g in n["gears"])}
                    for n in self.nodes.values()
                ),
                key=lambda n: n["name"],
            ),
            "links": sorted(list(l) for l in self.links),
        }


def load_validator(path: str):
    """A function returning what is wrong with a node's message (empty when it matches the schema)."""
    import jsonschema

    with open(path) as f:
        schema = json.load(f)
    node_only = {**schema, "oneOf": [{"$ref": "#/$defs/node_message"}]}
    validator = jsonschema.Draft202012Validator(node_only)
    # oneOf errors are vague; also check against the definition the message's type names.
    by_type = {}
    for ref in schema["$defs"]["node_message"]["oneOf"]:
        d = schema["$defs"][ref["$ref"].rsplit("/", 1)[1]]
        t = d["properties"]["type"]
        for name in t.get("enum", [t.get("const")]):
            by_type[name] = jsonschema.Draft202012Validator({**schema, **d})

    def check(m: dict) -> str:
        specific = by_type.get(m.get("type"))
        errors = [e.message for e in (specific or validator).iter_errors(m)]
        if specific is None:
            errors.append(f"unknown type {m.get('type')!r}")
        return "; ".join(errors[:3])

    return check


async def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_connection_args(p)
    p.add_argument("--topics", default="", help="comma-separated event topics to follow")
    p.add_argument("--traces", action="store_true", help="follow sampled call traces")
    p.add_argument("--stats", action="store_true", help="follow per-node stats")
    p.add_argument("--seconds", type=float, help="stop after this many seconds")
    p.add_argument("--summary", action="store_true", help="print one JSON summary line at the end")
    p.add_argument("--quiet", action="store_true", help="do not print every message")
    p.add_argument("--validate", metavar="SCHEMA", help="check every message against docs/interface.schema.json")
    args = p.parse_args()
    validate = load_validator(args.validate) if args.validate else None
    invalid = 0

    ws, welcome = await connect(args, scope="observe")
    out = (lambda *a, **k: None) if args.quiet else print
    out(f"connected to {welcome['node']['name']} as {welcome['principal']}", flush=True)
    topics = [t for t in args.topics.split(",") if t]
    await send(ws, type="subscribe", id="watch", topics=topics, traces=args.traces, stats=args.stats)

    model = None
    events, traces, stats_from, lagged = [], 0, set(), 0
    loop = asyncio.get_running_loop()
    stop_at = loop.time() + args.seconds if args.seconds else None
    try:
        while True:
            timeout = None if stop_at is None else max(0.0, stop_at - loop.time())
            try:
                raw = await asyncio.wait_for(ws.recv(), timeout)
            except asyncio.TimeoutError:
                break
            m = json.loads(raw)
            if validate is not None:
                problems = validate(m)
                if problems:
                    invalid += 1
                    print(f"invalid {m.get('type')} message: {problems}", file=sys.stderr, flush=True)
            t = m["type"]
            if t == "snapshot":
                model = MeshModel(m)
                out(f"snapshot: {len(model.nodes)} nodes, {len(model.links)} links", flush=True)
            elif t == "event":
                events.append({"topic": m["topic"], "event": m["event"]})
                out(f"event {m['topic']}: {json.dumps(m['event'])}", flush=True)
            elif t == "trace":
                traces += 1
                out(f"trace {m['gear']}/{m['port']} {m['from'][:8]}->{m['to'][:8]} "
                    f"{m['latency_us']}us {m['outcome']}", flush=True)
            elif t == "stats":
                stats_from.add(m["name"])
                out(f"stats {m['name']}: in flight {m['in_flight']}, links {len(m['links'])}", flush=True)
            elif t == "lagged":
                lagged += 1
                out(f"lagged: {m['dropped']} messages dropped; a fresh snapshot follows", flush=True)
            elif t == "error":
                print(f"error: {m['error']}", file=sys.stderr, flush=True)
            elif model is not None:
                model.apply(m)
                out(f"{t}: {json.dumps({k: v for k, v in m.items() if k not in ('v', 'type')})}", flush=True)
    finally:
        await ws.close()
    if args.summary:
        summary = model.summary() if model else {"nodes": [], "links": []}
        summary.update(events=events, traces=traces, stats_from=sorted(stats_from), lagged=lagged)
        if validate is not None:
            summary["invalid"] = invalid
        print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
