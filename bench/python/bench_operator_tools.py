"""kvtier fsck against reading the same slot files, and kvtier export against copying them to a file
and fsyncing it (what each must do at least), in pairs A B A B on one data dir: the median of the
paired throughput ratios and their spread.

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
        print(f"{blocks} blocks of {layout.bytes_per_block >> 10} KiB ({mib} MiB), page cache warm, 3 pairs each")
        for name, ratios in rows.items():
            limit = "reading the slot files" if name == "fsck" else "copying them to a file + fsync"
            print(f"  kvtier {name} / {limit}: median {statistics.median(ratios):.2f} "
                  f"(spread {min(ratios):.2f}-{max(ratios):.2f})")


if __name__ == "__main__":
    main()
