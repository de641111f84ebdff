"""Fixtures: a real kvtierd on a temp data dir, and a small random-weight Llama made locally."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BUILD = Path(os.environ.get("KVTIER_BUILD_DIR", ROOT / "build" / "default"))
KVTIERD = BUILD / "tools" / "kvtierd"
PYTHON_DIR = ROOT / "python"


class Daemon:
    """kvtierd in a subprocess: start() returns once it writes 'ready' on --ready-fd."""

    def __init__(self, data_dir: Path, hf_config: Path | None = None, host_bytes: str = "4MiB",
                 nvme_bytes: str = "64MiB", layout: dict | None = None, tenants: str = "",
                 block_tokens: int = 16) -> None:
        self.data_dir = data_dir
        self.socket = str(data_dir / "kvtierd.sock")
        data_dir.mkdir(parents=True, exist_ok=True)
        if hf_config is not None:
            layout_toml = f'hf_config = "{hf_config}"\nblock_tokens = {block_tokens}'
        else:
            layout_toml = "\n".join(f"{k} = {v!r}".replace("'", '"') for k, v in (layout or {}).items())
        self.config = data_dir / "kvtierd.toml"
        self.config.write_text(textwrap.dedent(f"""\
            data_dir = "{data_dir}"
            metrics_listen = ""
            secret = "kvtier-python-tests"
            [layout]
            {layout_toml}
            [tiers]
            host_bytes = "{host_bytes}"
            nvme_bytes = "{nvme_bytes}"
            fdatasync = false
            """) + tenants)
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Daemon":
        r, w = os.pipe()
        self.proc = subprocess.Popen([str(KVTIERD), "--config", str(self.config), "--ready-fd", str(w),
                                      "--log-level", "warn"], pass_fds=(w,), stderr=subprocess.PIPE, text=True)
        os.close(w)
        got = b""
        try:
            while b"ready" not in got:
                chunk = os.read(r, 64)  # blocks until kvtierd writes, or exits (EOF)
                if not chunk:
                    break
                got += chunk
        finally:
            os.close(r)
        if b"ready" not in got:
            err = self.proc.communicate(timeout=60)[1]
            raise RuntimeError(f"kvtierd did not start (exit {self.proc.returncode}): {err}")
        return self

    def stop(self) -> None:
        """SIGTERM: a graceful shutdown writes every memory-only block back to NVMe."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            _, err = self.proc.communicate(timeout=120)
            assert self.proc.returncode == 0, f"kvtierd exited {self.proc.returncode}: {err}"
        self.proc = None

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate(timeout=60)
        self.proc = None

    def restart(self) -> "Daemon":
        self.stop()
        return self.start()


@pytest.fixture
def daemon_factory(tmp_path):
    if not KVTIERD.exists():
        pytest.fail(f"{KVTIERD} is missing: build the default preset first")
    made: list[Daemon] = []

    def make(**kw) -> Daemon:
        d = Daemon(tmp_path / f"kvtierd{len(made)}", **kw)
        made.append(d)
        return d.start()

    yield make
    for d in made:
        d.kill()


def make_tiny_llama(path: Path, dtype: str = "bfloat16", layers: int = 4, hidden: int = 256, heads: int = 4,
                    kv_heads: int = 2, vocab: int = 1024, seed: int = 0) -> Path:
    """A Llama-architecture model with random weights, written with safetensors: no hub."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=4096, initializer_range=0.2, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    # fp32: the engine's own matmuls are not batch-invariant (a prefix computed inside a longer
    # prompt rounds differently), and in bf16 that alone can flip a greedy near-tie. kvtier's bytes
    # are exact in every dtype (test_api.py, test_hf_dtypes.py); token identity is checked in fp32.
    return make_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama", dtype="float32")


def worker_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(PYTHON_DIR) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def run_worker(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """python/tests/hf_worker.py in its own process."""
    return subprocess.run([sys.executable, str(Path(__file__).with_name("hf_worker.py")), *args],
                          env=worker_env(), capture_output=True, text=True, check=check, timeout=600)
