"""Connecting to a gearmesh node's WebSocket interface (/v1/mesh) from Python.

Shared by observer.py and gear.py. Needs the `websockets` package, and `PyJWT` when a token is
minted here from a key file (--key) instead of given (--token).
"""

import argparse
import json
import ssl
import time

import websockets


def add_connection_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", required=True, help="wss://host:port/v1/mesh (ws:// only for --insecure-dev nodes)")
    p.add_argument("--cafile", help="CA certificate to trust (the node's dev-ca.crt in development)")
    p.add_argument("--token", help="a bearer token (JWT)")
    p.add_argument("--key", help="an HS256 secret file to mint a token with PyJWT instead of --token")
    p.add_argument("--aud", help="audience of the minted token (the node's auth.audience)")
    p.add_argument("--sub", default="python", help="subject of the minted token")


def token_from(args: argparse.Namespace, scope: str) -> str | None:
    """The token to present: --token, or one minted with PyJWT from --key (valid one hour)."""
    if args.token:
        return args.token
    if not args.key:
        return None
    import jwt  # PyJWT: an independent implementation, so the node's verifier is checked against it

    with open(args.key, "rb") as f:
        secret = f.read().strip()
    now = int(time.time())
    claims = {"sub": args.sub, "iat": now, "exp": now + 3600, "scope": scope}
    if args.aud:
        claims["aud"] = args.aud
    return jwt.encode(claims, secret, algorithm="HS256")


async def connect(args: argparse.Namespace, scope: str):
    """Opens the interface and returns (socket, welcome message)."""
    ssl_ctx = None
    if args.url.startswith("wss://"):
        ssl_ctx = ssl.create_default_context(cafile=args.cafile)
    headers = {}
    token = token_from(args, scope)
    if token:
        headers["Authorization"] = f"Bearer {token}"
    ws = await websockets.connect(
        args.url, ssl=ssl_ctx, subprotocols=["gearmesh.v1"], additional_headers=headers, max_size=2**22
    )
    welcome = json.loads(await ws.recv())
    if welcome.get("type") != "welcome":
        raise RuntimeError(f"expected welcome, got {welcome}")
    return ws, welcome


async def send(ws, **msg) -> None:
    await ws.send(json.dumps({"v": 1, **msg}))
