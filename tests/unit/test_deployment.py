"""deployment.environment: a command given a data dir takes the settings `run` recorded
there, and refuses an environment that contradicts them."""

from __future__ import annotations

import json

import pytest

from addons.cli import deployment
from addons.config.settings import ConfigError, load

AUTH = "http://auth.internal:8080"


def recorded_run(tmp_path, **env: str) -> dict[str, str]:
    run_env = {"REGISTRY_DATA_DIR": str(tmp_path), "REGISTRY_BACKEND": "distribution", **env}
    deployment.write(run_env, load(run_env))
    return run_env


def test_a_bare_environment_gets_the_deployments_settings(tmp_path):
    recorded_run(tmp_path, REGISTRY_AUTH_URL=AUTH, REGISTRY_POLICY_FILE="/etc/p.toml")
    s = load(deployment.environment({"REGISTRY_DATA_DIR": str(tmp_path)}, required=True))
    assert not s.anonymous and s.auth_url == AUTH
    assert str(s.policy_file) == "/etc/p.toml" and s.backend == "distribution"


def test_the_same_settings_again_are_fine(tmp_path):
    run_env = recorded_run(tmp_path, REGISTRY_AUTH_URL=AUTH, REGISTRY_LOG_LEVEL="debug")
    merged = deployment.environment({**run_env, "REGISTRY_LOG_LEVEL": "info"}, required=True)
    assert merged["REGISTRY_AUTH_URL"] == AUTH


@pytest.mark.parametrize(
    ("given", "variable"),
    [
        ({"REGISTRY_AUTH_URL": "http://elsewhere:1"}, "REGISTRY_AUTH_URL"),
        ({"REGISTRY_GC_INTERVAL": "1h"}, "REGISTRY_GC_INTERVAL"),  # run had none
        ({"REGISTRY_BACKEND": "zot"}, "REGISTRY_BACKEND"),
    ],
)
def test_a_contradiction_is_one_line_naming_the_variable(tmp_path, given, variable):
    recorded_run(tmp_path, REGISTRY_AUTH_URL=AUTH)
    with pytest.raises(ConfigError) as info:
        deployment.environment({"REGISTRY_DATA_DIR": str(tmp_path), **given}, required=False)
    assert variable in str(info.value) and "\n" not in str(info.value)


def test_nothing_recorded(tmp_path):
    env = {"REGISTRY_DATA_DIR": str(tmp_path)}
    with pytest.raises(ConfigError) as info:
        deployment.environment(env, required=True)
    assert "no settings recorded" in str(info.value) and "\n" not in str(info.value)
    assert deployment.environment(env, required=False) == env  # config: as run would


def test_no_secret_is_recorded(tmp_path):
    recorded_run(
        tmp_path,
        REGISTRY_LEDGER_URL="postgresql://registry:s3cret@db.internal/ledger",
        MESH_AUTH_KEY="join-key-123",
        REGISTRY_AUTH_URL=AUTH,
    )
    path = deployment.record_path(tmp_path)
    text = path.read_text()
    assert "s3cret" not in text and "join-key-123" not in text
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    recorded = json.loads(text)["environment"]
    assert recorded["REGISTRY_LEDGER_URL"] == "postgresql://registry@db.internal/ledger"
    # The same URL with its password given to a command is not a contradiction.
    env = {
        "REGISTRY_DATA_DIR": str(tmp_path),
        "REGISTRY_LEDGER_URL": "postgresql://registry:s3cret@db.internal/ledger",
    }
    assert deployment.environment(env, required=True)["REGISTRY_LEDGER_URL"].endswith("/ledger")
