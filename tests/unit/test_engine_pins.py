"""The engine patches (addons/engine/hardening.py): for the pinned versions only, in a gateway only.

They replace private mitmproxy and h11 functions process-wide. Applied to another version they
could apply half-way and be silently wrong, so the gateway refuses to start; applied on import
they would change mitmproxy for every test in this process, so only a running gateway (the
gateway process, tests/support/inproc.py) applies them, and the in-process one reverts them.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest
from mitmproxy import addonmanager
from mitmproxy.proxy.layers.http import _http1

from addons.engine import hardening
from addons.gateway import chain

TESTS = Path(__file__).resolve().parents[1]


def named_file(name: str) -> Path:
    """A test file as hardening.py names it: `e2e/test_hostile.py`, or by its name before the
    tests were laid out in folders (`test_e2e_hostile.py`, `test_engine_faults.py`)."""
    if "/" in name:
        return TESTS / name
    if name.startswith("test_e2e_"):
        return TESTS / "e2e" / name.replace("test_e2e_", "test_", 1)
    return TESTS / "unit" / name


def patched_now() -> list[str]:
    """The patch targets that currently hold our replacement."""
    return [
        f"{getattr(owner, '__name__', owner)}.{name}"
        for owner, name, replacement in hardening._patches()
        if vars(owner).get(name) is replacement
    ]


def test_the_pins_are_read_from_pyproject_and_are_what_is_installed():
    pins = hardening.pins()
    assert pins["mitmproxy"] == "12.3.1"  # the pin pyproject.toml has carried all along
    assert hardening.installed_versions() == {"mitmproxy": pins["mitmproxy"], "h11": pins["h11"]}
    assert hardening.version_problem(hardening.installed_versions(), pins) is None


@pytest.mark.parametrize(
    ("installed", "says"),
    [
        ({"mitmproxy": "12.3.2", "h11": "0.16.0"}, "mitmproxy 12.3.2 is installed"),
        ({"mitmproxy": "12.3.1", "h11": "0.17.0"}, "h11 0.17.0 is installed"),
        ({"mitmproxy": "12.3.1", "h11": None}, "h11 (not installed) is installed"),
    ],
)
def test_another_version_is_one_line_naming_the_pin(installed, says):
    problem = hardening.version_problem(installed, {"mitmproxy": "12.3.1", "h11": "0.16.0"})
    assert problem is not None and says in problem and "\n" not in problem
    assert "==" in problem and "install the pinned version" in problem


def test_a_missing_pin_refuses_too():
    problem = hardening.version_problem({"mitmproxy": "12.3.1", "h11": "0.16.0"}, {})
    assert problem is not None and "pin" in problem


def test_the_gateway_refuses_another_mitmproxy_with_one_line_and_patches_nothing(
    monkeypatch, capsys
):
    monkeypatch.setattr(
        hardening, "installed_versions", lambda: {"mitmproxy": "12.4.0", "h11": "0.16.0"}
    )
    with pytest.raises(SystemExit) as exit_:
        asyncio.run(chain.run(["--mode", "reverse:http://127.0.0.1:1@127.0.0.1:0"]))
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("gateway: mitmproxy 12.4.0 is installed, but the engine patches")
    assert "mitmproxy==12.3.1" in err
    assert not hardening.applied() and patched_now() == []


def test_importing_patches_nothing_and_apply_reverts_exactly():
    """Nothing in this test process runs with the patches unless a gateway is running: had an
    earlier test (or an import) left them applied, the first assertion says which."""
    assert patched_now() == [], "engine patches left applied in the test process"
    before = (
        _http1.Http1Server.read_headers,
        asyncio.StreamReader.read,
        addonmanager.AddonManager.trigger_event,
    )
    hardening.apply()
    hardening.apply()  # two in-process gateways at once
    try:
        assert len(patched_now()) == len(hardening._patches())
        hardening.revert()
        assert len(patched_now()) == len(hardening._patches()), "reverted under a running one"
    finally:
        hardening.revert()
    assert patched_now() == []
    after = (
        _http1.Http1Server.read_headers,
        asyncio.StreamReader.read,
        addonmanager.AddonManager.trigger_event,
    )
    assert after == before


def test_every_test_the_patches_name_exists():
    """hardening.py names, beside each patch, a test that fails without it."""
    doc = hardening.__doc__ or ""
    named = re.findall(r"((?:e2e/|unit/)?test_[a-z0-9_]+\.py)::(test_[a-z0-9_]+)", doc)
    assert len(named) >= 10
    missing = [
        f"{file}::{test}"
        for file, test in named
        if not re.search(rf"^(async )?def {test}\(", named_file(file).read_text(), re.M)
    ]
    assert not missing, f"hardening.py names tests that do not exist: {missing}"
    hostile = (TESTS / "e2e/test_hostile.py").read_text()
    for case in ("200-headers", "obs-fold", "nul-in-header-value", "bare-cr-in-value"):
        assert f'"{case}"' in hostile and f"`{case}`" in doc
