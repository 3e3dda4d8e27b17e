"""A person at the terminal: `llmfeat --version`, libraries quiet unless -v, progress bars and colours only
on a TTY."""

from __future__ import annotations

import fcntl
import logging
import os
import pty
import struct
import subprocess
import sys
import termios

import numpy as np
import pytest
import torch

from llmfeat.cli import main
from llmfeat.models.trainer import TrainConfig, train_early_stopping
from llmfeat.runner import config_args, setup_logging

pytestmark = pytest.mark.unit

TRAIN = """
import numpy as np, torch
from llmfeat.models.trainer import TrainConfig, train_early_stopping
model = torch.nn.Linear(2, 1)
x, y = torch.randn(64, 2), torch.rand(64)
loss = lambda b: torch.nn.functional.mse_loss(model(x[b]).squeeze(1), y[b])
train_early_stopping(model, np.arange(64), loss, lambda: 0.5, TrainConfig(batch_size=16, max_epochs=3))
"""
# What Feast's materialization prints (feast/feature_store.py: colorama's codes, on any stream), after the
# logging set-up every command makes.
FEAST_COLOURS = """
import sys
from llmfeat.runner import setup_logging
setup_logging()
from colorama import Fore, Style
print(f"Materializing {Style.BRIGHT + Fore.GREEN}2{Style.RESET_ALL} feature views")
print(f"{Style.BRIGHT + Fore.GREEN}user_marc_v1_fv{Style.RESET_ALL}:", file=sys.stderr)
"""


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.startswith("llmfeat 0.")


@pytest.fixture
def quiet_afterwards(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    for name in ("MLFLOW_LOGGING_LEVEL", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"):
        monkeypatch.delenv(name, raising=False)
    yield
    setup_logging(verbose=False)


def test_libraries_only_warn_unless_verbose(quiet_afterwards: None) -> None:
    feast = logging.getLogger("feast.infra.registry.registry")  # "Registry cache expired, so refreshing"
    setup_logging()
    assert not feast.isEnabledFor(logging.INFO) and feast.isEnabledFor(logging.WARNING)
    assert logging.getLogger("llmfeat.spark_jobs.encode").isEnabledFor(logging.INFO)
    assert os.environ["MLFLOW_LOGGING_LEVEL"] == "WARNING"  # for mlflow imported later

    import argparse

    parser = argparse.ArgumentParser()
    config_args(parser)
    parser.parse_args(["-v"])
    assert feast.isEnabledFor(logging.INFO) and logging.getLogger("mlflow").isEnabledFor(logging.INFO)
    setup_logging()  # a later call (each command makes one) keeps -v
    assert feast.isEnabledFor(logging.INFO)


def test_no_progress_bar_without_a_tty(capfd: pytest.CaptureFixture[str]) -> None:
    model = torch.nn.Linear(2, 1)
    x, y = torch.randn(32, 2), torch.rand(32)

    def loss(b: np.ndarray) -> torch.Tensor:
        return torch.nn.functional.mse_loss(model(x[b]).squeeze(1), y[b])

    train_early_stopping(model, np.arange(32), loss, lambda: 0.5, TrainConfig(batch_size=8, max_epochs=3))
    assert capfd.readouterr().err == ""


def test_training_shows_an_epoch_bar_on_a_tty() -> None:
    out = on_a_terminal(TRAIN)
    assert b"epochs:" in out and b"/3 [" in out


def on_a_terminal(code: str) -> bytes:
    """What `python -c code` writes to a terminal (stdout and stderr), 100 columns wide."""
    parent, child = pty.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # rows, columns
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=child, stderr=child)
    os.close(child)
    out = b""
    while True:
        try:
            chunk = os.read(parent, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    os.close(parent)
    assert proc.wait(timeout=120) == 0, out.decode(errors="replace")[-2000:]
    return out


def test_no_colour_codes_in_piped_output() -> None:
    """Output to a file or a pipe (a job's log) carries no escape codes; a terminal keeps its colours."""
    piped = subprocess.run([sys.executable, "-c", FEAST_COLOURS], capture_output=True, timeout=60)
    assert piped.returncode == 0, piped.stderr.decode(errors="replace")
    assert piped.stdout == b"Materializing 2 feature views\n" and piped.stderr == b"user_marc_v1_fv:\n"
    assert b"\x1b[" in on_a_terminal(FEAST_COLOURS)


@pytest.mark.parametrize(
    "command",
    [["training-set"], ["train-ctr", "--both"], ["user-state"], ["bahe", "evaluate"], ["eval-student",
     "--student", "s", "--student-data", "d"], ["distil-student"], ["eval-compression"]],
)  # fmt: skip
def test_every_job_command_validates_its_config_first(
    command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """A job started from the command line reads and checks its settings before any work: exit 2, one line."""
    assert main([*command, "--config", "tiny", "--set", "nope.key=1"]) == 2
    assert "unknown key 'nope'" in capsys.readouterr().err
