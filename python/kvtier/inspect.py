"""``kvtier inspect``: what a kvtierd (or a data dir) holds.

    kvtier inspect                        # the running kvtierd at $KVTIER_SOCKET or the default socket
    kvtier inspect --data-dir /var/lib/kvtier --json     # a data dir no kvtierd holds (NVMe only)

Namespaces (model, tenant, adapter, revision, layout) with their blocks and bytes per tier, hits,
priority classes, longest prefix and the ages of their NVMe blocks; each tier's capacity and use;
and the most reused prefixes (by tokens restored: hits × length) with their last block's tokens.
A data dir shows what is on NVMe, without hit counts (those live in a running kvtierd). Through
kvtierd it is for operators (root or kvtierd's own uid), since it sees every tenant.

Exit status: 0 ok; 2 bad usage; 3 kvtierd cannot be reached, or the data dir is held by a live
kvtierd or holds no tier; 4 kvtierd refused (not an operator).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Sequence

import kvtier

from . import _cli, _native

EXIT_OK, EXIT_USAGE, EXIT_UNAVAILABLE, EXIT_REFUSED = 0, 2, 3, 4


def inspect_data_dir(data_dir: str) -> dict[str, Any]:
    """A data dir's NVMe blocks per namespace (kvtier.Unavailable while a kvtierd holds it)."""
    return json.loads(_native.inspect_data_dir(data_dir))


def _age(seconds: float) -> str:
    for unit, n in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= n:
            return f"{seconds / n:.1f} {unit}"
    return f"{seconds:.0f} s"


def _print(r: dict[str, Any], out: Any) -> None:
    where = r.get("dir", "kvtierd") if r["source"] == "data_dir" else r["source"]
    print(f"{where}: layout {r['layout']}", file=out)
    for t in r["tiers"]:
        cap = f" of {_cli.mib(t['capacity_bytes'])}" if "capacity_bytes" in t else ""
        print(f"  {t['tier']}: {t['used_blocks']} blocks, {_cli.mib(t['used_bytes'])}{cap}", file=out)
    print(f"namespaces ({len(r['namespaces'])}):", file=out)
    for n in r["namespaces"]:
        name = "(no record: a restart drops these blocks)" if n["model"] is None else \
            f"model '{n['model']}' tenant '{n.get('tenant', '')}' adapter '{n.get('adapter', '')}' " \
            f"revision '{n.get('revision', '')}'"
        line = f"  {name}: {n['blocks']} blocks, {_cli.mib(n['bytes'])}"
        resident = ", ".join(f"{t} {c}" for t, c in n.get("resident_blocks", {}).items() if c)
        if resident:
            line += f" ({resident})"
        if "hits" in n:
            line += f", {n['hits']} block hits"
        if n.get("by_priority"):
            line += ", " + ", ".join(f"{p} {c}" for p, c in n["by_priority"].items())
        if n.get("longest_blocks"):
            line += f", longest prefix {n['longest_blocks']} blocks"
        if "nvme_oldest_seconds" in n:
            line += f", on NVMe since {_age(n['nvme_oldest_seconds'])} (newest {_age(n['nvme_newest_seconds'])})"
        print(line, file=out)
    if r["most_reused"]:
        print("most reused prefixes:", file=out)
        for i, p in enumerate(r["most_reused"], 1):
            print(f"  {i}. {p['tokens']} tokens ({p['blocks']} blocks) of model '{p['model']}' tenant "
                  f"'{p['tenant']}': {p['hits']} hits, {p['tokens_restored']} tokens restored, in "
                  f"{'/'.join(p['tiers'])}; it ends with tokens {p['last_tokens']}", file=out)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="kvtier inspect", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Exit status: 0 ok, 2 bad usage, 3 kvtierd or the data dir unavailable, "
                                        "4 not an operator.")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--socket", default=None, help="kvtierd's socket (default $KVTIER_SOCKET or kvtier's default)")
    src.add_argument("--data-dir", default=None, help="a data dir no kvtierd holds, instead of a running kvtierd")
    ap.add_argument("--top", type=int, default=10, help="most reused prefixes listed (default 10, at most 10000)")
    ap.add_argument("--json", action="store_true", help="print it as one JSON object")
    args = ap.parse_args(argv)
    if not 0 <= args.top <= 10000:
        ap.error("--top must be in 0..10000")
    try:
        if args.data_dir is not None:
            report = inspect_data_dir(args.data_dir)
        else:
            with kvtier.Client(args.socket, name="kvtier-inspect") as kv:
                report = kv.inspect(args.top)
    except kvtier.PermissionDenied as e:
        print(f"kvtier inspect: {e}", file=sys.stderr)
        return EXIT_REFUSED
    except kvtier.Error as e:
        print(f"kvtier inspect: {e}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    if args.json:
        _cli.print_json(report)
    else:
        _print(report, sys.stdout)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
