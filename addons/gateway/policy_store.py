"""The current access policy of a running gateway, re-read when its file changes.

`current()` is on the hot path: between checks (at most one per `interval`) it is a clock read
and a comparison. A check stats the policy file and the key files it names (mtime_ns, size,
inode). A change is loaded only once the file has looked the same for one whole interval, so
a half-written file (an editor writing in place) is never taken for the new policy: a
truncated file could parse and silently drop a restrict. Edits therefore apply within two
intervals plus the time the writer takes (2 s with the default).

A bad version keeps the last good policy and logs one error for that version; a file that
disappears means the default rule, like a file that never existed (contract §7). Each gateway
worker reloads on its own; worker 0 alone logs a reload and a refused version (once per
change, not once per worker). A failure that is a bug (not a PolicyError) is logged by every
worker it happens in.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from mitmproxy import ctx, exceptions
from mitmproxy.addonmanager import Loader

from addons import runstate
from addons.decisions.policy import EMPTY, Policy, PolicyError, PolicyFileAbsent, load

logger = logging.getLogger(__name__)

Stamp = tuple[tuple[str, runstate.Stamp | None], ...]


def stamp(paths: Iterable[Path]) -> Stamp:
    """What a change of any of `paths` changes; None for a file that is not there."""
    return tuple((str(path), runstate.stamp(path)) for path in paths)


def read(path: Path) -> Policy:
    """The policy in `path`, or the default one when there is no such file."""
    try:
        return load(path)
    except PolicyFileAbsent:
        return EMPTY


class PolicyStore:
    def __init__(
        self,
        path: Path,
        interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        reports: bool = True,
    ) -> None:
        self.path = path
        # Every gateway worker holds a store and reloads it; only the reporting one (worker
        # 0) logs what it loaded or refused, so one change is one log line, not one a worker.
        self.reports = reports
        self.interval = interval
        self.clock = clock
        self.policy = EMPTY
        self._stamp: Stamp = ()  # of the files behind self.policy
        self._pending: Stamp | None = None  # a change seen at the last check, not loaded yet
        self._reported: Stamp | None = None  # the bad version already logged
        self._next_check = float("-inf")
        self._lock = threading.Lock()

    def _watched(self) -> list[Path]:
        return [self.path, *self.policy.files]

    def load_initial(self) -> Policy:
        """Load at start-up; PolicyError (one line, file:line) refuses the start."""
        before = stamp([self.path])
        self.policy = read(self.path)
        self._stamp = before + stamp(self.policy.files)
        self._next_check = self.clock() + self.interval
        if self.reports:
            logger.info("access policy: %s", describe(self.path, self.policy))
        return self.policy

    def current(self) -> Policy:
        now = self.clock()
        if now >= self._next_check and self._lock.acquire(blocking=False):
            try:
                self._next_check = now + self.interval
                self._check()
            finally:
                self._lock.release()
        return self.policy

    def _check(self) -> None:
        seen = stamp(self._watched())
        if seen == self._stamp:
            self._pending = None
            return
        if seen != self._pending:  # changed since the last check: let the writer finish
            self._pending = seen
            return
        self._pending = None
        if seen == self._reported:
            return
        before = stamp([self.path])
        try:
            policy = read(self.path)
        except PolicyError as e:
            self._reported = seen
            if self.reports:
                logger.error("access policy: %s; keeping the last good policy", e)
            return
        except Exception:  # a bug must not turn every check into a failed request
            self._reported = seen
            logger.exception(
                "access policy: %s: cannot load; keeping the last good policy", self.path
            )
            return
        if stamp([self.path]) != before:  # written while we read: look again next time
            return
        self.policy = policy
        self._stamp = before + stamp(policy.files)
        self._reported = None
        if self.reports:
            logger.info("access policy reloaded: %s", describe(self.path, policy))


def describe(path: Path, policy: Policy) -> str:
    """One line: the file and its rule counts, or that the default rule applies."""
    if policy is EMPTY:
        return f"{path}: no policy file: default rule"
    counts = ", ".join(f"{n} {kind}" for kind, n in policy.counts().items())
    return f"{path}: ok ({counts})"


class PolicyFile:
    """The addon holding the gateway's PolicyStore (`registry_policy_file`; empty = the
    default rule alone). The deciding addons get it at construction and ask `current()` on
    every request, so an edit applies to tokens already issued. The file is checked by a
    task of its own, not by requests: an edit that revokes a right applies on time even if
    no request comes in between (a check driven by requests would let the first one after
    a quiet hour pass on the old policy)."""

    def __init__(self) -> None:
        self.store: PolicyStore | None = None
        self._task: asyncio.Task[None] | None = None

    def load(self, loader: Loader) -> None:
        loader.add_option(
            "registry_policy_file", str, "", "Access policy (TOML); absent file = default rule."
        )

    def configure(self, updated: set[str]) -> None:
        if "registry_worker" in updated and self.store is not None:
            self.store.reports = ctx.options.registry_worker == 0
        if "registry_policy_file" not in updated:
            return
        path = ctx.options.registry_policy_file
        if not path:
            self.store = None
            return
        # `registry_worker` is publish.py's option; a gateway without it is a single worker.
        worker = getattr(ctx.options, "registry_worker", 0)
        store = PolicyStore(Path(path), reports=worker == 0)
        try:
            store.load_initial()
        except PolicyError as e:
            raise exceptions.OptionsError(str(e)) from None
        self.store = store

    async def running(self) -> None:
        self._task = asyncio.create_task(self._follow())

    async def _follow(self) -> None:
        while True:
            store = self.store
            await asyncio.sleep(store.interval if store is not None else 1.0)
            if store is not None:
                try:  # in a thread: a slow disk never stalls the event loop
                    await asyncio.to_thread(store.current)
                except Exception:  # the store logs its own errors; keep following
                    logger.exception("access policy: check failed")

    async def done(self) -> None:
        if self._task is not None:
            self._task.cancel()

    def current(self) -> Policy:
        return self.store.policy if self.store is not None else EMPTY
