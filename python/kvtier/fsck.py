"""``kvtier fsck``: check a kvtierd data dir's NVMe tier, slot by slot, against its catalog.

    kvtier fsck /var/lib/kvtier              # report only: nothing is written
    kvtier fsck /var/lib/kvtier --repair     # remove what cannot be served, wipe stale slots
    python -m kvtier.fsck DATA_DIR --json

DATA_DIR is kvtierd's data dir (the tier is in DATA_DIR/nvme) or the tier directory itself. Every
catalog entry's slot header is checked against the entry and every payload against its checksum
(a restart checks headers only, so rotted bytes show first as a failed load). Found:

- bad slots: entries whose slot is out of range, claimed twice, of another layout, with a header
  that does not decode or disagrees, or a payload that fails its checksum;
- broken chains: entries whose parent block is not stored, unreachable by any prefix match;
- entries of a namespace with no record, which a restart erases;
- undecodable catalog values;
- slots without an entry: the bytes of an erased block, or of a write a crash cut before its
  commit. Their space is free already: reported, not an error.

``--repair`` deletes the catalog entries of what cannot be served (their slots become free) and
wipes the headers of slots without an entry; blocks that check clean are kept. fsck refuses a data
dir a live kvtierd holds.

Exit status (as fsck(8)): 0 no errors; 1 errors found and repaired; 4 errors left (run with
--repair); 8 the check could not run (a live kvtierd holds the dir, no tier there, unreadable).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Sequence

import kvtier

from . import _cli, _native

EXIT_OK, EXIT_REPAIRED, EXIT_ERRORS_LEFT, EXIT_OPERATIONAL = 0, 1, 4, 8

_KINDS = [("bad_slots", "bad slots"), ("broken_chains", "broken chains"), ("no_namespace", "without a namespace"),
          ("undecodable_entries", "undecodable entries"), ("slots_without_entry", "slots without an entry")]


def check(data_dir: str, repair: bool = False, progress: Any = None, max_listed: int = 1000) -> dict[str, Any]:
    """The findings of one check, as a dict (the fields of ``--json``). Raises kvtier.Unavailable
    when a live kvtierd holds the dir, kvtier.NotFound when it holds no tier."""
    return _native.check_nvme_tier(data_dir, repair, progress, max_listed)


def exit_status(report: dict[str, Any], repair: bool) -> int:
    if report["errors"] == 0:
        return EXIT_OK
    return EXIT_REPAIRED if repair else EXIT_ERRORS_LEFT


def _print_report(r: dict[str, Any], repair: bool, out: Any) -> None:
    print(f"kvtier fsck {r['dir']}: layout {r['layout']}, {r['slots']} slots of {r['slot_bytes']} bytes "
          f"in {r['files']} file(s), {r['namespaces']} namespaces", file=out)
    print(f"  {r['entries']} catalog entries: {r['good_blocks']} good blocks ({_cli.mib(r['good_bytes'])}); "
          f"read {_cli.mib(r['bytes_read'])}", file=out)
    found = [f"{r[k]} {name}" for k, name in _KINDS if r[k]]
    print(f"  found: {', '.join(found) if found else 'nothing wrong'}", file=out)
    for p in r["problems"]:
        where = f"slot {p['slot']}" if p["slot"] is not None else "no slot"
        done = " [repaired]" if p["repaired"] else ""
        print(f"  {p['kind']}: block {p['key']} ({where}): {p['detail']}{done}", file=out)
    listed = len(r["problems"])
    total = r["errors"] + r["slots_without_entry"]
    if listed < total:
        print(f"  ... {total - listed} more not listed (--list N)", file=out)
    if repair:
        print(f"  repaired {r['repaired']}: removed the entries that cannot be served, wiped stale slot headers",
              file=out)
    elif r["errors"]:
        print("  run with --repair to remove what cannot be served (good blocks are kept)", file=out)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="kvtier fsck", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Exit status: 0 no errors, 1 errors repaired, 4 errors left, "
                                        "8 the check could not run.")
    ap.add_argument("data_dir", help="kvtierd's data dir, or its NVMe tier directory")
    ap.add_argument("--repair", action="store_true",
                    help="remove entries that cannot be served and wipe slots without an entry")
    ap.add_argument("--list", type=int, default=50, metavar="N", help="problems listed one by one (default 50)")
    _cli.add_quiet_arg(ap)
    ap.add_argument("--json", action="store_true", help="print the findings as one JSON object")
    args = ap.parse_args(argv)
    if args.list < 0:
        ap.error("--list must be >= 0")

    try:
        with _cli.progress_bar(args.quiet, "kvtier fsck", None, unit="B", unit_scale=True) as bar:
            def progress(done: int, total: int) -> None:
                bar.total = total
                bar.n = done
                bar.refresh()

            report = check(args.data_dir, args.repair, progress if bar is not None else None, args.list)
    except kvtier.Error as e:
        print(f"kvtier fsck: {e}", file=sys.stderr)
        return EXIT_OPERATIONAL
    if args.json:
        _cli.print_json(report)
    else:
        _print_report(report, args.repair, sys.stdout)
    return exit_status(report, args.repair)


if __name__ == "__main__":
    sys.exit(main())
