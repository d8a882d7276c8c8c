from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.postgres import Postgres
from tests.stack import Stack
from tests.standins.auth import AuthStandin, tabbify_jwt


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


@pytest.fixture
def layout_dir(tmp_path: Path) -> Path:
    return tmp_path / "layout"
