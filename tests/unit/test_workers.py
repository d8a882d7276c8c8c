"""Several gateway workers, one view: published states summed by the admin endpoint, and the
run's registry-token key handed down in a sealed memfd."""

from __future__ import annotations

import json
import os
import resource
import time

import pytest

from addons.admin.workers import Workers
from addons.cli.programs import token_key
from addons.decisions.metrics import Metrics
from addons.decisions.tokens import TokenSigner
from addons.runstate import write_json


def counted(requests: int, status: int = 200) -> Metrics:
    m = Metrics()
    for _ in range(requests):
        m.observe(status=status, decision="allow", kind="registry", bytes_in=10, bytes_out=5,
                  auth_seconds=None, backend_seconds=0.02)  # fmt: skip
    return m


def test_a_published_state_adds_up_exactly():
    a, b = counted(3), counted(2, 404)
    total = Metrics()
    total.add(a.state())
    total.add(json.loads(json.dumps(b.state())))  # as it travels: JSON in a file
    assert total.requests == {("2xx", "allow"): 3, ("4xx", "allow"): 2}
    assert (total.bytes_in, total.bytes_out) == (50, 25)
    assert total.backend_latency.counts == [
        x + y for x, y in zip(a.backend_latency.counts, b.backend_latency.counts, strict=True)
    ]


def publish(directory, worker: int, pid: int, metrics: Metrics) -> None:
    write_json(
        directory / f"worker-{worker}.json",
        {"pid": pid, "time": time.time(), "metrics": metrics.state(), "connections": {}},
    )


def test_counters_stay_monotonic_when_a_worker_restarts(tmp_path):
    workers = Workers(tmp_path)
    publish(tmp_path, 0, 100, counted(5))
    publish(tmp_path, 1, 200, counted(3))
    workers.refresh()
    assert workers.metrics().requests[("2xx", "allow")] == 8
    publish(tmp_path, 0, 101, counted(1))  # worker 0 restarted: it counts from zero again
    workers.refresh()
    assert workers.metrics().requests[("2xx", "allow")] == 9  # 5 (retired) + 1 + 3
    assert len(workers.live(time.time())) == 2
    assert workers.live(time.time() + 60) == []


def free_high_fd() -> int:
    """A `minfds` whose key descriptor (+8) is unused and under the soft limit."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft - 16


def test_the_run_key_is_sealed_inherited_and_shared(tmp_path):
    minfds = free_high_fd()
    fd = token_key(minfds)
    try:
        assert fd == minfds + 8 and os.get_inheritable(fd)
        key = os.pread(fd, 1024, 0)
        assert len(key) == 32
        with pytest.raises(OSError):
            os.pwrite(fd, b"x", 0)  # sealed: nobody rewrites the key
        # Two workers with the key verify each other's tokens.
        one, two = TokenSigner(key), TokenSigner(os.pread(fd, 1024, 0))
        assert two.verify(one.mint("acme")[0]).tenant == "acme"
    finally:
        os.close(fd)


def token_key_bytes() -> bytes:
    fd = token_key(free_high_fd())
    try:
        return os.pread(fd, 1024, 0)
    finally:
        os.close(fd)


def test_every_run_makes_a_new_key():
    assert token_key_bytes() != token_key_bytes()
