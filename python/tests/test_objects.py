"""Key-addressed objects from Python: put by one process, got by another through a real kvtierd,
kept across a restart; the same calls on the in-process Store; bad input refused."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

import kvtier
from conftest import worker_env

LAYOUT = {"layers": 2, "kv_heads": 2, "head_dim": 16, "dtype": "fp16", "block_tokens": 16}  # 2 KiB blocks

PUT_IN_ANOTHER_PROCESS = """
import sys, kvtier
with kvtier.Client(sys.argv[1]) as c:
    ns = c.open_namespace("objects/model")
    print(c.object_put(ns, b"page\\x00one", bytes(range(256)) * 20))
"""


@pytest.fixture
def daemon(daemon_factory):
    return daemon_factory(layout=LAYOUT, host_bytes="1MiB", nvme_bytes="8MiB")


def test_an_object_put_by_one_process_is_got_by_another_and_kept_across_a_restart(daemon):
    page = bytes(range(256)) * 20  # 5120 bytes: 3 blocks with the length
    out = subprocess.run([sys.executable, "-c", PUT_IN_ANOTHER_PROCESS, str(daemon.socket)], env=worker_env(),
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"
    with kvtier.Client(daemon.socket) as c:
        ns = c.open_namespace("objects/model")
        assert c.object_get(ns, b"page\x00one") == page
        assert c.object_exists(ns, [b"page\x00one", b"absent", b"page\x00one"]) == 1
        assert c.object_put(ns, b"page\x00one", b"other bytes") is False  # stored: kept
        # Into the caller's memory: a tensor, a numpy array.
        t = torch.zeros(8192, dtype=torch.uint8)
        assert c.object_get(ns, b"page\x00one", out=t) == len(page)
        assert bytes(t[:len(page)].numpy()) == page
        a = np.zeros(len(page), dtype=np.uint8)
        assert c.object_get(ns, b"page\x00one", out=a) == len(page)
        assert a.tobytes() == page
        assert c.object_get(ns, "absent") is None
        c.object_put(ns, "a str key", torch.arange(100, dtype=torch.float32))  # any host tensor
        metrics = c.metrics()
        assert metrics["kvtier_object_puts_total"] == 2
        assert metrics['kvtier_object_gets_total{result="hit"}'] == 3
        assert metrics['kvtier_object_gets_total{result="miss"}'] == 1
    daemon.restart()  # a graceful stop and a start: from NVMe now
    with kvtier.Client(daemon.socket) as c:
        ns = c.open_namespace("objects/model")
        assert c.object_get(ns, b"page\x00one") == page
        assert c.object_get(ns, "a str key") == torch.arange(100, dtype=torch.float32).numpy().tobytes()
        assert c.object_remove(ns, ["a str key", "never put"]) == 1
        assert c.object_get(ns, "a str key") is None


def test_bad_object_input_is_refused_and_the_connection_stays_good(daemon):
    with kvtier.Client(daemon.socket, window_bytes=64 << 10) as c:
        ns = c.open_namespace("objects/model")
        with pytest.raises(kvtier.InvalidArgument, match="window"):
            c.object_put(ns, "big", bytes(64 << 10))  # the length pushes it past the window
        with pytest.raises(kvtier.InvalidArgument, match="1 to 1024 bytes"):
            c.object_put(ns, b"", b"x")
        with pytest.raises(kvtier.InvalidArgument, match="1 to 1024 bytes"):
            c.object_get(ns, b"k" * 1025)
        with pytest.raises(kvtier.NotFound):
            c.object_put(ns + 7, "k", b"x")  # a namespace this connection did not open
        assert c.object_put(ns, "k", b"12345")
        with pytest.raises(kvtier.InvalidArgument, match="5 bytes"):
            c.object_get(ns, "k", out=bytearray(4))
        assert c.object_get(ns, "k") == b"12345"


def test_the_in_process_store_keeps_objects_on_nvme_across_a_reopen(tmp_path):
    layout = kvtier.KvLayout.standard(2, 2, 16, "fp16", 16)
    data = np.random.default_rng(3).integers(0, 256, 10_000, dtype=np.uint8)
    with kvtier.Store(layout, "256KiB", nvme_dir=tmp_path, nvme_bytes="4MiB", secret="s") as s:
        ns = s.open_namespace("objects/model")
        assert s.object_put(ns, "chunk-0", data)
        assert s.object_get(ns, "chunk-0") == data.tobytes()
    with kvtier.Store(layout, "256KiB", nvme_dir=tmp_path, nvme_bytes="4MiB", secret="s") as s:
        ns = s.open_namespace("objects/model")
        assert s.object_exists(ns, ["chunk-0"]) == 1
        assert s.object_get(ns, "chunk-0") == data.tobytes()
