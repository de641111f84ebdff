"""``kvtier export``: write cached KV to a portable archive (:mod:`kvtier.archive`), from a running
kvtierd or from a data dir no kvtierd holds.

    kvtier export -o warm.kvtar                                              # kvtierd's default socket
    kvtier export --socket /run/kvtier.sock -o docs.kvtar --model-id org/model --prompts docs.jsonl
    kvtier export --data-dir /var/lib/kvtier -o warm.kvtar                   # offline

Through kvtierd (operators only: root or kvtierd's uid) the export reads what the daemon caches in
every tier, memory included, while it keeps serving: a walk over a snapshot of its index, each
block pinned while it is read and verified against its checksum whichever tier it comes from. A
block evicted during the export is left out with the blocks below it, and counted. Offline, every
block's slot header and payload checksum are verified as it is read; a block that fails is left
out with the blocks below it, and counted. ``--model-id``, ``--tenant``, ``--adapter`` and
``--revision`` choose namespaces; ``--prompts`` (JSONL, as kvtier warm reads it) chooses the blocks
on those prompts' prefixes. The archive never holds the deployment secret: ``kvtier import``
re-keys every block under the destination's.

The archive is written to a temporary file beside it and renamed into place once complete, so an
interrupted export leaves no archive (and an earlier one at that path stays as it was).

Exit status: 0 ok; 1 some blocks were left out (corrupt); 2 bad usage; 3 kvtierd is unreachable or
refuses, or the data dir is held by a live kvtierd, holds no tier, or cannot be read or written.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import struct
import sys
import time
from typing import Any, Sequence

import kvtier

from . import _cli, _native, archive
from ._cli import UsageError

EXIT_OK, EXIT_LEFT_OUT, EXIT_USAGE, EXIT_UNAVAILABLE = 0, 1, 2, 3
PAGE_BLOCKS = 256  # blocks listed per request to kvtierd
READ_BYTES = 8 << 20  # payload bytes read per request


@dataclasses.dataclass
class Summary:
    archive: str = ""
    namespaces: int = 0
    blocks: int = 0
    bytes: int = 0
    corrupt_blocks: int = 0      # failed their check, with the blocks below them: left out
    unreachable_blocks: int = 0  # whose parent or namespace record is gone (or evicted meanwhile): left out
    seconds: float = 0.0


@dataclasses.dataclass
class Choice:
    """Which namespaces and blocks go into the archive (the command's filters)."""
    model_id: str | None = None
    tenant: str | None = None
    adapter: str | None = None
    revision: str | None = None
    prompts: Sequence[Sequence[int]] | None = None

    def __post_init__(self) -> None:
        self._prompts = [list(p) for p in self.prompts] if self.prompts is not None else None
        self._stack: list[list[int]] = []  # the tokens of the blocks above the current one

    @property
    def filters_namespaces(self) -> bool:
        return any(x is not None for x in (self.model_id, self.tenant, self.adapter, self.revision))

    @property
    def filters_blocks(self) -> bool:
        return self._prompts is not None

    def wants_namespace(self, ns: dict[str, Any]) -> bool:
        return all(want is None or ns.get(k, "") == want for k, want in
                   (("model", self.model_id), ("tenant", self.tenant), ("adapter", self.adapter),
                    ("revision", self.revision)))

    def wants_block(self, b: dict[str, Any]) -> bool:
        """Called in depth-first order: true when the block lies on a chosen prompt's prefix."""
        assert self._prompts is not None
        del self._stack[b["block_index"]:]
        self._stack.append(b["tokens"])
        prefix = [t for blk in self._stack for t in blk]
        return any(p[:len(prefix)] == prefix for p in self._prompts)


class ArchiveFile:
    """The archive being written: a temporary file beside ``out_path``, renamed into place (and its
    directory synced) when the ``with`` block ends well, removed when it does not."""

    def __init__(self, out_path: str, source: str, progress: Any = None) -> None:
        self.path = os.path.abspath(out_path)
        self._tmp = f"{self.path}.tmp.{os.getpid()}"
        self._source = source
        self._progress = progress
        self._root: str | None = None

    def __enter__(self) -> ArchiveFile:
        self._f = open(self._tmp, "wb")
        self.writer = archive.Writer(self._f)
        return self

    def emit(self, ns: dict[str, Any], b: archive.Block) -> None:
        """One block of namespace ``ns`` (its root, model, tenant, adapter, revision and KvLayout)."""
        if self._root != ns["root"]:
            if self._root is None:
                self.writer.header(ns["layout"], source=self._source)
            self.writer.namespace(ns["model"], ns["tenant"], ns["adapter"], ns["revision"])
            self._root = ns["root"]
        self.writer.block(b)
        if self._progress is not None:
            self._progress.update(len(b.payload))

    def __exit__(self, kind: Any, value: Any, tb: Any) -> bool:
        try:
            if kind is None:
                if self._root is None:
                    raise UsageError("nothing to export: no block of the chosen namespaces and prompts is cached")
                self.writer.end()
                self._f.flush()
                os.fsync(self._f.fileno())
            self._f.close()
            if kind is None:
                os.replace(self._tmp, self.path)
                dfd = os.open(os.path.dirname(self.path), os.O_RDONLY | os.O_DIRECTORY)
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)
        except BaseException:
            self._unlink()
            raise
        if kind is not None:
            self._unlink()
        return False

    def _unlink(self) -> None:
        self._f.close()
        try:
            os.unlink(self._tmp)
        except FileNotFoundError:
            pass


