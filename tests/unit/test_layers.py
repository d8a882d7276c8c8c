"""The layers of the code (pyproject.toml [tool.importlinter], docs/internals.md): nothing
imports upward, the decisions stay pure, mitmproxy stays in the gateway and its engine."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LINT = Path(sys.executable).with_name("lint-imports")


def lint(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(LINT), "--config", str(root / "pyproject.toml"), "--no-cache"],
        cwd=root,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(root)},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_every_import_contract_is_kept():
    r = lint(ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 broken" in r.stdout


def test_an_upward_or_impure_import_breaks_the_contract(tmp_path):
    """The check can fail: a decision that imports a command, or mitmproxy, is refused."""
    for name in ("addons", "mesh", "zot"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    routes = tmp_path / "addons" / "decisions" / "routes.py"
    routes.write_text(
        routes.read_text() + "\nfrom addons.cli import main  # noqa\nimport mitmproxy  # noqa\n"
    )
    r = lint(tmp_path)
    assert r.returncode != 0
    assert "addons.decisions is not allowed to import addons.cli" in r.stdout
    assert "addons.decisions is not allowed to import mitmproxy" in r.stdout
