"""The command line as a user first meets it: --version, --help."""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import tomllib

from tests.support.stack import CLI, ROOT


def test_version_is_one_line_from_the_package_metadata():
    r = subprocess.run([CLI, "--version"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    expected = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert importlib.metadata.version("tabbify-registry") == expected
    assert r.stdout == f"tabbify-registry {expected}\n" and r.stderr == ""


def variables_read() -> set[str]:
    """Every REGISTRY_*/MESH_* name the product's sources spell out."""
    read = set()
    for package in ("addons", "mesh", "zot"):
        for source in (ROOT / package).rglob("*.py"):
            read |= set(re.findall(r'"((?:REGISTRY|MESH)_[A-Z0-9_]+)', source.read_text()))
    assert "REGISTRY_DATA_DIR" in read
    return read


def test_the_reference_table_lists_every_variable_the_program_reads():
    table = (ROOT / "docs" / "contract.md").read_text().split("## 2. Environment", 1)[1]
    table = table.split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `((?:REGISTRY|MESH)_[A-Z0-9_]+)`", table, re.M))
    documented |= set(re.findall(r"`((?:REGISTRY|MESH)_[A-Z0-9_]+)`", table))
    missing = sorted(v for v in variables_read() if v not in documented)
    assert not missing, f"docs/contract.md §2 does not list {missing}"


def test_help_lists_every_variable_the_program_reads():
    read = variables_read()
    r = subprocess.run([CLI, "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    missing = sorted(v for v in read if not re.search(rf"\b{v}\b", r.stdout))
    assert not missing, missing


def help_of(*argv: str) -> str:
    r = subprocess.run([CLI, *argv, "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stderr == "", (argv, r.stderr)
    return r.stdout


def test_mesh_up_has_help_of_its_own():
    out = help_of("mesh", "up")
    assert out.startswith("usage: tabbify-registry mesh up [-h]\n")
    assert "MESH_COORDINATOR_URL" in out


COMMANDS = [
    (), ("run",), ("config",), ("mesh",), ("mesh", "up"), ("policy",), ("policy", "check"),
    ("policy", "explain"), ("gc",), ("dev-auth",),
]  # fmt: skip


def test_no_help_text_speaks_of_internal_documents_or_plans():
    for argv in COMMANDS:
        out = help_of(*argv)
        for word in ("CONTRACTS", "§", "phase", "issue"):
            assert word not in out, (argv, word)


def test_policy_check_and_explain_both_take_policy_file():
    for command in ("check", "explain"):
        out = help_of("policy", command)
        assert "--policy FILE" in out and "REGISTRY_POLICY_FILE" in out, command
