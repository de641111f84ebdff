"""Start and stop a kvtierd of your own: for tests, demos, benchmarks and one-machine setups.

    with kvtier.daemon.Kvtierd("/tmp/kv", hf_config="model/config.json", host_bytes="4GiB") as d:
        kv = kvtier.Client(d.socket)

``start()`` returns once the daemon says it serves (its ``--ready-fd``), or raises with its error
output when it exits instead; ``stop()`` sends SIGTERM (every memory-only block is written back to
NVMe first); ``kill()`` SIGKILLs it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any, Mapping

from . import _errors


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def find_kvtierd() -> str:
    """``$KVTIERD``, else ``kvtierd`` on the PATH, else this checkout's build/default/tools/kvtierd."""
    if os.environ.get("KVTIERD"):
        return os.environ["KVTIERD"]
    on_path = shutil.which("kvtierd")
    if on_path:
        return on_path
    here = Path(__file__).resolve().parents[2] / "build" / "default" / "tools" / "kvtierd"
    if here.exists():
        return str(here)
    raise _errors.NotFound("no kvtierd: set $KVTIERD, put it on the PATH, or build the default preset")


class Kvtierd:
    """One kvtierd process on ``data_dir``, configured by a kvtierd.toml written there.

    ``hf_config`` (a config.json) or ``layout`` ({layers, kv_heads, head_dim, dtype, block_tokens})
    sets the KV layout; ``host_bytes``/``nvme_bytes`` size the tiers; ``tenants`` is TOML text of
    ``[[tenant]]`` tables; ``extra`` more top-level or ``[tiers]`` keys as {"tiers.x": v, "x": v}.
    """

    def __init__(self, data_dir: str | os.PathLike[str], hf_config: str | os.PathLike[str] | None = None,
                 layout: Mapping[str, Any] | None = None, block_tokens: int = 16, host_bytes: str = "1GiB",
                 nvme_bytes: str = "4GiB", secret: str = "", tenants: str = "", fdatasync: bool = False,
                 binary: str | None = None, log_level: str = "warn",
                 extra: Mapping[str, Any] | None = None) -> None:
        self._bind(data_dir, binary, log_level)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        top = {"data_dir": str(self.data_dir), "metrics_listen": "", "secret": secret}
        lay: dict[str, Any] = {"block_tokens": block_tokens}
        if hf_config is not None:
            lay["hf_config"] = str(hf_config)
        lay.update(layout or {})
        tiers: dict[str, Any] = {"host_bytes": host_bytes, "nvme_bytes": nvme_bytes, "fdatasync": fdatasync}
        for k, v in (extra or {}).items():
            (tiers if k.startswith("tiers.") else top)[k.removeprefix("tiers.")] = v
        lines = [f"{k} = {_toml_value(v)}" for k, v in top.items()]
        lines += ["[layout]"] + [f"{k} = {_toml_value(v)}" for k, v in lay.items()]
        lines += ["[tiers]"] + [f"{k} = {_toml_value(v)}" for k, v in tiers.items()]
        self.config.write_text("\n".join(lines) + "\n" + tenants)

    def _bind(self, data_dir: str | os.PathLike[str], binary: str | None, log_level: str) -> None:
        """The paths and settings every handle has: data dir, its config and socket, the binary."""
        self.data_dir = Path(data_dir)
        self.config = self.data_dir / "kvtierd.toml"
        self.socket = str(self.data_dir / "kvtierd.sock")
        self.binary = binary or find_kvtierd()
        self.log_level = log_level
        self.proc: subprocess.Popen[str] | None = None

    @classmethod
    def existing(cls, data_dir: str | os.PathLike[str], binary: str | None = None,
                 log_level: str = "warn") -> "Kvtierd":
        """A handle on the kvtierd.toml a Kvtierd already wrote in ``data_dir`` (not started): to
        start that daemon again from another process."""
        self = cls.__new__(cls)
        self._bind(data_dir, binary, log_level)
        if not self.config.is_file():
            raise _errors.NotFound(f"no kvtierd.toml in {self.data_dir}")
        return self

    @property
    def log_path(self) -> Path:
        """kvtierd's log (its stderr), appended to by every start."""
        return self.data_dir / "kvtierd.log"

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> "Kvtierd":
        if self.running:
            return self
        r, w = os.pipe()
        # Its log goes to kvtierd.log in the data dir, not to a pipe: a pipe nobody reads would
        # stall it, and inherited stdout/stderr would keep a caller's own pipes open after it exits.
        log = open(self.log_path, "a")
        try:
            self.proc = subprocess.Popen([self.binary, "--config", str(self.config), "--ready-fd", str(w),
                                          "--log-level", self.log_level],
                                         pass_fds=(w,), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=log, text=True)
        finally:
            log.close()
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
            self.proc.communicate(timeout=60)
            code = self.proc.returncode
            self.proc = None
            raise _errors.Unavailable(f"kvtierd did not start (exit {code}): {self.log_tail()}")
        return self

    def stop(self, timeout: float = 300) -> None:
        """SIGTERM and wait: a graceful shutdown writes every memory-only block back to NVMe."""
        if self.running:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGTERM)
            self.proc.communicate(timeout=timeout)
            if self.proc.returncode != 0:
                raise _errors.Internal(f"kvtierd exited {self.proc.returncode} at SIGTERM: {self.log_tail()}")
        self.proc = None

    def kill(self) -> None:
        if self.running:
            assert self.proc is not None
            self.proc.kill()
            self.proc.communicate(timeout=60)
        self.proc = None

    def restart(self) -> "Kvtierd":
        self.stop()
        return self.start()

    def __enter__(self) -> "Kvtierd":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop() if exc[0] is None else self.kill()
