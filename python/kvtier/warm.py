"""``kvtier warm``: compute the KV of a list of prompts ahead of traffic and store it in kvtierd.

    kvtier warm --model /models/Llama-3.1-8B --prompts prompts.jsonl            # through $KVTIER_SOCKET
    python -m kvtier.warm --model ... --prompts ... --priority retained --json

``prompts.jsonl`` holds one prompt per line: a JSON list of token ids, an object with ``"tokens"``
(a list of token ids), or an object with ``"text"`` (tokenized with the model's own tokenizer).
Blank lines are skipped. The KV is computed by the model with HF transformers (:mod:`kvtier.hf`)
and saved at the priority class ``--priority`` (default ``retained``: warmed prefixes outlast
traffic) in the model's namespace, its weights' revision included. A rerun skips every prompt whose
full blocks are cached already (a lookup), and computes only what a prompt lacks beyond its cached
prefix, so an interrupted warm continues where it stopped.

``--engine vllm`` computes the KV with vLLM itself through kvtier's connector (:mod:`kvtier.warm_vllm`):
the blocks vLLM engines restore, byte for byte. There a cached prompt is restored by the connector
rather than skipped, and vLLM computes at least its last token.

Exit status: 0 every prompt is warmed or was cached already; 1 some prompts failed (the summary says
which and why); 2 bad usage or input (a line that is not a prompt, text without a tokenizer, a model
whose KV layout is not kvtierd's); 3 kvtierd cannot be reached.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from typing import Any, Sequence

import kvtier

from . import _cli
from ._cli import UsageError, read_prompts  # noqa: F401  (read_prompts is part of this module's API)

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNAVAILABLE = 0, 1, 2, 3


@dataclasses.dataclass
class Summary:
    """What a warm did."""
    prompts: int = 0
    warmed: int = 0            # prompts whose missing blocks were computed and saved
    cached: int = 0            # prompts whose full blocks were all cached already: skipped
    short: int = 0             # prompts shorter than one block: nothing to cache
    failed: int = 0
    tokens: int = 0            # tokens over all prompts
    computed_tokens: int = 0   # tokens the model computed
    restored_tokens: int = 0   # tokens of cached prefixes restored instead
    blocks_saved: int = 0      # blocks newly saved
    bytes_saved: int = 0
    blocks_per_tier: dict[str, int] = dataclasses.field(default_factory=dict)  # after the warm
    seconds: float = 0.0
    errors: list[str] = dataclasses.field(default_factory=list)


def warm(store: Any, ns: int, model: Any, prompts: Sequence[Sequence[int]], priority: str = "retained",
         progress: Any = None) -> Summary:
    """Computes and saves the KV of every prompt not fully cached yet (see the module's doc)."""
    import torch

    from . import hf

    bt = store.layout.block_tokens
    bpb = store.layout.bytes_per_block
    device = next(model.parameters()).device
    s = Summary(prompts=len(prompts))
    start = time.perf_counter()
    for i, prompt in enumerate(prompts):
        tokens = list(prompt)
        s.tokens += len(tokens)
        try:
            full = len(tokens) // bt
            if full == 0:
                s.short += 1
                continue
            have, _ = _cli.cached_blocks(store, ns, tokens)
            if have >= full:
                s.cached += 1
                continue
            # The cached prefix is restored, the rest computed: a rerun after an interruption
            # computes only what it lacks.
            restored = hf.restore_cache(store, ns, tokens, model.config, device=device, dtype=model.dtype)
            with torch.no_grad():
                out = model(torch.tensor([tokens[restored.tokens:]], device=device),
                            past_key_values=restored.cache, use_cache=True)
            saved = hf.save_cache(store, ns, tokens, out.past_key_values, first_block=restored.tokens // bt,
                                  priority=priority)
            s.warmed += 1
            s.computed_tokens += len(tokens) - restored.tokens
            s.restored_tokens += restored.tokens
            s.blocks_saved += saved
            s.bytes_saved += saved * bpb
        except kvtier.Unavailable:
            raise
        except kvtier.Error as e:
            s.failed += 1
            s.errors.append(f"prompt {i + 1}: {e}")
        finally:
            if progress is not None:
                progress.update(1)
                progress.set_postfix_str(f"{s.bytes_saved / 2**20:.1f} MiB saved", refresh=False)
    for prompt in prompts:  # where the warmed blocks are now
        if len(prompt) >= bt:
            for tier in _cli.cached_blocks(store, ns, list(prompt))[1]:
                s.blocks_per_tier[tier] = s.blocks_per_tier.get(tier, 0) + 1
    s.seconds = time.perf_counter() - start
    return s


def _print_summary(s: Summary, out: Any) -> None:
    tiers = ", ".join(f"{t} {n}" for t, n in sorted(s.blocks_per_tier.items())) or "none"
    print(f"kvtier warm: {s.prompts} prompts ({s.tokens} tokens) in {s.seconds:.1f} s: {s.warmed} warmed, "
          f"{s.cached} cached already, {s.short} shorter than a block, {s.failed} failed", file=out)
    print(f"  computed {s.computed_tokens} tokens, restored {s.restored_tokens}; saved {s.blocks_saved} blocks "
          f"({s.bytes_saved / 2**20:.1f} MiB); the prompts' blocks now by fastest tier: {tiers}", file=out)
    for e in s.errors:
        print(f"  failed: {e}", file=out)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="kvtier warm", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Exit status: 0 ok, 1 some prompts failed, 2 bad usage or input, "
                                        "3 kvtierd unreachable.")
    ap.add_argument("--model", required=True, help="a Hugging Face model directory (or hub id, offline cache)")
    ap.add_argument("--prompts", required=True, help="JSONL: token-id lists, {\"tokens\": [...]} or {\"text\": ...}")
    ap.add_argument("--socket", default=None, help="kvtierd's socket (default $KVTIER_SOCKET or kvtier's default)")
    ap.add_argument("--tenant", default="", help="the kvtier tenant (default the shared one)")
    ap.add_argument("--adapter", default="", help="a LoRA adapter id the KV belongs to")
    ap.add_argument("--model-id", default=None, help="the namespace's model id (default the config's name)")
    ap.add_argument("--revision", default=None, help="the weights' revision (default a digest of the weight files)")
    ap.add_argument("--priority", default="retained", choices=["low", "normal", "high", "retained"],
                    help="the class the blocks are saved at (default retained)")
    ap.add_argument("--engine", default="hf", choices=["hf", "vllm"],
                    help="the engine that computes the KV: HF transformers (default) or vLLM with kvtier's connector")
    ap.add_argument("--block-size", type=int, default=32,
                    help="--engine vllm: vLLM's block size, a multiple of kvtierd's block_tokens (default 32)")
    ap.add_argument("--device", default="cpu", help="where the model runs (default cpu)")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                    help="the model's dtype (default the checkpoint's)")
    _cli.add_quiet_arg(ap)
    ap.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    args = ap.parse_args(argv)

    try:
        import torch
        from transformers import AutoModelForCausalLM

        from . import hf

        prompts = read_prompts(args.prompts, _cli.tokenizer_of(args))
        if args.engine == "vllm":
            from . import warm_vllm
            summary = warm_vllm.warm(args, prompts, Summary(prompts=len(prompts)))
        else:
            try:
                kw = {"dtype": getattr(torch, args.dtype)} if args.dtype else {}
                model = AutoModelForCausalLM.from_pretrained(args.model, **kw).to(args.device).eval()
            except (OSError, ValueError) as e:
                raise UsageError(f"cannot load the model {args.model}: {e}") from e
            with kvtier.Client(args.socket, name="kvtier-warm") as kv:
                ns = hf.open_namespace(kv, model, tenant=args.tenant, adapter=args.adapter, revision=args.revision,
                                       model_id=args.model_id, prefill_tokens_per_second=0)
                with _cli.progress_bar(args.quiet, "kvtier warm", len(prompts), unit="prompt") as bar:
                    summary = warm(kv, ns, model, prompts, args.priority, bar)
    except (UsageError, kvtier.LayoutMismatch, kvtier.InvalidArgument, kvtier.PermissionDenied) as e:
        print(f"kvtier warm: {e}", file=sys.stderr)
        return EXIT_USAGE
    except kvtier.Unavailable as e:
        print(f"kvtier warm: kvtierd cannot be reached: {e}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    if args.json:
        _cli.print_json(dataclasses.asdict(summary))
    else:
        _print_summary(summary, sys.stdout)
    return EXIT_FAILED if summary.failed else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
