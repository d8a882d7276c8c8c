"""PolicyStore: the running gateway's policy follows its file (contract §7).

A fake clock drives the checks; every write sets its own mtime, so no test waits or depends
on the file system's timestamp granularity. One test runs on the real clock.
"""

from __future__ import annotations

import logging
import os
import time
from itertools import count
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from addons.decisions.policy import EMPTY, PolicyError
from addons.gateway import policy_store
from addons.gateway.policy_store import PolicyStore

GRANT = '[[grant]]\nrepositories = ["acme/**"]\ntenants = ["globex"]\nactions = ["pull"]\n'
RESTRICT = '[[restrict]]\nsubjects = ["viewer"]\nactions = ["pull"]\n'
BAD = GRANT.replace("pull", "write")
_mtimes = count(1)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float = 1.0) -> None:
        self.now += seconds


def write(path: Path, text: str) -> None:
    """Write with a fresh mtime (a real edit always moves it; here it moves by whole seconds)."""
    path.write_text(text)
    ns = next(_mtimes) * 1_000_000_000
    os.utime(path, ns=(ns, ns))


def shares(store: PolicyStore) -> bool:
    return store.current().decide("globex", None, "acme/app", "pull").allowed


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "policy.toml"


def settle(store: PolicyStore, clock: Clock, checks: int = 2) -> None:
    """Let `checks` intervals pass, checking at each: a change is loaded at the second."""
    for _ in range(checks):
        clock.advance()
        store.current()


def test_initial_load(path: Path, clock: Clock):
    store = PolicyStore(path, clock=clock)
    assert store.load_initial() is EMPTY  # absent: the default rule
    write(path, GRANT)
    assert PolicyStore(path, clock=clock).load_initial().grants
    write(path, BAD)
    with pytest.raises(PolicyError, match=r"policy\.toml:4: "):
        PolicyStore(path, clock=clock).load_initial()


def test_an_edit_applies_after_one_stable_interval(path: Path, clock: Clock):
    write(path, GRANT)
    store = PolicyStore(path, clock=clock)
    store.load_initial()
    assert shares(store)
    write(path, RESTRICT)
    clock.advance(0.5)
    assert shares(store)  # not checked yet
    clock.advance(0.5)
    assert shares(store)  # seen changed: wait for the writer to finish
    clock.advance(1.0)
    assert not shares(store)  # unchanged for a whole interval: loaded


def test_between_checks_there_is_no_stat(path: Path, clock: Clock, monkeypatch):
    write(path, GRANT)
    store = PolicyStore(path, clock=clock)
    store.load_initial()
    calls = []
    real = policy_store.stamp
    monkeypatch.setattr(policy_store, "stamp", lambda paths: calls.append(1) or real(paths))
    for _ in range(1000):
        store.current()
    assert calls == []
    clock.advance()
    for _ in range(1000):
        store.current()
    assert len(calls) == 1


def test_a_half_written_file_is_never_used(path: Path, clock: Clock):
    """A writer truncates and writes in place; the truncated file parses and has lost the
    restrict. The store never serves it, since the file changed again before it was stable."""
    write(path, GRANT + RESTRICT)
    store = PolicyStore(path, clock=clock)
    store.load_initial()
    write(path, GRANT)  # the first half of a rewrite
    clock.advance()
    assert store.current().restricts  # seen, pending
    final = GRANT + RESTRICT + '[[immutable]]\nrepositories = ["acme/**"]\ntags = ["v*"]\n'
    write(path, final)  # the writer finishes
    clock.advance()
    assert store.current().restricts and not store.current().immutables  # pending again
    clock.advance()
    assert store.current().restricts and store.current().immutables  # stable: loaded


def test_a_bad_edit_keeps_the_last_good_policy_and_logs_once(path, clock, caplog):
    write(path, GRANT)
    store = PolicyStore(path, clock=clock)
    store.load_initial()
    caplog.set_level(logging.INFO, logger="addons.gateway.policy_store")
    write(path, BAD)
    for _ in range(10):
        settle(store, clock)
        assert shares(store)
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    message = errors[0].getMessage()
    assert f"{path}:4: " in message and "keeping the last good policy" in message
    assert "\n" not in message

    write(path, BAD + "# still bad, another version\n")
    settle(store, clock)
    assert len([r for r in caplog.records if r.levelno == logging.ERROR]) == 2

    write(path, RESTRICT)  # fixed
    settle(store, clock)
    assert not shares(store) and store.current().restricts
    assert "reloaded" in caplog.records[-1].getMessage()


