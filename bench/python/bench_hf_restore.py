"""Time to first token with kvtier's restore against a full recompute, on a real HF transformers
model through a real kvtierd — and the restore alone against one memcpy of the same bytes.

The model is a Llama with random weights and a realistic KV per token: 8 layers x 8 kv heads x 128
head dim in bf16 = 32 KiB per token, so a 4K-token prefix is 128 MiB of KV. For each pair, in the
same run: (a) full recompute (model.generate, max_new_tokens=1, no kvtier), (b) the cached prefix
restored from kvtierd's host tier and only the rest computed, (c) the same from NVMe (kvtierd
restarted before, so its host tier is empty). Then the restore alone (Client.load of the prefix's
blocks into a tensor) against ctypes.memmove of the same bytes, alternated A B A B. Figures are
medians with their spread [min, max] over the pairs.

    .venv/bin/python bench/python/bench_hf_restore.py [--pairs 3] [--prompt-tokens 4112]
"""

from __future__ import annotations

import argparse
import ctypes
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "python"))

import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

import kvtier  # noqa: E402
import kvtier.hf  # noqa: E402
from kvtier.daemon import Kvtierd  # noqa: E402


def spread(xs: list[float]) -> str:
    return f"{statistics.median(xs):.3f} [{min(xs):.3f}, {max(xs):.3f}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--prompt-tokens", type=int, default=4112)
    ap.add_argument("--data-dir", default=os.environ.get("KVTIER_DATA_DIR", "/var/tmp/kvtier-demo"))
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="kvtier-bench-hf-"))
    model_dir = kvtier.hf.random_llama(work / "llama-8x8x128", dtype="bfloat16", layers=8, hidden=1024, heads=8,
                                       kv_heads=8, vocab=2048, intermediate=2048)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    layout = kvtier.hf.layout_for(model)
    rng = random.Random(0)
    prompt = [rng.randrange(2048) for _ in range(args.prompt_tokens)]
    ids = torch.tensor([prompt])
    prefix_blocks = (len(prompt) - 1) // layout.block_tokens
    kv_bytes = prefix_blocks * layout.bytes_per_block
    print(f"kvtier HF restore benchmark: {layout!r}, {layout.bytes_per_token // 1024} KiB/token; prompt "
          f"{len(prompt)} tokens, cached prefix {prefix_blocks * layout.block_tokens} tokens = "
          f"{kv_bytes / 2**20:.0f} MiB of KV; torch threads {torch.get_num_threads()}")

    data_dir = Path(args.data_dir) / "bench-hf"
    if data_dir.exists():
        import shutil
        shutil.rmtree(data_dir)
    daemon = Kvtierd(data_dir, hf_config=model_dir / "config.json", host_bytes="1GiB", nvme_bytes="2GiB").start()
    try:
        kv = kvtier.Client(daemon.socket)
        ns = kvtier.hf.open_namespace(kv, model, model_id="bench/llama-8x8x128")
        _, info = kvtier.hf.generate(kv, ns, model, ids, max_new_tokens=1, do_sample=False)  # warms the cache
        assert info.saved_blocks == len(prompt) // layout.block_tokens, info

        def ttft(fn) -> tuple[float, list[int]]:
            t0 = time.perf_counter()
            out = fn()
            return time.perf_counter() - t0, out

        def recompute():
            return model.generate(ids, max_new_tokens=1, do_sample=False)[0].tolist()

        def restored(client, want_tier):
            out, info = kvtier.hf.generate(client, ns_of[client], model, ids, save=False, max_new_tokens=1,
                                           do_sample=False)
            assert info.restored_tokens == prefix_blocks * layout.block_tokens, info
            assert set(info.tiers) == {want_tier}, info.tiers
            return out[0].tolist()

        ns_of = {kv: ns}
        rec, host, nvme = [], [], []
        for _ in range(args.pairs):
            t_rec, tokens_rec = ttft(recompute)
            t_host, tokens_host = ttft(lambda: restored(kv, "host"))
            kv.close()
            daemon.restart()  # host tier empty: the next restore reads NVMe
            kv = kvtier.Client(daemon.socket)
            ns_of = {kv: kvtier.hf.open_namespace(kv, model, model_id="bench/llama-8x8x128")}
            t_nvme, tokens_nvme = ttft(lambda: restored(kv, "nvme"))
            rec.append(t_rec)
            host.append(t_host)
            nvme.append(t_nvme)
        same = tokens_rec == tokens_host == tokens_nvme
        print(f"  time to first token, s   recompute {spread(rec)}   restored from host {spread(host)}   "
              f"from NVMe {spread(nvme)}")
        print(f"  speed-up over recompute  host {spread([r / h for r, h in zip(rec, host)])}x   "
              f"NVMe {spread([r / n for r, n in zip(rec, nvme)])}x   first token equal: {same}")

        # The restore alone, against one memcpy of the same bytes, alternated (every buffer
        # pre-touched): into memory shared with kvtierd (Client.shared_host, what kvtier.hf uses:
        # one copy, daemon -> tensor), and into a plain tensor (through the window: two copies).
        with kv.lookup(ns_of[kv], prompt[:-1]) as match:
            elements = layout.bytes_per_block // 2
            shared = torch.from_numpy(kv.shared_host(kv_bytes)).view(torch.bfloat16).view(prefix_blocks, elements)
            plain = torch.ones((prefix_blocks, elements), dtype=torch.bfloat16)
            shared.fill_(1)
            src = torch.ones_like(plain)
            mdst = torch.ones_like(plain)
            figures: dict[str, tuple[list[float], list[float], list[float]]] = {"shared": ([], [], []),
                                                                                 "window": ([], [], [])}
            for _ in range(max(5, 2 * args.pairs + 1)):
                for name, dst in (("shared", shared), ("window", plain)):
                    t0 = time.perf_counter()
                    kv.load(match, dst).wait()
                    t_load = time.perf_counter() - t0
                    t0 = time.perf_counter()
                    ctypes.memmove(mdst.data_ptr(), src.data_ptr(), kv_bytes)
                    t_copy = time.perf_counter() - t0
                    loads, copies, ratios = figures[name]
                    loads.append(kv_bytes / t_load / 1e9)
                    copies.append(kv_bytes / t_copy / 1e9)
                    ratios.append(t_copy / t_load)
            assert torch.equal(shared, plain)
        for name, label in (("shared", "into shared host memory"), ("window", "through the window  ")):
            loads, copies, ratios = figures[name]
            print(f"  restore alone {label}: {spread(loads)} GB/s; memcpy {spread(copies)} GB/s; "
                  f"ratio {spread(ratios)}" + (" (goal >= 0.8)" if name == "shared" else ""))
        kv.close()
    finally:
        daemon.stop()
        import shutil
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
