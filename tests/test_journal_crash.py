"""A switch process killed with -9: what it awaited is in the journal, its
write-ahead rows come back as pending, and the journal opens again."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from cardswitch.switch.journal import Journal, JournalError
from cardswitch.switch.records import Status

CHILD = textwrap.dedent("""
    import asyncio, sys
    from cardswitch.switch.journal import Journal
    from cardswitch.switch.records import Kind, Status, TxnRecord

    async def main():
        loop = asyncio.get_running_loop()
        j = Journal.open(sys.argv[1], sys.argv[2])
        def rec(status):
            i = j.next_id()
            return TxnRecord(id=i, business_date="2026-01-15", received_at="2026-01-15T10:00:00Z",
                             mti="0200", proc="000000", kind=Kind.PURCHASE, amount=100 * i,
                             currency="156", terminal_id="POS00001", merchant_id="M1",
                             stan=f"{i:06d}", transmitted="0115100000", batch="000001",
                             pan_masked="622126******0017", status=status)
        done = [rec(Status.APPROVED) for _ in range(200)]
        await asyncio.gather(*(j.insert(r, loop) for r in done))
        sent = rec(Status.PENDING)
        await j.insert(sent, loop)              # written ahead; the issuer never answers
        await j.set_state("business_date", "2026-01-15", loop)
        print("committed", sent.id, flush=True)
        for _ in range(500):                    # queued, maybe committed: either is fine
            j.insert(rec(Status.APPROVED))
        sys.stdin.readline()                    # wait to be killed

    asyncio.run(main())
""")


@pytest.mark.timeout(60)
def test_kill_9_keeps_committed_rows_and_pending(tmp_path):
    url = f"sqlite:///{tmp_path}/var/journal.db"
    child = subprocess.Popen([sys.executable, "-c", CHILD, url, str(tmp_path)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        line = child.stdout.readline().split()
        assert line[:1] == ["committed"], line
        sent_id = int(line[1])
        with pytest.raises(JournalError, match=f"process {child.pid}"):
            Journal.open(url, str(tmp_path))   # the running switch holds it
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(30)
        child.stdout.close()
        child.stdin.close()
    assert child.returncode == -signal.SIGKILL

    with Journal.open(url, str(tmp_path)) as j:
        rows = j.rows()
        ids = [r.id for r in rows]
        assert ids[:201] == list(range(1, 202)) and ids == sorted(set(ids))
        assert all(r.amount == 100 * r.id for r in rows)          # no torn rows
        assert [r.id for r in j.pending()] == [sent_id]
        assert j.get(sent_id).status == Status.PENDING
        assert j.get_state("business_date") == "2026-01-15"
        assert j.next_id() == max(ids) + 1
