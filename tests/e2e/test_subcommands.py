"""`gc`, `policy` and `config` act on the deployment whose REGISTRY_DATA_DIR they are given:
with the settings `run` uses there, never an anonymous mode or an absent policy assumed from
a bare environment."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.e2e.test_lifecycle import run_cli
from tests.support.stack import Stack

pytestmark = pytest.mark.e2e

GRANT = '[[grant]]\nrepositories = ["acme/base/**"]\ntenants = ["globex"]\nactions = ["pull"]\n'


def one_line(r: subprocess.CompletedProcess) -> str:
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and len(lines) == 1, (r.returncode, r.stdout, r.stderr)
    return lines[0]


def test_nothing_recorded_means_gc_cannot_tell_and_says_so(tmp_path):
    r = run_cli({"REGISTRY_DATA_DIR": str(tmp_path)}, "gc", "--dry-run")
    assert "no settings recorded" in one_line(r) and r.stdout == ""


def test_gc_policy_and_config_use_the_settings_run_uses(tmp_path, auth):
    data = tmp_path / "data"
    data.mkdir()
    (data / "policy.toml").write_text(GRANT)
    stack = Stack(data, auth.url).start()
    bare = {"REGISTRY_DATA_DIR": str(data)}  # no REGISTRY_AUTH_URL, no backend address
    try:
        record = json.loads((data / "run" / "settings.json").read_text())["environment"]
        assert record["REGISTRY_AUTH_URL"] == auth.url

        # The same rendered config as with run's own environment.
        as_run = run_cli(stack.env, "config")
        assert as_run.returncode == 0, as_run.stderr
        assert run_cli(bare, "config").stdout == as_run.stdout

        r = run_cli(bare, "gc", "--dry-run")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["dry_run"] is True

        # The policy breaks while the registry runs: gc does not take it for "no policy".
        (data / "policy.toml").write_text(GRANT + "oops = 1\n")
        line = one_line(run_cli(bare, "gc", "--dry-run"))
        assert f"{data / 'policy.toml'}:5" in line
        line = one_line(run_cli(bare, "policy", "check"))
        assert f"{data / 'policy.toml'}:5" in line

        # An environment that contradicts the deployment is refused, naming the variable.
        other = {**bare, "REGISTRY_AUTH_URL": "http://127.0.0.1:1"}
        for command in (["gc", "--dry-run"], ["config"], ["policy", "check"]):
            line = one_line(run_cli(other, *command))
            assert "REGISTRY_AUTH_URL" in line and auth.url in line, command
    finally:
        assert stack.stop() == 0


def test_policy_explain_on_an_anonymous_deployment_says_no_policy_applies(tmp_path):
    stack = Stack(tmp_path / "data", None).start()
    assert stack.stop() == 0
    r = run_cli(
        {"REGISTRY_DATA_DIR": str(stack.data_dir)},
        "policy", "explain", "--tenant", "acme", "--repository", "acme/x", "--action", "pull",
    )  # fmt: skip
    assert "anonymous" in one_line(r)
