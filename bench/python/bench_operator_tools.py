"""kvtier fsck against reading the same slot files, and kvtier export against copying them to a file
and fsyncing it (what each must do at least), in pairs A B A B on one data dir; and kvtier export
through a running kvtierd against loading the same prompts through a client and writing them to a
file with fsync (the daemon's own fastest way out): the median of the paired throughput ratios and
their spread.

    .venv/bin/python bench/python/bench_operator_tools.py [MiB]     # default 256 MiB of KV
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "python"))
import kvtier  # noqa: E402
from kvtier import _native, export  # noqa: E402
from kvtier.daemon import Kvtierd  # noqa: E402


def read_all(nvme: Path) -> int:
    n = 0
    for p in sorted(nvme.glob("slots.*")):
        with open(p, "rb", buffering=0) as f:
            while chunk := f.read(8 << 20):
                n += len(chunk)
    return n


def copy_all(nvme: Path, out: Path) -> int:
    n = 0
    with open(out, "wb") as w:
        for p in sorted(nvme.glob("slots.*")):
            with open(p, "rb", buffering=0) as f:
                while chunk := f.read(8 << 20):
                    n += w.write(chunk)
        w.flush()
        os.fsync(w.fileno())
    return n


def main() -> None:
    mib = int(sys.argv[1]) if len(sys.argv) > 1 else 256
    layout = kvtier.KvLayout.standard(8, 8, 128, "bf16", 16)  # 512 KiB blocks
    blocks = mib * 2**20 // layout.bytes_per_block
    with tempfile.TemporaryDirectory() as tmp:
        nvme = Path(tmp) / "nvme"
        rng = np.random.default_rng(0)
        with kvtier.Store(layout, "64MiB", nvme_dir=nvme, nvme_bytes=f"{mib + 64}MiB", write_through=True) as s:
            ns = s.open_namespace("bench")
            for p in range(0, blocks, 8):  # prompts of 8 blocks
                n = min(8, blocks - p)
                kv = rng.integers(0, 255, size=(n, layout.bytes_per_block), dtype=np.uint8)
                s.save(ns, list(range(p * 16, (p + n) * 16)), kv)
        rows = {"fsck": [], "export": []}
        for _ in range(3):
            for name in rows:
                t0 = time.perf_counter()
                raw = read_all(nvme) if name == "fsck" else copy_all(nvme, Path(tmp) / "copy")
                t_read = time.perf_counter() - t0
                t0 = time.perf_counter()
                if name == "fsck":
                    r = _native.check_nvme_tier(str(nvme))
                    assert r["errors"] == 0 and r["good_blocks"] == blocks
                    done = r["bytes_read"]
                else:
                    e = export.export_data_dir(str(nvme), str(Path(tmp) / "a.kvtar"))
                    assert e.blocks == blocks
                    done = e.bytes
                t_tool = time.perf_counter() - t0
                rows[name].append((done / t_tool) / (raw / t_read))
        rows["export via kvtierd"] = daemon_pairs(Path(tmp), layout, blocks, mib)
        print(f"{blocks} blocks of {layout.bytes_per_block >> 10} KiB ({mib} MiB), page cache warm, 3 pairs each")
        limits = {"fsck": "reading the slot files", "export": "copying them to a file + fsync",
                  "export via kvtierd": "loading the prompts through a client + write + fsync"}
        for name, ratios in rows.items():
            limit = limits[name]
            print(f"  kvtier {name} / {limit}: median {statistics.median(ratios):.2f} "
                  f"(spread {min(ratios):.2f}-{max(ratios):.2f})")


def daemon_pairs(tmp: Path, layout: kvtier.KvLayout, blocks: int, mib: int) -> list[float]:
    """Export through a kvtierd holding the blocks in host DRAM, paired with loading them."""
    lay = {"layers": layout.num_layers, "kv_heads": layout.num_kv_heads, "head_dim": layout.head_dim,
           "dtype": layout.dtype}
    rng = np.random.default_rng(1)
    ratios = []
    with Kvtierd(tmp / "daemon", layout=lay, host_bytes=f"{mib + 64}MiB", nvme_bytes=f"{mib + 64}MiB") as d:
        with kvtier.Client(d.socket) as c:
            ns = c.open_namespace("bench")
            prompts = []
            for p in range(0, blocks, 8):
                n = min(8, blocks - p)
                prompts.append(list(range(p * 16, (p + n) * 16)))
                c.save(ns, prompts[-1], rng.integers(0, 255, size=(n, layout.bytes_per_block), dtype=np.uint8))
            buf = np.empty((8, layout.bytes_per_block), dtype=np.uint8)
            for _ in range(3):
                t0 = time.perf_counter()
                raw = 0
                with open(tmp / "loaded", "wb") as w:
                    for t in prompts:
                        with c.lookup(ns, t) as m:
                            c.load(m, buf[: m.block_count]).wait()
                            raw += w.write(buf[: m.block_count].tobytes())
                    w.flush()
                    os.fsync(w.fileno())
                t_load = time.perf_counter() - t0
                t0 = time.perf_counter()
                e = export.export_daemon(c, str(tmp / "d.kvtar"))
                t_export = time.perf_counter() - t0
                assert e.blocks == blocks and raw == e.bytes
                ratios.append((e.bytes / t_export) / (raw / t_load))
    return ratios


if __name__ == "__main__":
    main()
