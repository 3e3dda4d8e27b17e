"""Load shedding for the ranking service: beyond capacity, answer 503 with Retry-After at once instead of
queueing requests until they time out.

A worker runs one event loop and scores on it. `Admission` wraps the ASGI app; a request to a guarded path
(POST /rank) is admitted, then waits its turn: one guarded request at a time holds the turn (a FIFO lock), and
between two turns the loop reads whatever arrived meanwhile, so the requests waiting for the worker are
counted here rather than piling up unseen in socket buffers. A request is answered 503 at once
  - on arrival, when `max_inflight` requests are already admitted (waiting or being scored) in this worker;
  - at its turn, when it waited more than `max_wait_ms` for it (it would only be scored late).
Both answers carry `Retry-After: <retry_after_s>`. The first bounds the queue, the second the time spent in
it, whatever a request's size (a 1,000-candidate request costs ten 100-candidate ones). Once the load drops,
the count and the waits fall and every request is served again. Other paths (health, clicks, reloads) are
never shed and do not wait for the turn.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]


class Admission:
    def __init__(
        self,
        app: App,
        max_inflight: int,
        max_wait_ms: float,
        retry_after_s: int = 1,
        guarded: tuple[str, ...] = ("/rank",),
    ):
        self.app, self.guarded = app, guarded
        self.max_inflight, self.max_wait_s, self.retry_after_s = (
            max_inflight,
            max_wait_ms / 1000,
            retry_after_s,
        )
        self.inflight = 0  # admitted guarded requests: waiting for the turn or holding it
        self.shed = {"inflight": 0, "waited": 0}  # 503s by reason, since start
        self._turn = asyncio.Lock()  # FIFO: waiters are woken in arrival order

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in self.guarded:
            await self.app(scope, receive, send)
            return
        if self.inflight >= self.max_inflight:
            self.shed["inflight"] += 1
            await self._overloaded(send, f"{self.inflight} requests in flight")
            return
        self.inflight += 1
        admitted = time.perf_counter()
        try:
            await asyncio.sleep(0)  # those that arrived with this one are admitted before any is scored
            async with self._turn:
                waited = time.perf_counter() - admitted
                if waited > self.max_wait_s:
                    self.shed["waited"] += 1
                    await self._overloaded(send, f"waited {waited * 1000:.0f} ms for the worker")
                    return
                await self.app(scope, receive, send)
        finally:
            self.inflight -= 1

    async def _overloaded(self, send: Send, why: str) -> None:
        body = json.dumps({"detail": f"overloaded ({why}): retry after {self.retry_after_s} s"}).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"retry-after", str(self.retry_after_s).encode()),
        ]
        await send({"type": "http.response.start", "status": 503, "headers": headers})
        await send({"type": "http.response.body", "body": body})
