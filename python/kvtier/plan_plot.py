"""Plots `kvtier plan --json` (what `kvtier plan --plot FILE` runs): time against context length for
recompute (prefill) and for restoring the KV from each tier, and the sequences that fit in HBM.

    kvtier plan --model config.json --gpu H100-SXM --context 4K,16K,64K,128K --nvme-bw 6G --json \\
        | python -m kvtier.plan_plot plan.svg
"""

from __future__ import annotations

import json
import sys


def plot(rows: list[dict], out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(rows, key=lambda r: r["context"])
    ctx = [r["context"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    left.plot(ctx, [r["prefill_s"] for r in rows], marker="o", label="recompute (prefill)")
    for tier in rows[0]["switch_s"]:
        left.plot(ctx, [r["switch_s"][tier] for r in rows], marker="o", label=f"restore from {tier}")
    left.plot(ctx, [r["decode_s_per_screen"] for r in rows], marker=".", linestyle=":",
              label=f"decode {rows[0]['screen_tokens']} tokens")
    left.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="seconds",
             title=f"time per sequence on {rows[0]['gpu']}")
    left.grid(True, which="both", alpha=0.3)
    left.legend()
    right.plot(ctx, [r["max_sequences"] for r in rows], marker="o")
    right.set(xscale="log", xlabel="context (tokens)", ylabel="sequences",
              title="sequences that fit in HBM beside the weights")
    right.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m kvtier.plan_plot OUT.svg|OUT.png < plan.json", file=sys.stderr)
        return 2
    rows = json.load(sys.stdin)
    if not isinstance(rows, list) or not rows:
        print("kvtier.plan_plot: expected the JSON array kvtier plan --json prints", file=sys.stderr)
        return 2
    plot(rows, argv[1])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
