"""The Containerfile cannot be built here (no Docker engine): lint it and check that every
path and command it names exists in the project, so it cannot silently rot."""

from __future__ import annotations

import re
import subprocess
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEXT = (ROOT / "Containerfile").read_text()


def test_hadolint_is_clean():
    r = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "hadolint"), str(ROOT / "Containerfile")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_every_copied_project_path_exists_and_the_package_is_complete():
    sources = []
    for line in TEXT.splitlines():
        if line.startswith("COPY ") and "--from=" not in line:
            sources += line.split()[1:-1]
    assert sources
    for src in sources:
        assert (ROOT / src).exists(), src
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    for package in packages["packages"]:
        assert f"{package}/" in sources, f"package {package} is not copied into the image"


def test_zot_comes_from_the_official_image_at_a_pinned_version():
    version = re.search(r"ARG ZOT_VERSION=(\S+)", TEXT)
    assert version and re.fullmatch(r"v\d+\.\d+\.\d+", version.group(1))
    assert "FROM ghcr.io/project-zot/zot-linux-amd64:${ZOT_VERSION} AS zot" in TEXT
    assert "COPY --from=zot /usr/local/bin/zot-linux-amd64 /usr/local/bin/zot" in TEXT


def test_entrypoint_is_the_run_command_as_pid_1():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert "tabbify-registry" in scripts
    assert 'ENTRYPOINT ["/opt/tabbify-registry/.venv/bin/tabbify-registry", "run"]' in TEXT
    assert "WORKDIR /opt/tabbify-registry" in TEXT and "python -m venv .venv" in TEXT


def test_runtime_has_the_mesh_tools_and_the_data_volume():
    for package in ("wireguard-go=", "wireguard-tools=", "iproute2="):
        assert package in TEXT
    assert "VOLUME /var/lib/tabbify-registry" in TEXT
    python = re.search(r"ARG PYTHON_IMAGE=python:(\d+)\.(\d+)", TEXT)
    assert python and (int(python.group(1)), int(python.group(2))) >= (3, 12)
