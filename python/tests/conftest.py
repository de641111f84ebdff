"""Fixtures: real kvtierd processes on temp data dirs, and a small random-weight Llama made locally."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvtier.daemon import Kvtierd

ROOT = Path(__file__).resolve().parents[2]
BUILD = Path(os.environ.get("KVTIER_BUILD_DIR", ROOT / "build" / "default"))
KVTIERD = BUILD / "tools" / "kvtierd"
PYTHON_DIR = ROOT / "python"


@pytest.fixture
def daemon_factory(tmp_path):
    if not KVTIERD.exists():
        pytest.fail(f"{KVTIERD} is missing: build the default preset first")
    made: list[Kvtierd] = []

    def make(**kw) -> Kvtierd:
        kw = {"host_bytes": "4MiB", "nvme_bytes": "64MiB", "secret": "kvtier-python-tests", **kw}
        d = Kvtierd(tmp_path / f"kvtierd{len(made)}", binary=str(KVTIERD), **kw)
        made.append(d)
        return d.start()

    yield make
    for d in made:
        d.kill()


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    # fp32: the engine's own matmuls are not batch-invariant (a prefix computed inside a longer
    # prompt rounds differently), and in bf16 that alone can flip a greedy near-tie. kvtier's bytes
    # are exact in every dtype (test_api.py, test_hf_dtypes.py); token identity is checked in fp32.
    from kvtier.hf import random_llama  # a 4-layer Llama with random weights, written locally: no hub

    return random_llama(tmp_path_factory.mktemp("models") / "tiny-llama", dtype="float32")


def worker_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(PYTHON_DIR) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def start_worker(*args: str) -> subprocess.Popen:
    """python/tests/hf_worker.py in its own process (wait with communicate())."""
    return subprocess.Popen([sys.executable, str(Path(__file__).with_name("hf_worker.py")), *args], env=worker_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
