from __future__ import annotations

import fcntl
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.images import layout_blobs
from tests.support.postgres import Postgres
from tests.support.stack import Stack
from tests.support.standins.auth import AuthStandin, tabbify_jwt

# --- Parallel runs (pytest-xdist, `--dist loadfile`: a module's tests, and so its shared stack,
# stay on one worker) ---------------------------------------------------------------------------

# Modules that take a minute or more, longest first: they start first, so that none of them
# is left running alone at the end while the other workers idle (workers take modules in
# collection order). From a parallel run's junit times (setup + call + teardown). The
# connection tests run `alone`: first, before the other workers have anything to drain.
# Then the other e2e modules, alphabetically; the other unit modules last, filling the gaps.
TESTS = Path(__file__).parent
FIRST = (
    "e2e/test_connections",
    "e2e/test_mesh_hostile",  # 217 s
    "e2e/test_durability",  # 146 s
    "e2e/test_lifecycle",  # 117 s
    "e2e/test_storage",  # 106 s
    "e2e/test_hostile",  # 96 s
    "e2e/test_ledger_loss",  # 87 s
    "e2e/test_isolation",  # 75 s
    "e2e/test_quota",  # 70 s
    "e2e/test_faults",  # 67 s
    "e2e/test_mirror",  # 65 s
    "e2e/test_gc",  # 60 s
    "e2e/test_conformance",  # 56 s
    # Hypothesis properties: CPU for a minute each on a loaded machine, the tail otherwise.
    "unit/test_gc_plan",
    "unit/test_listing",
    "unit/test_policy_properties",
    "unit/test_properties",
)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "alone: timing-sensitive (latency, rates); in a parallel run no other test runs meanwhile",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Slow modules first, then the other e2e modules, then the unit tests (stable within)."""

    def rank(item: pytest.Item) -> tuple[int, int]:
        name = item.path.relative_to(TESTS).with_suffix("").as_posix()
        if name in FIRST:
            return 0, FIRST.index(name)
        return (1 if item.get_closest_marker("e2e") else 2), 0

    module_rank: dict[Path, tuple[int, int]] = {}
    for item in items:
        module_rank[item.path] = min(module_rank.get(item.path, (9, 0)), rank(item))
    order = {path: n for n, path in enumerate(sorted(module_rank, key=module_rank.__getitem__))}
    items.sort(key=lambda item: order[item.path])  # stable: a module's tests keep their order


def _alone(item: pytest.Item | None) -> bool:
    return item is not None and item.get_closest_marker("alone") is not None


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    """In a parallel run, a test marked `alone` (or a module: `pytestmark`) waits until no other
    worker is inside a test, and none starts one until it is done: a readers-writer lock over
    flock, a turnstile file every test passes and a room file held shared by tests and
    exclusively by `alone` ones, which keep the turnstile while they wait so that they are not
    starved. Set-up and tear-down are inside, so a module's stack booting elsewhere does not
    share the CPU with it either; consecutive `alone` tests (a module) keep the room between
    them, so that a module marked `alone` drains the others once, not at each test."""
    workerinput = getattr(item.config, "workerinput", None)
    if workerinput is None:  # not under xdist: nothing runs beside
        return (yield)
    held = item.config.stash.get(_ROOM, None)  # the room, still held by the previous test
    if held is None:
        locks = Path(tempfile.gettempdir()) / f"tbf-pytest-{workerinput['testrunuid']}"
        locks.mkdir(exist_ok=True)
        with open(locks / "turnstile", "a") as turnstile:
            fcntl.flock(turnstile, fcntl.LOCK_EX)
            held = open(locks / "room", "a")  # noqa: SIM115 (held across tests)
            fcntl.flock(held, fcntl.LOCK_EX if _alone(item) else fcntl.LOCK_SH)
    try:
        return (yield)
    finally:
        if _alone(item) and _alone(nextitem):
            item.config.stash[_ROOM] = held
        else:
            item.config.stash[_ROOM] = None
            held.close()  # closing the file releases its lock


_ROOM = pytest.StashKey[object]()


@pytest.fixture(scope="module")
def auth() -> Iterator[AuthStandin]:
    standin = AuthStandin().start()
    yield standin
    standin.stop()


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory, auth: AuthStandin) -> Iterator[Stack]:
    """A stack with auth on, shared by a module's tests (each test uses its own repos)."""
    stack = Stack(tmp_path_factory.mktemp("reg") / "data", auth.url).start()
    yield stack
    stack.stop()


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """One real PostgreSQL server for the session; `postgres.database()` for a fresh database."""
    server = Postgres().start()
    yield server
    server.remove()


@pytest.fixture(scope="session")
def acme_jwt() -> str:
    return tabbify_jwt({"sub": "user-1", "network": "acme"})


@pytest.fixture(scope="session")
def globex_jwt() -> str:
    return tabbify_jwt({"sub": "globex", "wrap": True})  # tenant from `sub`, claims wrapped


def skopeo(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """skopeo as users run it; HTTP registries need tls-verify off."""
    return subprocess.run(
        ["skopeo", "--insecure-policy", *args], capture_output=True, text=True, timeout=timeout
    )


def skopeo_copy(
    src: str, dest: str, credential: str | None = None, *extra: str
) -> subprocess.CompletedProcess[str]:
    """`skopeo copy` with the flags every registry side needs here (plain HTTP, Tabbify JWT)."""
    args = ["copy", *extra]
    for side, ref in (("src", src), ("dest", dest)):
        if ref.startswith("docker://"):
            args.append(f"--{side}-tls-verify=false")
            if credential:
                args += [f"--{side}-creds", f"x:{credential}"]
    return skopeo(*args, src, dest)


def skopeo_round_trip(tmp_path: Path, ref: str, credential: str | None = None) -> dict[str, bytes]:
    """skopeo pushes the OCI layout at `tmp_path/src` (tag v1) to `ref` and pulls it back into
    `tmp_path/out`: the blobs pulled, digest → bytes."""
    for src, dest in ((f"oci:{tmp_path / 'src'}:v1", ref), (ref, f"oci:{tmp_path / 'out'}:v1")):
        r = skopeo_copy(src, dest, credential)
        assert r.returncode == 0, r.stderr
    return layout_blobs(tmp_path / "out")


@pytest.fixture
def layout_dir(tmp_path: Path) -> Path:
    return tmp_path / "layout"
