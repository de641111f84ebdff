"""KvtierConnector with one fault, for test_vllm_e2e.py: the first time the worker is about to load
(its lookup has its lease), it SIGKILLs kvtierd (pid in $KVTIER_TEST_KILL_PID) and waits until the
process is gone (a pidfd: no sleeps), so the load itself meets a dead daemon. Everything else is
the real connector. It writes "killed" to $KVTIER_TEST_KILL_PID.done once it has."""

from __future__ import annotations

import os
import select
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
