"""The ranking service's processes: one worker, or several on one port, each with a socket of its own.

    serve(settings)                  # `llmfeat serve`: serving.workers processes (0: one per core, at most 4)
    run_workers(settings, pins, n)   # blocks; SIGTERM or SIGINT stops the workers (each drains and flushes)

uvicorn's own `workers=N` shares one listening socket, and whichever worker is awake accepts: a caller that
opens its connection pool at once can land every connection on one worker (seen: 128 kept-alive connections,
all on one of two workers). Here each worker binds its own socket with SO_REUSEPORT, so the kernel spreads new
connections over the workers by a hash of their addresses. A worker loads its models before it binds, so no
connection waits on a worker that is still starting. One that dies is started again; the pinned versions
(serving/arms.py ModelPins) keep every worker on the same models.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import uvicorn

from llmfeat.config import Settings
from llmfeat.registry import resolve, tracking_uri
from llmfeat.runner import quiet_warnings
from llmfeat.serving.arms import ModelPins
from llmfeat.serving.ranking_service import build_app, log_dir

if TYPE_CHECKING:
    from multiprocessing.process import BaseProcess

log = logging.getLogger(__name__)


def serve(settings: Settings) -> None:
    cfg = settings.serving
    workers = cfg.workers or max(1, min(4, (os.cpu_count() or 1)))
    if workers > 1 and not hasattr(socket, "SO_REUSEPORT"):
        log.warning("no SO_REUSEPORT on this platform: one worker")
        workers = 1
    where = f"http://{cfg.host}:{cfg.port}"
    log.info("ranking service on %s, %d worker(s), events in %s", where, workers, log_dir(settings))
    if workers == 1:
        uvicorn.run(
            build_app(settings),
            host=cfg.host,
            port=cfg.port,
            timeout_keep_alive=int(cfg.keep_alive_s),
            log_level="warning",
            access_log=False,
        )
        return
    uri, name = tracking_uri(settings), settings.ctr.registry_name
    aliases = {"champion": cfg.champion_alias, "challenger": cfg.challenger_alias}
    with tempfile.TemporaryDirectory(prefix="llmfeat-serve-") as tmp:
        pins = ModelPins(Path(tmp) / "pins.json")  # every worker loads these versions
        pins.write({arm: resolve(name, alias, uri).version for arm, alias in aliases.items()})
        run_workers(settings, pins, workers)


def reuse_port_socket(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def worker(settings_json: str, pins_path: str) -> None:
    """One worker process: load, bind, serve until SIGTERM."""
    quiet_warnings()  # a spawned process starts with Python's defaults
    settings = Settings.model_validate_json(settings_json)
    cfg = settings.serving
    app = build_app(settings, pins=ModelPins(Path(pins_path)))
    config = uvicorn.Config(
        app, timeout_keep_alive=int(cfg.keep_alive_s), log_level="warning", access_log=False
    )
    uvicorn.Server(config).run(sockets=[reuse_port_socket(cfg.host, cfg.port)])


def run_workers(
    settings: Settings, pins: ModelPins, n: int, check_s: float = 1.0, startup_s: float = 120.0
) -> None:
    """Start `n` workers and keep them running; a worker that exits within `startup_s` of its start stops
    the service (a start that fails, e.g. a missing alias or a port in use, does not heal by retrying)."""
    context = multiprocessing.get_context("spawn")
    args = (settings.model_dump_json(), str(pins.path))
    stopping = False

    started: dict[int, float] = {}

    def start() -> BaseProcess:
        proc = context.Process(target=worker, args=args, name="llmfeat-serve-worker")
        proc.start()
        started[id(proc)] = time.monotonic()
        return proc

    def stop(signum: int, frame: Any) -> None:
        nonlocal stopping
        stopping = True

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    procs = [start() for _ in range(n)]
    try:
        while not stopping:
            time.sleep(check_s)
            for i, proc in enumerate(procs):
                if proc.is_alive() or stopping:
                    continue
                if time.monotonic() - started[id(proc)] < startup_s:  # it never came up: not transient
                    raise RuntimeError(f"a ranking-service worker exited with code {proc.exitcode} at start")
                log.error("worker %s exited with code %s: starting another", proc.pid, proc.exitcode)
                procs[i] = start()
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()  # SIGTERM: uvicorn drains, the event log flushes its last batch
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
                proc.join()
        for s, handler in previous.items():
            signal.signal(s, handler)
