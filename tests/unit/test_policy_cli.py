"""`tabbify-registry policy check|explain`, REGISTRY_POLICY_FILE, and start-up refusal.

Most cases call `main([...])` in-process with a patched environment; one runs the installed
console script as a subprocess, as an operator would.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from addons.cli import main as cli
from addons.config import settings
from addons.config.settings import ConfigError

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "docs" / "policy.example.toml"
GRANT = '[[grant]]\nrepositories = ["acme/base/**"]\ntenants = ["globex"]\nactions = ["pull"]\n'


def tabbify(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], env: dict, *argv: str
) -> tuple[int, str, str]:
    for name in ("REGISTRY_POLICY_FILE", "REGISTRY_DATA_DIR"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as info:
        cli.main(list(argv))
    out, err = capsys.readouterr()
    return int(info.value.code or 0), out, err


@pytest.fixture
def run(monkeypatch, capsys):
    return lambda env, *argv: tabbify(monkeypatch, capsys, env, *argv)


# --- check -------------------------------------------------------------------------------------


def test_check_a_valid_file(run, tmp_path: Path):
    (tmp_path / "p.toml").write_text(GRANT)
    status, out, err = run({}, "policy", "check", str(tmp_path / "p.toml"))
    assert (status, err) == (0, "")
    assert out == (
        f"{tmp_path / 'p.toml'}: ok (1 grant, 0 restrict, 0 immutable, "
        "0 require_signature, 0 retention, 0 quota)\n"
    )


def test_check_an_invalid_file_prints_one_line_with_file_and_line(run, tmp_path: Path):
    (tmp_path / "p.toml").write_text(GRANT.replace("pull", "pul"))
    status, out, err = run({}, "policy", "check", str(tmp_path / "p.toml"))
    assert status == 1 and out == ""
    assert err.startswith(f"{tmp_path / 'p.toml'}:4: ") and err.count("\n") == 1


def test_check_defaults_to_the_configured_file(run, tmp_path: Path):
    data = tmp_path / "data"
    status, out, _ = run({"REGISTRY_DATA_DIR": str(data)}, "policy", "check")
    assert (status, out) == (0, f"{data / 'policy.toml'}: no policy file: default rule\n")
    data.mkdir()
    (data / "policy.toml").write_text(GRANT)
    status, out, _ = run({"REGISTRY_DATA_DIR": str(data)}, "policy", "check")
    assert status == 0 and out.startswith(f"{data / 'policy.toml'}: ok (1 grant")
    (tmp_path / "other.toml").write_text("x = 1\n")
    env = {"REGISTRY_DATA_DIR": str(data), "REGISTRY_POLICY_FILE": str(tmp_path / "other.toml")}
    status, _, err = run(env, "policy", "check")
    assert status == 1 and err.startswith(f"{tmp_path / 'other.toml'}:1: unknown table or key")


def test_check_an_explicit_file_that_is_absent_is_an_error(run, tmp_path: Path):
    status, _, err = run({}, "policy", "check", str(tmp_path / "none.toml"))
    assert status == 1 and "none.toml: cannot read" in err


def test_check_the_example(run):
    status, out, _ = run({}, "policy", "check", str(EXAMPLE))
    assert status == 0 and ": ok (3 grant, 3 restrict" in out


def test_a_relative_policy_file_setting_is_refused(run):
    status, _, err = run({"REGISTRY_POLICY_FILE": "policy.toml"}, "policy", "check")
    assert status == 2
    assert err == "tabbify-registry: REGISTRY_POLICY_FILE='policy.toml' must be an absolute path\n"


def test_settings_policy_file():
    assert settings.load({}).policy_file == Path("/var/lib/tabbify-registry/policy.toml")
    assert settings.load({"REGISTRY_DATA_DIR": "/d"}).policy_file == Path("/d/policy.toml")
    assert settings.load({"REGISTRY_POLICY_FILE": "/etc/p.toml"}).policy_file == Path("/etc/p.toml")
    assert settings.load({"REGISTRY_POLICY_FILE": " "}).policy_file.name == "policy.toml"
    with pytest.raises(ConfigError, match="REGISTRY_POLICY_FILE"):
        settings.load({"REGISTRY_POLICY_FILE": "./p.toml"})


# --- explain -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "status", "line"),
    [
        (["--tenant", "globex", "--repository", "acme/base/debian", "--action", "pull"], 0,
         "allow grant {f}:12"),
        (["--tenant", "globex", "--repository", "acme/base/debian", "--action", "push"], 1,
         "deny no rule"),
        (["--tenant", "acme", "--repository", "acme/app", "--action", "push"], 0,
         "allow owner\nquota 536870912000 bytes for acme by quota {f}:71"),
        (["--tenant", "acme", "--subject", "viewer@acme", "--repository", "acme/app",
          "--action", "push"], 1, "deny restrict {f}:30"),
        (["--tenant", "acme", "--repository", "acme/app", "--action", "delete"], 1,
         "deny restrict {f}:35"),
    ],
)  # fmt: skip
def test_explain(run, args: list[str], status: int, line: str):
    got = run({}, "policy", "explain", "--file", str(EXAMPLE), *args)
    assert got == (status, line.format(f=EXAMPLE) + "\n", "")


def test_explain_uses_the_configured_file(run, tmp_path: Path):
    args = ["--tenant", "globex", "--repository", "acme/base/x", "--action", "pull"]
    assert run({"REGISTRY_DATA_DIR": str(tmp_path)}, "policy", "explain", *args)[:2] == (
        1,
        "deny no rule\n",
    )
    (tmp_path / "policy.toml").write_text(GRANT)
    status, out, _ = run({"REGISTRY_DATA_DIR": str(tmp_path)}, "policy", "explain", *args)
    assert (status, out) == (0, f"allow grant {tmp_path / 'policy.toml'}:1\n")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tenant", "Acme", "--repository", "acme/x", "--action", "pull"], "--tenant"),
        (["--tenant", "acme", "--repository", "acme/../x", "--action", "pull"], "--repository"),
    ],
)
def test_explain_refuses_bad_arguments(run, args: list[str], message: str):
    status, _, err = run({}, "policy", "explain", *args)
    assert status == 2 and message in err and err.count("\n") == 1


def test_explain_with_a_bad_policy_file(run, tmp_path: Path):
    (tmp_path / "p.toml").write_text("x = 1\n")
    args = ["--tenant", "acme", "--repository", "acme/x", "--action", "pull"]
    status, _, err = run({}, "policy", "explain", "--file", str(tmp_path / "p.toml"), *args)
    assert status == 2 and err.startswith(f"{tmp_path / 'p.toml'}:1: ")


def test_explain_action_must_be_known(run):
    args = ["--tenant", "acme", "--repository", "acme/x", "--action", "write"]
    with pytest.raises(SystemExit) as info:
        cli.main(["policy", "explain", *args])
    assert info.value.code == 2


# The example's require_signature key, as `openssl pkey -pubin -outform DER | sha256sum` names it.
EXAMPLE_KEY = "sha256:f075ec93aba0160f335250e010faaecc69a33519094c14642abaf9492ebcf049"
RELEASE_BOT = ["--tenant", "acme", "--subject", "release-bot@acme", "--repository",
               "acme/releases/app"]  # fmt: skip


@pytest.mark.parametrize(
    ("args", "status", "out"),
    [
        (["--action", "push", "--tag", "v1.2"], 1,
         "allow owner\ntag v1.2: immutable by immutable {f}:47: a push over an existing "
         "tag is refused\nquota 536870912000 bytes for acme by quota {f}:71"),
        (["--action", "delete", "--tag", "stable"], 1,
         "deny restrict {f}:35\ntag stable: immutable by immutable {f}:47: a delete is refused"),
        (["--action", "push", "--tag", "nightly"], 0,
         "allow owner\ntag nightly: no [[immutable]] rule covers it\n"
         "quota 536870912000 bytes for acme by quota {f}:71"),
        (["--action", "pull"], 0,
         f"allow owner\nsignature required by require_signature {{f}}:53: one of {EXAMPLE_KEY}"),
    ],
)  # fmt: skip
def test_explain_tags_signatures_and_quotas(run, args: list[str], status: int, out: str):
    got = run({}, "policy", "explain", "--policy", str(EXAMPLE), *RELEASE_BOT, *args)
    assert got == (status, out.format(f=EXAMPLE) + "\n", "")


def test_a_tag_goes_with_push_or_delete(run):
    status, out, err = run({}, "policy", "explain", *RELEASE_BOT, "--action", "pull", "--tag", "v1")
    assert (status, out) == (2, "") and "--tag goes with --action push or delete" in err


def test_check_and_explain_take_the_policy_file_the_same_way(run, tmp_path: Path):
    (tmp_path / "p.toml").write_text(GRANT)
    args = ["--tenant", "globex", "--repository", "acme/base/x", "--action", "pull"]
    for command in (["check"], ["explain", *args]):
        status, out, err = run({}, "policy", *command, "--policy", str(tmp_path / "p.toml"))
        assert status == 0 and err == "" and str(tmp_path / "p.toml") in out, (command, err)
        # Without it: the deployment's REGISTRY_POLICY_FILE, for both.
        env = {"REGISTRY_POLICY_FILE": str(tmp_path / "p.toml")}
        status, out, err = run(env, "policy", *command)
        assert status == 0 and str(tmp_path / "p.toml") in out, (command, err)
    status, _, err = run({}, "policy", "check", "--policy", str(tmp_path / "p.toml"), "/x.toml")
    assert status == 2 and "once" in err


# --- start-up ----------------------------------------------------------------------------------


def test_run_refuses_a_bad_policy_before_starting_anything(run, tmp_path: Path):
    (tmp_path / "policy.toml").write_text(GRANT + "oops = 1\n")
    status, out, err = run({"REGISTRY_DATA_DIR": str(tmp_path)}, "run")
    assert status == 2 and out == ""
    assert err == (
        f"tabbify-registry: {tmp_path / 'policy.toml'}:5: [[grant]] unknown key 'oops' "
        "(expected one of actions, repositories, subjects, tenants)\n"
    )
    assert not (tmp_path / "run").exists()  # nothing was started or written


def test_the_console_script(tmp_path: Path):
    """As an operator runs it: the installed entry point, exit status and one line."""
    script = Path(sys.executable).parent / "tabbify-registry"
    (tmp_path / "p.toml").write_text(GRANT.replace("globex", "Globex"))
    done = subprocess.run(
        [str(script), "policy", "check", str(tmp_path / "p.toml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.startswith(f"{tmp_path / 'p.toml'}:3: [[grant]] 'tenants': bad value")
    assert done.stderr.count("\n") == 1
