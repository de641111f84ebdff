"""KvtierConnector subclasses for test_vllm_e2e.py; everything they do not override is the real
connector.

KillingConnector: the first time the worker is about to load (its lookup has its lease), it
SIGKILLs kvtierd (pid in $KVTIER_TEST_KILL_PID) and waits until the process is gone (a pidfd: no
sleeps), so the load itself meets a dead daemon. It writes "killed" to $KVTIER_TEST_KILL_PID.done.

RecordingConnector: appends every KV event the scheduler side hands vLLM, and the worker's
connector stats, as JSON lines to $KVTIER_TEST_RECORD.
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
