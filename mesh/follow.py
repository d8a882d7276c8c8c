"""Follow mesh membership: ask the coordinator for this node's peer set every MESH_POLL_SECONDS
and apply changes in place (`wg syncconf`: peers added, removed or moved; live sessions kept).

Runs under supervisord beside the gateway (`python -m mesh.follow <data dir>`; the MESH_*
variables come from the environment). The coordinator is untrusted input:

- a usable answer is applied peer by peer: invalid entries are skipped (one log line each, and
  /healthz says `degraded` with the reason), every valid peer is applied;
- an unusable answer (unreachable, slow, huge, redirected, 5xx, not JSON, wrong shape, nothing
  valid) changes nothing: the node keeps the last peer set it applied, `/healthz` says
  `degraded`, and the next attempt comes after an exponential, jittered backoff (up to 10 x
  MESH_POLL_SECONDS), back to the normal period after the first success;
- the follower never exits on an answer: every failure of an attempt is caught and reported.

The node re-joins (POST /v1/nodes) at its first attempt, after any failure (a coordinator that
lost its state, a 404 for our peer list), and every REJOIN_EVERY polls: the join answer is where
the coordinator can move the node to another ULA. A join answered with something unusable does
not stop the peer list from being followed in the same attempt. A move adds the new address at
once (the gateway follows state.json and re-binds) and keeps the old one until no TCP
connection uses it, ULA_GRACE_SECONDS at most.
"""

from __future__ import annotations

import dataclasses
import os
import random
import sys
import time
import traceback
from collections.abc import Callable

from addons.config import settings as settings_mod
from mesh import fetch, interface
from mesh.bootstrap import join_request, skipped_reason, warn
from mesh.coordinator import Coordinator, CoordinatorUnusable
from mesh.model import NodeState, Retiring
from mesh.state import MeshDir, MeshError, public_key
from mesh.status import DEGRADED, OK, StatusFile
from mesh.validate import Skipped

REJOIN_EVERY = 3  # polls between re-joins: a ULA move shows only in a join answer
BACKOFF_FACTOR = 10  # the longest wait, in MESH_POLL_SECONDS
ULA_GRACE_SECONDS = 900  # at most this long on a ULA the coordinator moved us away from
RETIRE_MIN_AGE = 5.0  # at least this long: the gateway re-binds within ~1 s of the move
STATUS_SLACK = 30.0  # seconds past the next attempt before /healthz calls the follower silent


# --- pure decisions ----------------------------------------------------------------------------


def backoff_delay(failures: int, base: float, rand: float) -> float:
    """Seconds until the next attempt: `base` after a success; after n failures in a row
    base·2ⁿ capped at BACKOFF_FACTOR·base, jittered (`rand` in [0, 1)) into its upper half so
    that nodes which failed together do not retry together; never below `base`."""
    if failures <= 0:
        return base
    ceiling = min(base * BACKOFF_FACTOR, base * 2 ** min(failures, 30))
    return max(base, ceiling * (0.5 + rand / 2))


def plan_move(current: NodeState, answer: NodeState, now: float, grace: float) -> NodeState:
    """The state after a join answer: when the ULA changed, the old one is retiring (kept for
    connections in progress until `now + grace`); a ULA the node moves back to stops retiring."""
    retiring = [r for r in current.retiring if r.ula != answer.ula]
    if answer.ula != current.ula and all(r.ula != current.ula for r in retiring):
        retiring.append(Retiring(current.ula, now, now + grace))
    return dataclasses.replace(answer, retiring=tuple(retiring))


def retire_due(
    retiring: tuple[Retiring, ...],
    now: float,
    connections: Callable[[str], int],
    min_age: float = RETIRE_MIN_AGE,
) -> tuple[tuple[Retiring, ...], tuple[Retiring, ...]]:
    """(still retiring, done): an old ULA is done when its time is up, or when no connection
    uses it once it is `min_age` old (a connection accepted while the gateway was still
    re-binding must not lose its address under it)."""
    keep: list[Retiring] = []
    done: list[Retiring] = []
    for r in retiring:
        unused = now - r.since >= min_age and connections(r.ula) == 0
        (done if now >= r.until or unused else keep).append(r)
    return tuple(keep), tuple(done)


# --- the loop ----------------------------------------------------------------------------------


