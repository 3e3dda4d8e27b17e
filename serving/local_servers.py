"""Local servers on loopback (tests, benchmarks): a real redis-server and `feast serve`, always stopped."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from llmfeat.feast_repo import feast_cli, store_dir

if TYPE_CHECKING:
    from llmfeat.config import Settings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(ready: Callable[[], bool], proc: subprocess.Popen, what: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} (see its log)")
        if ready():
            return
        time.sleep(0.2)
    raise TimeoutError(f"{what} not ready after {timeout_s:.0f} s")


def stop_process(proc: subprocess.Popen, timeout_s: float = 10) -> None:
    """Terminate a local server, killing it if it does not exit within `timeout_s`."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextmanager
def redis_server(port: int | None = None) -> Iterator[str]:
    """A throwaway redis-server (no persistence) on 127.0.0.1; yields Feast's connection string."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise FileNotFoundError("redis-server not found: apt-get install redis-server (make system-deps)")
    port = port or free_port()
    args = [binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def ping() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    try:
        _wait(ping, proc, "redis-server", 20)
        yield f"127.0.0.1:{port}"
    finally:
        stop_process(proc)


@contextmanager
def feast_serve(
    settings: Settings, port: int | None = None, timeout_s: float = 120, workers: int = 1
) -> Iterator[str]:
    """`feast serve` of feature_repo/ under this profile on 127.0.0.1 (`workers` processes); yields its URL
    once /health answers."""
    port = port or free_port()
    args, env = feast_cli(
        settings, "serve", "-h", "127.0.0.1", "-p", str(port), "--no-access-log", "--workers", str(workers)
    )
    log = open(store_dir(settings) / "feature_server.log", "wb")  # closed in finally
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"

    def health() -> bool:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=1) as resp:
                return bool(resp.status == 200)
        except OSError:
            return False

    try:
        _wait(health, proc, "feast serve", timeout_s)
        yield url
    finally:
        stop_process(proc)
        log.close()
