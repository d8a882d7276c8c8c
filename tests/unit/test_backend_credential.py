"""The backend's credential as `run` makes and hands it out (addons/cli/main.py,
clients/backend_credential.py): per run, 0600, a bcrypt htpasswd of it for the backend, the file's
path (never the secret) on the programs' command lines."""

from __future__ import annotations

import shlex
import stat
from pathlib import Path

import bcrypt
import pytest

from addons.cli import programs
from addons.clients import backend_credential
from addons.config.settings import ConfigError, load

CLUSTER = {
    "REGISTRY_BACKEND": "zot",
    "REGISTRY_STORAGE": "s3",
    "REGISTRY_S3_BUCKET": "tbf-registry",
    "REGISTRY_S3_REGION": "eu-central-1",
    "REGISTRY_BACKEND_ADDR": "[fd5a:1f02::1]:5001",
    "REGISTRY_CLUSTER_MEMBERS": "[fd5a:1f02::1]:5001,[fd5a:1f02::2]:5001",
    "REGISTRY_CLUSTER_HASH_KEY": "0123456789abcdef",
    "REGISTRY_CACHE_URL": "redis://redis.mesh:6379/0",
    "REGISTRY_LEDGER_URL": "s3://tbf-registry/ledger",
    "REGISTRY_AUTH_URL": "http://auth.mesh:8080",
    "REGISTRY_LISTEN": "[fd5a:1f02::1]:5000",
}


def settings(tmp_path: Path, **env: str):
    s = load({"REGISTRY_DATA_DIR": str(tmp_path), **env})
    s.runtime_dir.mkdir(parents=True, exist_ok=True)
    return s


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def verifies(htpasswd: Path, credential: str) -> bool:
    user, _, digest = htpasswd.read_text().strip().partition(":")
    password = credential.partition(":")[2]
    return user == credential.partition(":")[0] and bcrypt.checkpw(
        password.encode(), digest.encode()
    )


@pytest.mark.parametrize("backend", ["distribution", "zot"])
def test_each_run_makes_its_own_credential_for_its_backend(tmp_path, backend):
    s = settings(tmp_path, REGISTRY_BACKEND=backend)
    programs.write_backend_credential(s)
    path, htpasswd = s.runtime_dir / "backend-credential", s.runtime_dir / "backend-htpasswd"
    first = backend_credential.read(path)
    assert mode(path) == 0o600 and mode(htpasswd) == 0o600
    assert first.startswith("tabbify-registry:") and verifies(htpasswd, first)
    assert htpasswd.read_text().split(":", 1)[1].startswith("$2b$04$")  # both backends take it
    programs.write_backend_credential(s)
    second = backend_credential.read(path)
    assert second != first and verifies(htpasswd, second) and not verifies(htpasswd, first)


def test_the_secret_is_on_no_command_line_nor_in_the_environment(tmp_path):
    s = settings(tmp_path, REGISTRY_BACKEND="distribution", REGISTRY_GC_INTERVAL="1h")
    programs.write_backend_credential(s)
    password = backend_credential.read(s.runtime_dir / "backend-credential").partition(":")[2]
    env = programs.supervisor_env({"REGISTRY_DATA_DIR": str(tmp_path)}, s, tmp_path / "c.json")
    assert not [k for k, v in env.items() if password in v]
    gateway, admin = programs.gateway_command(s), programs.admin_command(s)
    where = str(s.runtime_dir / "backend-credential")
    assert f"registry_backend_credential={where}" in gateway
    assert admin[admin.index("--backend-credential") + 1] == where
    assert password not in shlex.join(gateway + admin)


def test_an_external_registry_gets_no_credential_unless_one_is_given(tmp_path):
    s = settings(tmp_path, REGISTRY_BACKEND="external")
    stale = s.runtime_dir / "backend-credential"
    stale.write_text("tabbify-registry:of-an-earlier-run\n")
    (s.runtime_dir / "backend-htpasswd").write_text("tabbify-registry:$2b$04$x\n")
    programs.write_backend_credential(s)
    assert not stale.exists() and not (s.runtime_dir / "backend-htpasswd").exists()
    assert "registry_backend_credential=" in programs.gateway_command(s)
    given = tmp_path / "given"
    given.write_text("robot$ci:token-of-that-registry\n")
    s = settings(tmp_path, REGISTRY_BACKEND="external", REGISTRY_BACKEND_CREDENTIAL_FILE=str(given))
    programs.write_backend_credential(s)
    assert backend_credential.read(stale) == "robot$ci:token-of-that-registry"
    assert not (s.runtime_dir / "backend-htpasswd").exists()  # that registry's own business
    assert f"registry_backend_credential={stale}" in programs.gateway_command(s)


def test_a_zot_cluster_uses_the_one_credential_every_member_holds(tmp_path):
    shared = tmp_path / "shared"
    shared.write_text("tabbify-registry:the-same-on-every-node\n")
    s = settings(tmp_path, **CLUSTER, REGISTRY_BACKEND_CREDENTIAL_FILE=str(shared))
    programs.write_backend_credential(s)
    run_copy = s.runtime_dir / "backend-credential"
    assert backend_credential.read(run_copy) == "tabbify-registry:the-same-on-every-node"
    assert verifies(s.runtime_dir / "backend-htpasswd", backend_credential.read(shared))


@pytest.mark.parametrize("content", ["", "no-colon\n", "user:\n", ":password\n", "a b:c\n"])
def test_a_bad_credential_file_stops_start_up_naming_it(tmp_path, content):
    given = tmp_path / "given"
    given.write_text(content)
    s = settings(tmp_path, REGISTRY_BACKEND="external", REGISTRY_BACKEND_CREDENTIAL_FILE=str(given))
    with pytest.raises(ConfigError, match="REGISTRY_BACKEND_CREDENTIAL_FILE"):
        programs.write_backend_credential(s)
    s = settings(
        tmp_path, REGISTRY_BACKEND="external", REGISTRY_BACKEND_CREDENTIAL_FILE=str(tmp_path / "x")
    )
    with pytest.raises(ConfigError, match="REGISTRY_BACKEND_CREDENTIAL_FILE"):
        programs.write_backend_credential(s)
