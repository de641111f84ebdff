"""KvtierConnector subclasses for test_vllm_e2e.py; everything they do not override is the real
connector.

KillingConnector: the first time the worker is about to load (its lookup has its lease), it
SIGKILLs kvtierd (pid in $KVTIER_TEST_KILL_PID) and waits until the process is gone (a pidfd: no
sleeps), so the load itself meets a dead daemon. It writes "killed" to $KVTIER_TEST_KILL_PID.done.

RecordingConnector: appends every KV event the scheduler side hands vLLM, and the worker's
connector stats, as JSON lines to $KVTIER_TEST_RECORD.

PageDumpConnector: dumps the vLLM pages it saves and the pages it loaded (see the class).
"""

from __future__ import annotations

import os
import select
import json
import signal

from kvtier.vllm import KvtierConnector


class KillingConnector(KvtierConnector):
    def _lookup_for_load(self, client, ns, t):
        match = super()._lookup_for_load(client, ns, t)
        done = os.environ["KVTIER_TEST_KILL_PID"] + ".done"
        pid = int(open(os.environ["KVTIER_TEST_KILL_PID"]).read())
        if not os.path.exists(done) and match.block_count > 0:
            fd = os.pidfd_open(pid)
            os.kill(pid, signal.SIGKILL)
            select.select([fd], [], [])  # readable once the process has exited
            os.close(fd)
            with open(done, "w") as f:
                f.write(f"killed {pid} holding {match.block_count} blocks\n")
        return match


class RecordingConnector(KvtierConnector):
    def _record(self, kind: str, **fields) -> None:
        with open(os.environ["KVTIER_TEST_RECORD"], "a") as f:
            f.write(json.dumps({"kind": kind, **fields}) + "\n")

    def take_events(self):
        events = list(super().take_events())
        for e in events:
            self._record("event", type=type(e).__name__, hashes=len(e.block_hashes), tokens=len(e.token_ids),
                         medium=e.medium, parent=e.parent_block_hash is not None)
        return events

    def get_kv_connector_stats(self):
        stats = super().get_kv_connector_stats()
        if stats is not None:
            self._record("stats", **stats.data)
        return stats



class PageDumpConnector(KvtierConnector):
    """Dumps vLLM's own KV pages to $KVTIER_TEST_DUMP/<n>.pt: on a save, the pages it is about to
    hand kvtier (after the forward pass wrote them); after a load, the pages kvtier filled. Each
    dump: {"kind", "tokens", "first_page", "pages": [per layer, those pages]}."""

    _dumps = 0

    def _dump(self, kind: str, t, first_page: int, last_page: int) -> None:
        import torch

        ids = t.vllm_blocks[first_page:last_page]
        torch.save({"kind": kind, "tokens": t.tokens, "first_page": first_page,
                    "pages": [layer[ids].clone() for layer in self._layers]},
                   os.path.join(os.environ["KVTIER_TEST_DUMP"], f"{os.getpid()}-{PageDumpConnector._dumps}.pt"))
        PageDumpConnector._dumps += 1

    def _finish_loads(self) -> None:
        loading = [t for handle, t, _ in self._loading if handle is not None]
        super()._finish_loads()
        per_page = self._per_page
        for t in loading:
            if not (set(t.vllm_blocks) & self._failed_blocks):
                self._dump("load", t, t.begin // per_page, t.end // per_page)

    def wait_for_save(self) -> None:
        self._finish_loads()
        meta = self._connector_metadata
        for t in getattr(meta, "saves", []):
            per_page = self._per_page
            self._dump("save", t, 0, t.end // per_page)
        super().wait_for_save()
