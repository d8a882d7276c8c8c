"""The Containerfile cannot be built here (no Docker engine): lint it and check that every
path and command it names exists in the project, so it cannot silently rot."""

from __future__ import annotations

import configparser
import re
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TEXT = (ROOT / "Containerfile").read_text()
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


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
    find = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    for package in find["find"]["include"]:
        top = package.split(".")[0]
        assert f"{top}/" in sources, f"package {package} is not copied into the image"


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


def test_the_image_installs_the_package_not_the_checkout(tmp_path):
    """Not editable: what the package needs at run time (supervisord's configuration, the
    live view's page) is inside the wheel pip builds from the copied sources."""
    install = re.search(r"pip install (.*)$", TEXT, re.M)
    assert install and install.group(1).split()[-1] == "." and "-e" not in install.group(1).split()
    assert "COPY --from=build /opt/tabbify-registry/.venv /opt/tabbify-registry/.venv" in TEXT
    r = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    (wheel,) = tmp_path.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert any(n.endswith(".data/data/share/tabbify-registry/supervisord.conf") for n in names)
    assert "addons/admin/static/live.html" in names
    assert "addons/cli/probe.py" in names and "addons/gateway/chain.py" in names


def test_labels_name_the_version_and_licence_of_the_package():
    assert f"ARG VERSION={PROJECT['version']}" in TEXT
    assert 'org.opencontainers.image.version="${VERSION}"' in TEXT
    assert f'org.opencontainers.image.licenses="{PROJECT["license"]}"' in TEXT
    assert 'org.opencontainers.image.title="tabbify-registry"' in TEXT


def test_the_registry_runs_as_an_unprivileged_user_and_root_is_documented_for_the_mesh():
    users = re.findall(r"^USER (\S+)", TEXT, re.M)
    assert users and users[-1].split(":")[0] not in ("0", "root")
    assert "--user 0 --device /dev/net/tun --cap-add NET_ADMIN" in TEXT


def test_healthcheck_asks_liveness_of_the_admin_endpoint():
    check = re.search(r"^HEALTHCHECK (.*\n)+?.*CMD (\[.*\])$", TEXT, re.M)
    assert check is not None
    assert '"-m", "addons.cli.probe", "/livez"' in check.group(2)
    assert (ROOT / "addons" / "cli" / "probe.py").exists()


def test_stop_timeout_outlasts_supervisord_stopping_every_program():
    """supervisord stops its programs one after another, each waited for up to its
    stopwaitsecs (10 s unless set): the container's stop timeout must be longer."""
    conf = configparser.RawConfigParser()
    conf.read(ROOT / "supervisord.conf")
    worst = sum(
        int(conf[section].get("stopwaitsecs", "10"))
        for section in conf.sections()
        if section.startswith(("program:", "eventlistener:"))
    )
    timeouts = [int(n) for n in re.findall(r"--stop-timeout (\d+)", TEXT)]
    assert timeouts and all(t > worst for t in timeouts), (timeouts, worst)
