"""What FastAPI adds to a /rank request, in-process: the CPU of routing, body parsing, pydantic validation
and the response object, against a bare ASGI handler that does the same parse (`model_validate_json`) and
sends the same bytes. Both answer a fixed 100-item reply, so only the framework differs; no socket, no
uvicorn (results: docs/benchmarks.md, "Fresh state: pushed events").

    .venv/bin/python bench/http_overhead.py [--calls 3000] [--candidates 100]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

from fastapi import FastAPI, Response

from llmfeat.serving.ranking_service import RankRequest


def apps(reply: bytes) -> dict[str, Any]:
    app = FastAPI()

    @app.post("/rank")
    async def rank_endpoint(req: RankRequest) -> Response:
        return Response(reply, media_type="application/json")

    async def bare(scope: Any, receive: Any, send: Any) -> None:
        body, more = b"", True
        while more:
            message = await receive()
            body, more = body + message.get("body", b""), message.get("more_body", False)
        RankRequest.model_validate_json(body)
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(reply)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": reply})

    return {"fastapi": app, "bare ASGI": bare}


async def cpu_per_call(app: Any, body: bytes, calls: int) -> float:
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": "/rank", "raw_path": b"/rank", "root_path": "", "query_string": b"",
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 8000), "state": {},
    }  # fmt: skip

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        assert message.get("status", 200) == 200, message

    async def call() -> None:
        await app(dict(scope), receive, send)

    for _ in range(200):  # warm-up
        await call()
    start = time.process_time()
    for _ in range(calls):
        await call()
    return (time.process_time() - start) / calls


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--candidates", type=int, default=100)
    args = parser.parse_args()
    ids = [str(i) for i in range(args.candidates)]
    body = json.dumps({"user_id": "196", "item_ids": ids}).encode()
    items = [{"item_id": i, "score": 0.5, "rank": r} for r, i in enumerate(ids)]
    reply = json.dumps({"items": items}).encode()
    for round_ in (1, 2, 3):
        cpu = {name: asyncio.run(cpu_per_call(app, body, args.calls)) for name, app in apps(reply).items()}
        added = (cpu["fastapi"] - cpu["bare ASGI"]) * 1e6
        shown = ", ".join(f"{name} {s * 1e6:.0f} us" for name, s in cpu.items())
        print(f"round {round_}: {shown}, FastAPI adds {added:.0f} us of CPU per request")


if __name__ == "__main__":
    main()
