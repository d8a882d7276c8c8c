"""The addon chain's order, and the one place per-flow state lives.

mitmproxy calls each hook on the addons in list order, and the addons talk through the flow's
record (gateway/record.py): an addon placed before the one that fills in what it reads sees an
empty record, and allows or records the wrong thing without any error.
"""

from __future__ import annotations

import logging
import re
import socket
import time
from pathlib import Path

import pytest

from addons.gateway import accesslog
from addons.gateway.chain import gateway_addons
from tests.support.inproc import InProcessGateway
from tests.support.stack import free_port

ADDONS = Path(__file__).resolve().parents[2] / "addons"

# (earlier, later, why the earlier one must see each hook first)
ORDER = [
    ("BackendCredential", "PolicyFile",
     "every other addon's backend client carries the run's backend credential"),
    ("Intake", "TokenEndpoint",
     "TokenEndpoint acts on the record's kind and target, which Intake parses"),
    ("Intake", "RegistryAccess",
     "RegistryAccess acts on the record's kind and target, which Intake parses"),
    ("RegistryAccess", "WriteFreeze",
     "WriteFreeze holds only allowed writes: it reads decision, route and params"),
    ("RegistryAccess", "Accounting",
     "Accounting reads the tenant, route and repository RegistryAccess decides"),
    ("RegistryAccess", "TenantIsolation",
     "TenantIsolation reads the tenant, route and repository RegistryAccess decides"),
    ("Accounting", "TenantIsolation",
     "Accounting's response hook refuses a push over quota and empties the record's pending "
     "digests before TenantIsolation records them: a refused push must never be recorded"),
    ("TenantIsolation", "ImmutableTags",
     "a digest the caller may not read is refused by isolation before anything else looks"),
    ("TenantIsolation", "SignedOnly",
     "a digest the caller may not read is refused by isolation before a signature check "
     "(which asks the backend) can tell whether it exists"),
    ("TenantIsolation", "Listing", "Listing reads the isolation ledger"),
    ("AccessLog", "FlowFeed", "FlowFeed takes the access-log line AccessLog wrote"),
]  # fmt: skip
DECIDING = [
    "Intake", "TokenEndpoint", "RegistryAccess", "WriteFreeze", "Accounting",
    "TenantIsolation", "ImmutableTags", "SignedOnly", "Listing",
]  # fmt: skip


def test_the_chain_runs_in_the_order_its_addons_rely_on():
    names = [type(a).__name__ for a in gateway_addons()]
    assert names[0] == "BackendCredential", "the backend credential first: " + ORDER[0][2]
    for earlier, later, why in ORDER:
        assert names.index(earlier) < names.index(later), f"{earlier} before {later}: {why}"
    gate = names.index("Gate")
    for name in DECIDING:
        assert names.index(name) < gate, (
            f"{name} before Gate: the gate forwards or refuses once, on what every deciding "
            "addon has decided; a decision made after it is never applied"
        )
    assert gate < names.index("AccessLog"), (
        "Gate before AccessLog: the log writes the final decision (the gate's deny:undecided)"
    )


def test_no_addon_keeps_per_flow_state_outside_the_record():
    """Per-flow state between hooks, or between addons, is a field of FlowRecord: one declared
    place, instead of strings in `flow.metadata` that any module may read, set or pop."""
    offenders = [
        f"{path.relative_to(ADDONS)}:{n}"
        for path in sorted(ADDONS.rglob("*.py"))
        if path.relative_to(ADDONS).as_posix() != "gateway/record.py"
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if re.search(r"\bflow\.metadata\b", line)
    ]
    assert not offenders, f"flow.metadata outside addons/gateway/record.py: {offenders}"


# --- start-up: which errors stop a worker -----------------------------------------------------


def test_an_error_reported_while_a_worker_starts_does_not_stop_it(monkeypatch):
    """A slow start on a busy machine: the ledger (or the policy, or anything at work) reports
    an error after the listeners are up but before every addon's `running` has returned.
    mitmproxy's own start-up check exited the worker on it; the node then lost a worker for
    a state /healthz reports."""
    started = accesslog.AccessLog.running

    def running(self):
        logging.getLogger("addons.storage.ledger").error("ledger down: read-only (test)")
        return started(self)

    monkeypatch.setattr(accesslog.AccessLog, "running", running)
    backend = f"http://127.0.0.1:{free_port()}"
    with InProcessGateway(backend, anonymous=True) as gw:
        time.sleep(0.5)  # the master's last check comes right after `running`
        assert gw.failure is None and gw.thread.is_alive()


def test_a_listener_that_cannot_be_bound_still_stops_the_worker():
    """What the start-up check is for: a port taken exits non-zero (supervisord reports it)."""
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    gw = InProcessGateway("http://127.0.0.1:9", anonymous=True)
    gw.port = taken.getsockname()[1]
    gw.mode = [f"reverse:http://127.0.0.1:9@127.0.0.1:{gw.port}"]
    try:
        with pytest.raises(RuntimeError), gw:
            pass
        assert isinstance(gw.failure, SystemExit) and gw.failure.code == 1
    finally:
        taken.close()
