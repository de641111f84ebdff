"""``kvtier export``: write a data dir's cached KV to a portable archive (:mod:`kvtier.archive`).

    kvtier export --data-dir /var/lib/kvtier -o warm.kvtar                   # every namespace
    kvtier export --data-dir DIR -o docs.kvtar --model-id org/model --prompts docs.jsonl

The data dir is one no kvtierd holds (stop kvtierd first: a graceful stop writes every block to
NVMe). Every block's slot header and payload checksum are verified as it is read; a block that
fails is left out with the blocks below it, and counted. ``--model-id``, ``--tenant``,
``--adapter`` and ``--revision`` choose namespaces; ``--prompts`` (JSONL, as kvtier warm reads it)
chooses the blocks on those prompts' prefixes. The archive never holds the deployment secret:
``kvtier import`` re-keys every block under the destination's.

The archive is written to a temporary file beside it and renamed into place once complete, so an
interrupted export leaves no archive (and an earlier one at that path stays as it was).

Exit status: 0 ok; 1 some blocks were left out (corrupt); 2 bad usage; 3 the data dir is held by a
live kvtierd, holds no tier, or cannot be read or written.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from typing import Any, Sequence

import kvtier

from . import _cli, _native, archive
from ._cli import UsageError

EXIT_OK, EXIT_LEFT_OUT, EXIT_USAGE, EXIT_UNAVAILABLE = 0, 1, 2, 3


@dataclasses.dataclass
class Summary:
    archive: str = ""
    namespaces: int = 0
    blocks: int = 0
    bytes: int = 0
    corrupt_blocks: int = 0      # failed their check, with the blocks below them: left out
    unreachable_blocks: int = 0  # whose parent or namespace record is gone: left out
    seconds: float = 0.0


def export_data_dir(data_dir: str, out_path: str, model_id: str | None = None, tenant: str | None = None,
                    adapter: str | None = None, revision: str | None = None,
                    prompts: Sequence[Sequence[int]] | None = None, progress: Any = None) -> Summary:
    """Writes the archive (see the module's doc); raises kvtier.Error when the data dir cannot be
    walked, OSError when the archive cannot be written."""
    start = time.perf_counter()
    out_path = os.path.abspath(out_path)
    tmp = f"{out_path}.tmp.{os.getpid()}"
    chosen = [list(p) for p in prompts] if prompts is not None else None
    stack: list[list[int]] = []  # the tokens of the blocks above the current one

    def want_namespace(ns: dict[str, Any]) -> bool:
        return all(want is None or ns[k] == want for k, want in
                   (("model", model_id), ("tenant", tenant), ("adapter", adapter), ("revision", revision)))

    def want_block(ns: dict[str, Any], b: dict[str, Any]) -> bool:
        assert chosen is not None
        del stack[b["block_index"]:]
        stack.append(b["tokens"])
        prefix = [t for blk in stack for t in blk]
        return any(p[:len(prefix)] == prefix for p in chosen)

    current: list[str | None] = [None]
    summary = Summary(archive=out_path)
    try:
        with open(tmp, "wb") as f:
            w = archive.Writer(f)

            def emit(ns: dict[str, Any], b: dict[str, Any], payload: bytes) -> None:
                if current[0] != ns["root"]:
                    if current[0] is None:
                        w.header(ns["layout"], source=f"data_dir {os.path.abspath(data_dir)}")
                    w.namespace(ns["model"], ns["tenant"], ns["adapter"], ns["revision"])
                    current[0] = ns["root"]
                w.block(archive.Block(b["block_index"], b["priority"], bytes.fromhex(b["key"]),
                                      bytes.fromhex(b["parent"]), b["tokens"], b["extras"], payload))
                if progress is not None:
                    progress.update(len(payload))

            filtered = any(x is not None for x in (model_id, tenant, adapter, revision))
            report = _native.walk_data_dir(data_dir, want_namespace if filtered else None,
                                           want_block if chosen is not None else None, emit)
            if current[0] is None:
                raise UsageError("nothing to export: no block of the chosen namespaces and prompts is on NVMe")
            w.end()
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out_path)
        dfd = os.open(os.path.dirname(out_path), os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    summary.namespaces, summary.blocks, summary.bytes = w.counts.namespaces, w.counts.blocks, w.counts.bytes
    summary.corrupt_blocks, summary.unreachable_blocks = report["corrupt"], report["unreachable"]
    summary.seconds = time.perf_counter() - start
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="kvtier export", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Exit status: 0 ok, 1 corrupt blocks left out, 2 bad usage, "
                                        "3 the data dir unavailable.")
    ap.add_argument("--data-dir", required=True, help="a kvtierd data dir (or its NVMe tier directory) no kvtierd holds")
    ap.add_argument("-o", "--output", required=True, help="the archive to write")
    ap.add_argument("--model-id", default=None, help="only namespaces of this model id")
    ap.add_argument("--tenant", default=None, help="only namespaces of this tenant")
    ap.add_argument("--adapter", default=None, help="only namespaces of this adapter")
    ap.add_argument("--revision", default=None, help="only namespaces of this revision")
    ap.add_argument("--prompts", default=None, help="JSONL prompts (token ids): only the blocks on their prefixes")
    _cli.add_quiet_arg(ap)
    ap.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    args = ap.parse_args(argv)
    try:
        prompts = _cli.read_prompts(args.prompts) if args.prompts else None
        with _cli.progress_bar(args.quiet, "kvtier export", None, unit="B", unit_scale=True) as bar:
            s = export_data_dir(args.data_dir, args.output, args.model_id, args.tenant, args.adapter, args.revision,
                                prompts, bar)
    except UsageError as e:
        print(f"kvtier export: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (kvtier.Error, OSError) as e:
        print(f"kvtier export: {e}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    if args.json:
        _cli.print_json(dataclasses.asdict(s))
    else:
        print(f"kvtier export: {s.blocks} blocks ({_cli.mib(s.bytes)}) of {s.namespaces} namespaces to {s.archive} "
              f"in {s.seconds:.1f} s")
        if s.corrupt_blocks or s.unreachable_blocks:
            print(f"  left out: {s.corrupt_blocks} corrupt (and below a corrupt block), {s.unreachable_blocks} "
                  "unreachable (parent or namespace gone); kvtier fsck names them")
    return EXIT_LEFT_OUT if s.corrupt_blocks else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