class Follower:
    def __init__(
        self,
        s: settings_mod.Settings,
        mesh: MeshDir,
        key: str,
        state: NodeState,
        grace: float = ULA_GRACE_SECONDS,
    ) -> None:
        assert s.mesh_coordinator_url
        self.s, self.mesh, self.key, self.state = s, mesh, key, state
        self.public_key = public_key(key)
        self.coordinator = Coordinator(s.mesh_coordinator_url, s.mesh_auth_key)
        self.grace = grace
        self.retire_min_age = RETIRE_MIN_AGE
        self.joined = False  # re-register at the first attempt: retries a join that failed at boot
        self.polls = 0
        self.failures = 0
        self.reason: str | None = None
        self.reported: set[str] = set()  # skipped-peer lines already logged
        self.status = StatusFile(mesh.status_file)

    # one attempt ---------------------------------------------------------------------------

    def attempt(self) -> tuple[tuple[Skipped, ...], str | None]:
        """One exchange with the coordinator, applied: the skipped peers, and why a re-join that
        was due failed when the peer list could be followed anyway. Raises CoordinatorUnusable
        (no usable answer) or MeshError (the interface refused a change); nothing is saved then.
        """
        join_failed = None
        if not self.joined or self.polls >= REJOIN_EVERY:
            also_own = (self.state.ula, *(r.ula for r in self.state.retiring))
            try:
                joined = self.coordinator.join(join_request(self.public_key, self.state), also_own)
            except CoordinatorUnusable as e:
                if not e.answered:  # unreachable: asking for the peers would fail the same way
                    raise
                join_failed = f"re-join failed: {e}"  # a bad join answer: still follow the peers
            else:
                self.apply(plan_move(self.state, joined.state, time.time(), self.grace))
                self.joined, self.polls = True, 0
                return joined.skipped, None
        self.polls += 1
        try:
            peers = self.coordinator.peers(self.state, self.public_key)
        except CoordinatorUnusable as e:
            if join_failed:
                raise CoordinatorUnusable(f"{join_failed}; {e}") from None
            raise
        self.apply(dataclasses.replace(self.state, peers=peers.peers))
        return peers.skipped, join_failed

    def apply(self, new: NodeState) -> None:
        """Bring the interface to `new`, then persist it: state.json only ever holds what was
        applied (it is what a restart comes up on)."""
        old, name = self.state, self.s.mesh_interface
        if new == old:
            return
        if new.ula != old.ula:
            interface.add_address(name, new.ula)  # before state.json names it: the gateway binds it
            warn(f"the coordinator moved this node from ULA {old.ula} to {new.ula}")
        if new.prefix != old.prefix:
            interface.route(name, new.prefix, old.prefix)
        peers_changed = set(new.peers) != set(old.peers)
        if peers_changed or new.listen_port != old.listen_port:
            interface.sync(name, self.mesh.wg_conf, self.key, new)
        self.mesh.save(new)
        self.state = new
        if peers_changed:
            print(f"mesh: peer set updated ({len(new.peers)} peers)", flush=True)

    def retire(self) -> None:
        """Drop old ULAs nobody uses any more (or whose grace is over)."""
        if not self.state.retiring:
            return
        keep, done = retire_due(
            self.state.retiring, time.time(), interface.connections_on, self.retire_min_age
        )
        for r in done:
            interface.remove_address(self.s.mesh_interface, r.ula)
            print(f"mesh: old ULA {r.ula} removed from {self.s.mesh_interface}", flush=True)
        if done:
            new = dataclasses.replace(self.state, retiring=keep)
            self.mesh.save(new)
            self.state = new

    # the step the loop runs ----------------------------------------------------------------

    def report_skipped(self, skipped: tuple[Skipped, ...]) -> None:
        lines = {f"mesh: skipped {x}" for x in skipped}
        for line in sorted(lines - self.reported):
            print(line, flush=True)
        self.reported = lines

    def step(self, rand: Callable[[], float] = random.random) -> float:
        """One attempt, the retirement check and the status; returns the seconds to wait."""
        reason: str | None
        try:
            skipped, join_failed = self.attempt()
        except CoordinatorUnusable as e:
            self.failures, self.joined, reason = self.failures + 1, False, str(e)
        except MeshError as e:
            self.failures, reason = self.failures + 1, f"applying the coordinator's answer: {e}"
        except Exception as e:  # never the recovery path: supervisord restarts are for bugs
            self.failures, reason = self.failures + 1, f"internal error ({type(e).__name__})"
            traceback.print_exc(file=sys.stderr)
        else:
            self.failures = 0
            self.report_skipped(skipped)
            reasons = [r for r in (join_failed, skipped_reason(skipped)) if r]
            reason = "; ".join(reasons) or None
        try:
            self.retire()
        except Exception as e:
            warn(f"retiring an old ULA failed ({type(e).__name__}: {e}); will retry")
        delay = backoff_delay(self.failures, self.s.mesh_poll_seconds, rand())
        if self.failures:
            if reason != self.reason or self.failures % 10 == 0:
                warn(
                    f"{reason}; keeping {len(self.state.peers)} peers "
                    f"(attempt {self.failures} failed, next in {delay:.0f}s)"
                )
        elif self.reason is not None and reason is None:
            print("mesh: following the coordinator again", flush=True)
        self.reason = reason
        state = DEGRADED if reason else OK
        try:
            self.status.write(state, reason, self.state.ula, delay + fetch.DEADLINE + STATUS_SLACK)
        except OSError as e:
            warn(f"cannot write {self.status.path}: {e}")
        return delay


def main(argv: list[str]) -> int:
    s = settings_mod.load({**os.environ, "REGISTRY_DATA_DIR": argv[0]})
    mesh = MeshDir(s.data_dir)
    key = mesh.private_key()
    state, dropped = mesh.load(public_key(key))
    for line in dropped:
        warn(f"persisted {line}: dropped")
    if state is None:
        warn("no mesh state to follow")
        return 1
    follower = Follower(s, mesh, key, state)
    delay = float(s.mesh_poll_seconds)
    while True:
        time.sleep(delay)
        delay = follower.step()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