def _finish(summary: Summary, out: ArchiveFile, start: float) -> Summary:
    c = out.writer.counts
    summary.namespaces, summary.blocks, summary.bytes = c.namespaces, c.blocks, c.bytes
    summary.seconds = time.perf_counter() - start
    return summary


def export_data_dir(data_dir: str, out_path: str, model_id: str | None = None, tenant: str | None = None,
                    adapter: str | None = None, revision: str | None = None,
                    prompts: Sequence[Sequence[int]] | None = None, progress: Any = None) -> Summary:
    """Writes the archive of a data dir no kvtierd holds (see the module's doc); raises kvtier.Error
    when the data dir cannot be walked, OSError when the archive cannot be written."""
    start = time.perf_counter()
    choice = Choice(model_id, tenant, adapter, revision, prompts)
    summary = Summary()
    with ArchiveFile(out_path, f"data_dir {os.path.abspath(data_dir)}", progress) as out:
        def emit(ns: dict[str, Any], b: dict[str, Any], payload: bytes) -> None:
            out.emit(ns, archive.Block(b["block_index"], b["priority"], bytes.fromhex(b["key"]),
                                       bytes.fromhex(b["parent"]), b["tokens"], b["extras"], payload))

        report = _native.walk_data_dir(data_dir, choice.wants_namespace if choice.filters_namespaces else None,
                                       (lambda ns, b: choice.wants_block(b)) if choice.filters_blocks else None,
                                       emit)
    summary.archive = out.path
    summary.corrupt_blocks, summary.unreachable_blocks = report["corrupt"], report["unreachable"]
    return _finish(summary, out, start)


def _extra_bytes(hex_key: str) -> bytes:
    """A block extra as the data dir's walk hands it: the key's two halves, low first, little-endian."""
    return struct.pack("<QQ", int(hex_key[16:], 16), int(hex_key[:16], 16))