def test_a_file_that_disappears_means_the_default_rule(path: Path, clock: Clock):
    write(path, GRANT)
    store = PolicyStore(path, clock=clock)
    store.load_initial()
    path.unlink()
    clock.advance()
    assert shares(store)  # one check: could be an editor's rename in progress
    clock.advance()
    assert store.current() is EMPTY
    write(path, GRANT)  # and appears again
    settle(store, clock)
    assert shares(store)


def test_a_file_that_appears_is_loaded(path: Path, clock: Clock):
    store = PolicyStore(path, clock=clock)
    assert store.load_initial() is EMPTY
    settle(store, clock)
    assert store.current() is EMPTY
    write(path, GRANT)
    settle(store, clock)
    assert shares(store)


def test_an_unreadable_file_keeps_the_last_good_policy(path: Path, clock: Clock, caplog):
    write(path, GRANT)
    store = PolicyStore(path, clock=clock)
    store.load_initial()
    path.unlink()
    path.mkdir()  # reading fails with an OSError, not "absent"
    settle(store, clock, 4)
    assert shares(store)
    assert len([r for r in caplog.records if r.levelno == logging.ERROR]) == 1


def test_a_changed_key_file_reloads(tmp_path: Path, path: Path, clock: Clock, caplog):
    def key() -> bytes:
        return (
            ec.generate_private_key(ec.SECP256R1())
            .public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )

    keyfile = tmp_path / "cosign.pub"
    keyfile.write_bytes(key())
    write(path, '[[require_signature]]\nrepositories = ["acme/**"]\nkeys = ["cosign.pub"]\n')
    store = PolicyStore(path, clock=clock)
    first = store.load_initial().signatures[0].keys
    keyfile.write_bytes(key())
    os.utime(keyfile, ns=(1, 1))
    settle(store, clock)
    assert store.current().signatures[0].keys != first
    keyfile.write_text("garbage")
    settle(store, clock)
    assert store.current().signatures  # last good kept
    assert "cosign.pub" in caplog.records[-1].getMessage()


def test_real_clock_edit_applies_within_five_seconds(path: Path):
    """Default interval, real time: the contract's 5 s bound, end to end on the store."""
    write(path, GRANT)
    store = PolicyStore(path)
    store.load_initial()
    path.write_text(RESTRICT)  # a real edit, real mtime
    start = time.monotonic()
    while shares(store):
        assert time.monotonic() - start < 5
        time.sleep(0.05)
    assert time.monotonic() - start < 3.5  # two intervals and scheduling slack


def test_a_dangling_symlink_is_an_absent_file(tmp_path: Path, clock: Clock):
    """Kubernetes mounts a ConfigMap as symlinks; a dangling one means no policy file."""
    link = tmp_path / "policy.toml"
    link.symlink_to(tmp_path / "gone.toml")
    assert PolicyStore(link, clock=clock).load_initial() is EMPTY


def test_an_unexpected_error_keeps_the_last_good_policy(path, clock, caplog, monkeypatch):
    write(path, GRANT)
    store = PolicyStore(path, clock=clock)
    store.load_initial()

    def broken(_path: Path) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(policy_store, "load", broken)
    write(path, RESTRICT)
    for _ in range(5):
        settle(store, clock)
        assert shares(store)
    assert len([r for r in caplog.records if r.levelno == logging.ERROR]) == 1


def test_a_reload_is_logged_once_not_once_per_worker(path, clock, caplog, monkeypatch):
    """Every gateway worker holds a PolicyFile and reloads it; worker 0 alone says so."""
    from mitmproxy.test import taddons

    from addons.gateway.policy_store import PolicyFile

    write(path, GRANT)
    caplog.set_level(logging.INFO, logger="addons.gateway.policy_store")
    stores = []
    for worker in range(3):
        addon = PolicyFile()
        with taddons.context(addon) as tctx:
            tctx.options.add_option("registry_worker", int, 0, "")
            tctx.configure(addon, registry_worker=worker, registry_policy_file=str(path))
        assert addon.store is not None
        addon.store.clock, addon.store._next_check = clock, clock() + 1
        stores.append(addon.store)
    # The contexts' own log handlers need their closed event loops: only pytest's stays.
    monkeypatch.setattr(logging.getLogger(), "handlers", [caplog.handler])
    loaded = [r for r in caplog.records if "access policy" in r.getMessage()]
    assert len(loaded) == 1
    caplog.clear()
    write(path, RESTRICT)
    for store in stores:
        settle(store, clock)
        assert store.current().restricts  # every worker follows the edit
    assert len([r for r in caplog.records if "reloaded" in r.getMessage()]) == 1
    write(path, BAD)
    for store in stores:
        settle(store, clock)
    assert len([r for r in caplog.records if r.levelno == logging.ERROR]) == 1
