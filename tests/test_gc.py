"""tabbify_registry/gc.py without a backend: retention from the policy, the freeze protocol,
descriptor sizes, and what `gc` says with Zot."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from addons import freeze, gc_plan
from addons.policy import parse
from addons.publish import write_json
from tabbify_registry import gc
from tabbify_registry.settings import load

POLICY = """
[[retention]]
repositories = ["acme/**"]
keep_last = 1
protected_tags = ["stable"]
untagged_after = "2h"
"""


def test_retention_keeps_tags_of_unknown_push_time_and_protected_ones():
    rules = gc.retention_for(parse(POLICY, "p.toml"), {"acme/app": {"old"}})
    r = rules("acme/app")
    assert r.keep_last == 1 and r.untagged_after == 7200
    assert r.is_protected("stable") and r.is_protected("old") and not r.is_protected("v1")
    default = rules("globex/app")  # no rule: every tag stays, untagged after 1 h
    assert default.keep_last is None and default.untagged_after == gc_plan.DEFAULT_GRACE
    assert not default.is_protected("v1")


def test_descriptor_sizes():
    body = json.dumps(
        {
            "config": {"digest": "sha256:" + "a" * 64, "size": 10},
            "layers": [{"digest": "sha256:" + "b" * 64, "size": 20}, {"digest": 3}],
            "manifests": [{"digest": "sha256:" + "c" * 64, "size": -1}],
        }
    ).encode()
    assert gc.descriptor_sizes(body) == {"sha256:" + "a" * 64: 10, "sha256:" + "b" * 64: 20}
    assert gc.descriptor_sizes(b"not json") == {}


def write_worker(directory: Path, n: int, seen: str | None, in_flight: int) -> None:
    state = {"time": time.time(), "freeze": {"seen": seen, "in_flight": in_flight}}
    write_json(directory / f"worker-{n}.json", state)  # atomic, as workers publish it


def test_the_freeze_waits_for_every_worker_and_is_always_lifted(tmp_path):
    write_worker(tmp_path, 0, None, 0)
    write_worker(tmp_path, 1, None, 0)
    (tmp_path / "worker-9.json").write_text(json.dumps({"time": 0}))  # long gone: not waited for
    f = gc.Freeze(tmp_path, wait=5)

    def workers_follow() -> None:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            marker = freeze.read_marker(tmp_path / freeze.MARKER)
            if marker:
                write_worker(tmp_path, 0, marker["id"], 0)
                write_worker(tmp_path, 1, marker["id"], 1)  # a write still in flight…
                time.sleep(0.5)
                write_worker(tmp_path, 1, marker["id"], 0)  # …then done
                return
            time.sleep(0.05)

    t = threading.Thread(target=workers_follow)
    t.start()
    started = time.monotonic()
    with f:
        assert time.monotonic() - started >= 0.4
        assert freeze.read_marker(tmp_path / freeze.MARKER)["id"] == f.id
    t.join()
    assert not (tmp_path / freeze.MARKER).exists()


def test_the_freeze_gives_up_on_writes_that_do_not_end(tmp_path):
    f = gc.Freeze(tmp_path, wait=0.5)
    write_worker(tmp_path, 0, "someone-else", 0)
    with pytest.raises(gc.GcError, match="nothing was removed"), f:
        pass
    assert not (tmp_path / freeze.MARKER).exists()


def test_a_marker_expires_by_itself(tmp_path):
    path = tmp_path / freeze.MARKER
    path.write_text(json.dumps({"id": "x", "until": time.time() - 1}))
    assert freeze.read_marker(path) is None
    path.write_text(json.dumps({"id": "x", "until": time.time() + 60}))
    assert freeze.read_marker(path)["id"] == "x"
    path.write_text("garbage")
    assert freeze.read_marker(path) is None


def test_with_zot_gc_is_zots_own(tmp_path):
    (tmp_path / "policy.toml").write_text(POLICY)
    env = {"REGISTRY_DATA_DIR": str(tmp_path), "REGISTRY_BACKEND": "zot",
           "REGISTRY_AUTH_URL": "http://127.0.0.1:1", "REGISTRY_GC_INTERVAL": "12h"}  # fmt: skip
    report = gc.run_once(load(env), dry_run=False)
    assert report["backend"] == "zot" and "nothing was triggered" in report["message"]
    settings = report["settings"]
    assert settings["gc"] is True and settings["gcInterval"] == "12h"
    assert settings["retention"]["policies"][0]["repositories"] == ["acme/**"]


def test_the_periodic_run_goes_on_after_a_failure(tmp_path, monkeypatch, capsys):
    s = load({"REGISTRY_DATA_DIR": str(tmp_path), "REGISTRY_BACKEND": "distribution"})
    runs, sleeps = [], []

    def run_once(settings, dry_run, freeze_wait):
        runs.append(dry_run)
        if len(runs) == 1:
            raise gc.GcError("writes still in flight")
        return {"backend": "distribution", "dry_run": False, "totals": {"manifests": 2}}

    real_sleep = gc.time.sleep

    def sleep(seconds):
        # time.sleep is process-wide: threads other tests left running (a log writer) sleep too
        if threading.current_thread() is not threading.main_thread():
            return real_sleep(seconds)
        sleeps.append(seconds)
        if len(sleeps) > 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(gc, "run_once", run_once)
    monkeypatch.setattr(gc.time, "sleep", sleep)
    with pytest.raises(KeyboardInterrupt):
        gc.periodic(s, 3600, 10)
    assert sleeps == [3600] * 3 and runs == [False, False]
    err = capsys.readouterr().err.splitlines()
    assert "failed: writes still in flight" in err[0] and "removed 2 manifests" in err[1]
    assert list((tmp_path / "gc").glob("report-*.json"))


def test_run_starts_the_gc_program_only_with_an_interval_and_distribution():
    from tabbify_registry.cli import gc_command, supervisor_env

    env = {"REGISTRY_DATA_DIR": "/d", "REGISTRY_BACKEND": "distribution",
           "REGISTRY_GC_INTERVAL": "2h"}  # fmt: skip
    s = load(env)
    child = supervisor_env(env, s, Path("/d/run/c.json"))
    assert child["TBF_GC_AUTOSTART"] == "true"
    assert not any(k.startswith("REGISTRY_") for k in child)  # only on gc's own command line
    command = gc_command(env, s)
    assert command[:4] == ["env", "REGISTRY_BACKEND=distribution", "REGISTRY_DATA_DIR=/d",
                           "REGISTRY_GC_INTERVAL=2h"]  # fmt: skip
    assert command[-3:] == ["gc", "--every", "7200"]
    for other in ({**env, "REGISTRY_BACKEND": "zot"}, {"REGISTRY_DATA_DIR": "/d"}):
        assert supervisor_env(other, load(other), Path("/x"))["TBF_GC_AUTOSTART"] == "false"