def export_daemon(client: kvtier.Client, out_path: str, model_id: str | None = None, tenant: str | None = None,
                  adapter: str | None = None, revision: str | None = None,
                  prompts: Sequence[Sequence[int]] | None = None, progress: Any = None,
                  source: str = "kvtierd", page_blocks: int = PAGE_BLOCKS) -> Summary:
    """Writes the archive of what a running kvtierd caches (see the module's doc); raises
    kvtier.Error when the daemon refuses or goes away (no archive is left), OSError when the
    archive cannot be written."""
    start = time.perf_counter()
    choice = Choice(model_id, tenant, adapter, revision, prompts)
    summary = Summary()
    namespaces: dict[str, dict[str, Any]] = {}
    for n in client.inspect(0)["namespaces"]:
        if not n["blocks"]:
            continue
        if n.get("model") is None:  # no record: its blocks cannot be named in an archive
            summary.unreachable_blocks += n["blocks"]
            continue
        if choice.wants_namespace(n):
            namespaces[n["root"]] = {"root": n["root"], "model": n["model"], "tenant": n.get("tenant", ""),
                                     "adapter": n.get("adapter", ""), "revision": n.get("revision", ""),
                                     "layout": client.layout}
    batch = max(1, READ_BYTES // client.layout.bytes_per_block)
    with ArchiveFile(out_path, source, progress) as out:
        if namespaces:
            # A block left out takes its subtree with it: the blocks after it, deeper, in its
            # namespace. `unwanted` for the prompts' choice, `failed` for a read that failed.
            unwanted: tuple[str, int] | None = None
            failed: tuple[str, int, str] | None = None

            def below(mark: tuple[Any, ...] | None, b: dict[str, Any]) -> bool:
                return mark is not None and b["root"] == mark[0] and b["block_index"] > mark[1]

            page = client.export_list(True, list(namespaces), page_blocks)
            if progress is not None:
                progress.total = page["total"] * client.layout.bytes_per_block
            while True:
                wanted = []
                for b in page["blocks"]:
                    if below(unwanted, b):
                        continue
                    unwanted = None
                    if choice.filters_blocks and not choice.wants_block(b):
                        unwanted = (b["root"], b["block_index"])
                        continue
                    wanted.append(b)
                got: list[tuple[str | None, bytes | None]] = []
                for at in range(0, len(wanted), batch):  # a few MiB at a time: the window and buffers stay warm
                    got += client.export_read([b["key"] for b in wanted[at:at + batch]])
                for b, (error, payload) in zip(wanted, got):
                    if below(failed, b):
                        summary.corrupt_blocks += failed[2] == "corrupt"  # type: ignore[index]
                        summary.unreachable_blocks += failed[2] == "unreachable"  # type: ignore[index]
                        continue
                    failed = None
                    if error is not None:
                        why = "corrupt" if error.startswith("checksum_mismatch") else "unreachable"
                        failed = (b["root"], b["block_index"], why)
                        summary.corrupt_blocks += why == "corrupt"
                        summary.unreachable_blocks += why == "unreachable"
                        continue
                    out.emit(namespaces[b["root"]],
                             archive.Block(b["block_index"], b["priority"], bytes.fromhex(b["key"]),
                                           bytes.fromhex(b["parent"]), b["tokens"],
                                           [_extra_bytes(x) for x in b["extras"]], payload))
                summary.unreachable_blocks += page["gone"]
                if page["done"]:
                    break
                page = client.export_list(False, [], page_blocks)
    summary.archive = out.path
    return _finish(summary, out, start)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="kvtier export", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Exit status: 0 ok, 1 corrupt blocks left out, 2 bad usage, "
                                        "3 kvtierd or the data dir unavailable.")
    where = ap.add_mutually_exclusive_group()
    where.add_argument("--socket", default=None,
                       help=f"a running kvtierd's socket (default $KVTIER_SOCKET or {kvtier.DEFAULT_SOCKET})")
    where.add_argument("--data-dir", default=None,
                       help="a kvtierd data dir (or its NVMe tier directory) no kvtierd holds, read offline")
    ap.add_argument("-o", "--output", required=True, help="the archive to write")
    ap.add_argument("--model-id", default=None, help="only namespaces of this model id")
    ap.add_argument("--tenant", default=None, help="only namespaces of this tenant")
    ap.add_argument("--adapter", default=None, help="only namespaces of this adapter")
    ap.add_argument("--revision", default=None, help="only namespaces of this revision")
    ap.add_argument("--prompts", default=None, help="JSONL prompts (token ids): only the blocks on their prefixes")
    _cli.add_quiet_arg(ap)
    ap.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    args = ap.parse_args(argv)
    filters = (args.model_id, args.tenant, args.adapter, args.revision)
    try:
        prompts = _cli.read_prompts(args.prompts) if args.prompts else None
        with _cli.progress_bar(args.quiet, "kvtier export", None, unit="B", unit_scale=True) as bar:
            if args.data_dir is not None:
                s = export_data_dir(args.data_dir, args.output, *filters, prompts, bar)
            else:
                with kvtier.Client(args.socket) as c:
                    s = export_daemon(c, args.output, *filters, prompts, bar,
                                      source=f"kvtierd {args.socket or os.environ.get('KVTIER_SOCKET', kvtier.DEFAULT_SOCKET)}")
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
                  "unreachable (parent or namespace gone, or evicted during the export); kvtier fsck names them")
    return EXIT_LEFT_OUT if s.corrupt_blocks else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
