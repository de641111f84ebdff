"""``kvtier prefetch``: promote warmed prefixes to a faster tier before a traffic peak.

    kvtier prefetch --model /models/Llama-3.1-8B --prompts peak.jsonl --to host
    python -m kvtier.prefetch --model-id org/model --revision abc --prompts peak.jsonl --to hbm --json

Each prompt's cached prefix (full blocks, in the namespace the flags name as ``kvtier warm`` does)
is copied up into ``--to`` from the fastest tier that holds it: NVMe → host DRAM, or host/NVMe → HBM.
Blocks there already are not copied again. The summary says how many blocks moved and where the
prompts' blocks are now.

Exit status: 0 ok; 2 bad usage or input; 3 kvtierd cannot be reached.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from typing import Any, Sequence

import kvtier

from . import _cli
from ._cli import UsageError

EXIT_OK, EXIT_USAGE, EXIT_UNAVAILABLE = 0, 2, 3


@dataclasses.dataclass
class Summary:
    prompts: int = 0
    cached_blocks: int = 0        # the prompts' cached full blocks (each prompt counted on its own)
    moved_blocks: int = 0         # blocks copied up into the target tier
    moved_bytes: int = 0
    uncached_prompts: int = 0     # prompts with no cached block: nothing to move
    blocks_per_tier: dict[str, int] = dataclasses.field(default_factory=dict)  # fastest tier, after
    seconds: float = 0.0


def prefetch(store: Any, ns: int, prompts: Sequence[Sequence[int]], to: str, progress: Any = None) -> Summary:
    s = Summary(prompts=len(prompts))
    bpb = store.layout.bytes_per_block
    start = time.perf_counter()
    for p in prompts:
        moved = store.prefetch(ns, list(p), to)
        s.moved_blocks += moved
        s.moved_bytes += moved * bpb
        if progress is not None:
            progress.update(1)
    for p in prompts:
        count, tiers = _cli.cached_blocks(store, ns, list(p))
        s.cached_blocks += count
        s.uncached_prompts += count == 0
        for tier in tiers:
            s.blocks_per_tier[tier] = s.blocks_per_tier.get(tier, 0) + 1
    s.seconds = time.perf_counter() - start
    return s


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="kvtier prefetch", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Exit status: 0 ok, 2 bad usage or input, 3 kvtierd unreachable.")
    _cli.add_namespace_args(ap)
    ap.add_argument("--prompts", required=True, help="JSONL prompts, as kvtier warm reads them")
    ap.add_argument("--to", required=True, choices=["host", "hbm"], help="the tier to promote into")
    ap.add_argument("--socket", default=None, help="kvtierd's socket (default $KVTIER_SOCKET or kvtier's default)")
    _cli.add_quiet_arg(ap)
    ap.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    args = ap.parse_args(argv)
    try:
        ns_args, _ = _cli.namespace_of(args)
        prompts = _cli.read_prompts(args.prompts, _cli.tokenizer_of(args))
        with kvtier.Client(args.socket, name="kvtier-prefetch") as kv:
            ns = kv.open_namespace(**ns_args)
            with _cli.progress_bar(args.quiet, "kvtier prefetch", len(prompts), unit="prompt") as bar:
                summary = prefetch(kv, ns, prompts, args.to, bar)
    except (UsageError, kvtier.InvalidArgument, kvtier.PermissionDenied, kvtier.NotFound) as e:
        print(f"kvtier prefetch: {e}", file=sys.stderr)
        return EXIT_USAGE
    except kvtier.Unavailable as e:
        print(f"kvtier prefetch: kvtierd cannot be reached: {e}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    if args.json:
        _cli.print_json(dataclasses.asdict(summary))
    else:
        tiers = ", ".join(f"{t} {n}" for t, n in sorted(summary.blocks_per_tier.items())) or "none"
        print(f"kvtier prefetch: {summary.prompts} prompts, {summary.cached_blocks} cached blocks; moved "
              f"{summary.moved_blocks} blocks ({_cli.mib(summary.moved_bytes)}) into {args.to} in "
              f"{summary.seconds:.2f} s; {summary.uncached_prompts} prompts had nothing cached", file=sys.stdout)
        print(f"  the prompts' blocks now by fastest tier: {tiers}", file=sys.stdout)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
