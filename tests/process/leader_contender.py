"""A replica of the leader election tests: contends for a name, and writes while it leads.

    python -m tests.process.leader_contender URL NAME HOLDER

Prints one JSON line per finding: C{{"leading": bool, "epoch": n, "store_up": bool}}
when the election changes, and while leading, every 50 ms, a fenced write of a
row named C{"EPOCH:N"} (a zone record: a row of its own each) and its outcome:
C{{"wrote": "EPOCH:N"}} or C{{"fenced": EPOCH}}.  The writes run on a thread of
their own, as a control plane's do.
"""

from __future__ import annotations

import itertools
import json
import sys

from twisted.internet import reactor as _reactor
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from kumazone.core.federation import ZoneRecord
from kumazone.core.storage import StoreChanges, StoreError
from kumazone.store.election import Election
from kumazone.store.leader import Contender, Leadership
from kumazone.store.postgres import Fenced, PostgresStore


def say(**what: object) -> None:
    print(json.dumps(what), flush=True)


def main(url: str, name: str, holder: str) -> None:
    reactor: object = _reactor
    store = PostgresStore(url)
    writes = ThreadPool(1, 1, name="writes")
    writes.start()
    counter = itertools.count(1)
    state: dict[str, object] = {"busy": False, "fence": None}

    def changed(found: Leadership) -> None:
        state["fence"] = (name, found.epoch) if found.leading else None
        say(leading=found.leading, epoch=found.epoch, store_up=found.store_up, why=found.why)

    election = Election(Contender(url, name, holder), reactor, changed)

    def write() -> None:
        fence = state["fence"]
        if not isinstance(fence, tuple) or state["busy"] or not election.leading:
            return
        value = f"{fence[1]}:{next(counter)}"
        state["busy"] = True

        def commit() -> str:
            try:
                store.commit_fenced(StoreChanges(zones_put=[ZoneRecord(value)]), fence)
            except Fenced:
                return "fenced"
            except StoreError:
                return "failed"
            return "wrote"

        def done(outcome: str) -> None:
            state["busy"] = False
            if outcome == "wrote":
                say(wrote=value)
            elif outcome == "fenced":
                say(fenced=fence[1])

        deferToThreadPool(reactor, writes, commit).addCallback(done)

    LoopingCall(write).start(0.05)
    election.startService()
    reactor.addSystemEventTrigger("before", "shutdown", election.stopService)  # type: ignore[attr-defined]
    reactor.addSystemEventTrigger("after", "shutdown", writes.stop)  # type: ignore[attr-defined]
    say(started=holder)
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main(*sys.argv[1:4])
