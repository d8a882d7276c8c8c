"""The settings a deployment runs with, for the commands that act on it (`gc`, `policy`,
`config`).

`run` records the environment it was given (REGISTRY_*, MESH_*; never MESH_AUTH_KEY, and no
password a URL holds) in `$REGISTRY_DATA_DIR/run/settings.json`, written atomically. A
command given that data directory takes the recorded value of every variable it was not
given, and refuses (one line) a variable given with another value, or given where `run` had
none: so `gc` run by hand with a bare environment acts on the deployment as it runs (auth
mode, policy, backend, ledger), instead of silently taking it for an anonymous one without
a policy.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from addons import runstate
from addons.config.settings import ConfigError, Settings, parse_data_dir, version

PREFIXES = ("REGISTRY_", "MESH_")
NEVER_RECORDED = frozenset({"MESH_AUTH_KEY"})  # a credential
# A preference of the process at hand, not a property of the deployment.
PER_PROCESS = frozenset({"REGISTRY_LOG_LEVEL"})
MAX_RECORD = 1 << 20


def record_path(data_dir: Path) -> Path:
    return data_dir / "run" / runstate.SETTINGS


def without_password(value: str) -> str:
    """A URL's password is never recorded (nor compared): the rest of the URL is."""
    if "://" not in value:
        return value
    try:
        parts = urlsplit(value)
        password = parts.password
    except ValueError:
        return value
    if not password:
        return value
    host = parts.netloc.rpartition("@")[2]
    netloc = f"{parts.username}@{host}" if parts.username else host
    return urlunsplit(parts._replace(netloc=netloc))


def given(env: Mapping[str, str]) -> dict[str, str]:
    """The deployment's variables set in `env` (an empty value counts as unset, as in
    settings.load), passwords out."""
    return {
        name: without_password(value.strip())
        for name, value in env.items()
        if name.startswith(PREFIXES)
        and name not in NEVER_RECORDED
        and name not in PER_PROCESS
        and value.strip()
    }


def record(env: Mapping[str, str], s: Settings) -> dict[str, object]:
    """What `run` writes: the variables it was given, and the backend it chose (the default
    depends on what is on PATH, which another shell may not share)."""

    environment = given(env)
    environment["REGISTRY_BACKEND"] = s.backend
    environment["REGISTRY_DATA_DIR"] = str(s.data_dir)
    return {"written_by": f"tabbify-registry {version()} run", "environment": environment}


def write(env: Mapping[str, str], s: Settings) -> Path:
    path = record_path(s.data_dir)
    text = json.dumps(record(env, s), indent=2, sort_keys=True) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    runstate.write(path, text.encode(), mode=0o600, durable=True)
    return path


def read(data_dir: Path) -> dict[str, str] | None:
    """The recorded environment, or None when no `run` recorded one there."""
    path = record_path(data_dir)
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read(MAX_RECORD))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: cannot read the deployment's settings ({e})") from None
    environment = data.get("environment") if isinstance(data, dict) else None
    if not isinstance(environment, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in environment.items()
    ):
        raise ConfigError(f"{path}: not a settings record of tabbify-registry run")
    return environment


def environment(env: Mapping[str, str], required: bool) -> dict[str, str]:
    """`env` completed with the deployment's recorded settings. Refuses a contradiction; with
    nothing recorded, refuses when `required`, else returns `env` (the settings `run` would
    use with it)."""
    data_dir = parse_data_dir(env)
    recorded = read(data_dir)
    if recorded is None:
        if required:
            raise ConfigError(
                f"REGISTRY_DATA_DIR={data_dir}: no settings recorded there "
                f"({record_path(data_dir)}), so the registry's mode, policy and backend are "
                "unknown: start it once with `tabbify-registry run`"
            )
        return dict(env)
    mine = given(env)
    for name, value in sorted(mine.items()):
        if name == "REGISTRY_DATA_DIR":
            continue
        if name not in recorded:
            raise ConfigError(
                f"{name}={value} is set here, but the registry at {data_dir} runs without it "
                f"({record_path(data_dir)}): unset it"
            )
        if recorded[name] != value:
            raise ConfigError(
                f"{name}={value} here, but the registry at {data_dir} runs with "
                f"{name}={recorded[name]} ({record_path(data_dir)}): give the same, or unset it"
            )
    merged = dict(env)
    for name, value in recorded.items():
        if name not in mine:
            merged[name] = value
    return merged
