"""``kvtier warm --engine vllm``: the prompts' KV computed by vLLM itself, saved into kvtierd through
kvtier's vLLM connector (:mod:`kvtier.vllm`), so the blocks are exactly the ones that vLLM engines
with the connector restore (vLLM's CPU "vec" path stores kvtier's canonical layout, which HF shares;
other attention paths keep their own namespace).

The engine runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so the warm can wait for the
connector's asynchronous saves before it reports. Each prompt is prefilled once (one output token);
what kvtierd holds already is loaded by the connector instead of computed, so a rerun computes
only what a prompt lacks (at most its last block: vLLM computes at least one token).
"""

from __future__ import annotations

import os
import time
from typing import Any, Sequence

import kvtier

from ._cli import UsageError


def _saved_blocks(socket: str | None) -> float:
    with kvtier.Client(socket, name="kvtier-warm") as kv:
        return kv.metrics().get("kvtier_saved_blocks_total", 0.0)


def warm(args: Any, prompts: Sequence[Sequence[int]], summary: Any) -> Any:
    """Fills ``summary`` (kvtier.warm.Summary) for ``prompts`` warmed with vLLM per ``args``."""
    if args.adapter:
        raise UsageError("--adapter with --engine vllm: LoRA adapters are not warmed through vLLM yet")
    if args.device != "cpu":
        raise UsageError("--engine vllm runs on vLLM's CPU backend here (--device cpu)")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the worker's connector in this process
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig
    from vllm.distributed.kv_transfer import get_kv_transfer_group
    from vllm.inputs import TokensPrompt

    extra: dict[str, Any] = {"priority": args.priority, "tenant": args.tenant, "prefill_tokens_per_second": 0}
    if args.socket:
        extra["socket"] = args.socket
    if args.model_id:
        extra["model"] = args.model_id
    if args.revision is not None:
        extra["revision"] = args.revision
    before = _saved_blocks(args.socket)  # also: kvtierd is there before the engine starts
    start = time.perf_counter()
    llm = LLM(model=args.model, skip_tokenizer_init=True, enforce_eager=True, dtype=args.dtype or "auto",
              block_size=args.block_size, enable_prefix_caching=False, seed=0,
              kv_transfer_config=KVTransferConfig(kv_connector="KvtierConnector",
                                                  kv_connector_module_path="kvtier.vllm", kv_role="kv_both",
                                                  kv_connector_extra_config=extra))
    params = SamplingParams(temperature=0, max_tokens=1, detokenize=False)
    outs = llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params,
                        use_tqdm=not args.quiet)
    get_kv_transfer_group().wait_for_saves()
    with kvtier.Client(args.socket, name="kvtier-warm") as kv:
        bt = kv.layout.block_tokens
        bpb = kv.layout.bytes_per_block
    for p, o in zip(prompts, outs):
        n = len(p)
        restored = o.num_cached_tokens or 0
        summary.tokens += n
        summary.restored_tokens += restored
        summary.computed_tokens += n - restored
        if n < bt:
            summary.short += 1
        elif restored >= (n - 1) // args.block_size * args.block_size:
            summary.cached += 1  # all vLLM could restore; it computes the rest itself
        else:
            summary.warmed += 1
    summary.blocks_saved = int(_saved_blocks(args.socket) - before)
    summary.bytes_saved = summary.blocks_saved * bpb
    summary.seconds = time.perf_counter() - start
    return summary
