"""``kvtier doctor``: explain why a prompt's lookup missed (or hit less than expected).

    kvtier doctor --model /models/Llama-3.1-8B --tokens 1,2,3,...        # the namespace an engine uses
    kvtier doctor --model-id org/model --revision abc --tenant team-a --prompts prompts.jsonl --json

For each prompt it says which namespace it resolves to (model id, tenant, adapter, revision: all four
are in the keys), how many full blocks it has (a partial tail is never cached), how much is cached
and where, and where the chain breaks and why:

- ``evicted``: the block after the cached prefix was evicted lately, and from which tier (the tier
  that held its last copy: from host, it was never written to NVMe);
- ``other_tenant`` / ``other_revision`` / ``other_adapter`` / ``other_model`` /
  ``other_namespace``: the prompt is cached in a namespace differing in that, which never shares;
- ``block_size`` / ``layout``: the engine's page size or KV layout is not kvtierd's;
- ``never_saved``: no namespace kvtierd knows holds it;
- ``all_cached`` / ``shorter_than_a_block``: nothing missed.

It only looks: no lease is taken and no hit is counted. Through kvtierd it is for operators (root or
kvtierd's own uid), since it sees every tenant.

Exit status: 0 every prompt is cached as far as it can be; 1 some prompt misses (each is explained);
2 bad usage or input; 3 kvtierd cannot be reached; 4 kvtierd refused (not an operator).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Sequence

import kvtier

from . import _cli
from ._cli import UsageError

EXIT_OK, EXIT_MISSES, EXIT_USAGE, EXIT_UNAVAILABLE, EXIT_REFUSED = 0, 1, 2, 3, 4
NOTHING_MISSED = ("all_cached", "shorter_than_a_block")


def explain(store: Any, tokens: Sequence[int], ns: dict[str, str], engine_block_tokens: int = 0,
            engine_layout_fingerprint: int = 0) -> dict[str, Any]:
    """One prompt's diagnosis (the fields of ``--json``, docs/operations.md)."""
    return store.doctor(list(tokens), ns["model"], ns["tenant"], ns["adapter"], ns["revision"],
                        engine_block_tokens, engine_layout_fingerprint)


def _print(d: dict[str, Any], n: int, out: Any) -> None:
    ns = d["namespace"]
    print(f"prompt {n}: {d['tokens']} tokens = {d['full_blocks']} full blocks of {d['block_tokens']}"
          + (f" + a partial tail of {d['tail_tokens']} (never cached)" if d["tail_tokens"] else ""), file=out)
    print(f"  namespace: model '{ns['model']}', tenant '{ns['tenant']}', adapter '{ns['adapter']}', "
          f"revision '{ns['revision']}' ({'known to kvtierd' if ns['known'] else 'never opened on kvtierd'})",
          file=out)
    tiers = ", ".join(f"{t} {c}" for t, c in d["hit_blocks_by_fastest_tier"].items() if c) or "nowhere"
    print(f"  cached: {d['hit_blocks']} of {d['full_blocks']} blocks ({d['hit_tokens']} tokens; by fastest tier: "
          f"{tiers})", file=out)
    print(f"  {d['cause']}: {d['explanation']}", file=out)
    for a in d["alternatives"]:
        print(f"  elsewhere: {a['hit_blocks']} blocks under model '{a['model']}', tenant '{a['tenant']}', adapter "
              f"'{a['adapter']}', revision '{a['revision']}' (differs in {', '.join(a['differs'])})", file=out)
    if d["would_hit_blocks"] > d["hit_blocks"]:
        print(f"  with that namespace the hit would be {d['would_hit_blocks']} blocks", file=out)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="kvtier doctor", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Exit status: 0 nothing missed, 1 some prompt misses, 2 bad usage or input, "
                                        "3 kvtierd unreachable, 4 not an operator.")
    _cli.add_namespace_args(ap)
    which = ap.add_mutually_exclusive_group(required=True)
    which.add_argument("--tokens", help="one prompt: comma-separated token ids")
    which.add_argument("--prompts", help="JSONL prompts, as kvtier warm reads them")
    ap.add_argument("--block-tokens", type=int, default=0,
                    help="the engine's block (page) size, when it is not kvtierd's: a multiple of it is fine")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                    help="with --model: the dtype the engine runs it in (checks the KV layout against kvtierd's)")
    ap.add_argument("--socket", default=None, help="kvtierd's socket (default $KVTIER_SOCKET or kvtier's default)")
    ap.add_argument("--json", action="store_true", help="one JSON object: {\"prompts\": [diagnosis, ...]}")
    args = ap.parse_args(argv)
    try:
        ns, config = _cli.namespace_of(args)
        if args.tokens is not None:
            try:
                prompts = [[int(t) for t in args.tokens.split(",") if t.strip()]]
            except ValueError as e:
                raise UsageError(f"--tokens: {e}") from e
        else:
            prompts = _cli.read_prompts(args.prompts, _cli.tokenizer_of(args))
        with kvtier.Client(args.socket, name="kvtier-doctor") as kv:
            fingerprint = 0
            if config is not None:
                from . import hf
                # In kvtierd's block size: a page size of another multiple is --block-tokens' check.
                fingerprint = hf.layout_for(config, kv.layout.block_tokens, dtype=args.dtype).fingerprint
            results = [explain(kv, p, ns, args.block_tokens, fingerprint) for p in prompts]
    except (UsageError, kvtier.InvalidArgument, kvtier.NotFound) as e:
        print(f"kvtier doctor: {e}", file=sys.stderr)
        return EXIT_USAGE
    except kvtier.PermissionDenied as e:
        print(f"kvtier doctor: {e}", file=sys.stderr)
        return EXIT_REFUSED
    except kvtier.Unavailable as e:
        print(f"kvtier doctor: kvtierd cannot be reached: {e}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    if args.json:
        _cli.print_json({"prompts": results})
    else:
        for n, d in enumerate(results, 1):
            _print(d, n, sys.stdout)
    return EXIT_OK if all(d["cause"] in NOTHING_MISSED for d in results) else EXIT_MISSES


if __name__ == "__main__":
    sys.exit(main())
