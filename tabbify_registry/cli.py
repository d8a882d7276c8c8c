"""`tabbify-registry run | config | mesh up | policy` (CONTRACTS §1, §7).

`run` is the container's PID 1: mesh bootstrap (when configured) → backend config rendered
into REGISTRY_DATA_DIR → supervisord running the backend and mitmdump side by side. It stays
the parent of supervisord (not exec) so it can turn "a program could not start" into a
non-zero exit status, which supervisord alone cannot do.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import IO

from addons import policy_store
from addons.policy import PolicyError
from mesh import bootstrap
from mesh.state import MeshError
from tabbify_registry import policy_cmd
from tabbify_registry import settings as settings_mod
from tabbify_registry.settings import ConfigError, Settings
from zot import config as backend_config

ROOT = Path(__file__).resolve().parent.parent  # the checkout (installed editable)
SUPERVISORD_CONF = ROOT / "supervisord.conf"
BIN = Path(sys.executable).parent


def mitmdump_command(s: Settings) -> list[str]:
    """The gateway (mitmproxy's engine, as mitmdump, see addons/gateway.py) in reverse mode on
    REGISTRY_LISTEN.

    An IPv6 listen host goes without brackets (mitmproxy's mode syntax); the upstream URL
    keeps them. `lazy` so a dead backend does not break answers the addons give themselves.
    """
    upstream = f"http://{s.backend_addr.hostport}"
    return [
        sys.executable, "-m", "addons.gateway",
        "--mode", f"reverse:{upstream}@{s.listen.host}:{s.listen.port}",
        "--set", "connection_strategy=lazy",
        "--set", f"confdir={s.runtime_dir / 'mitmproxy'}",
        "--set", "termlog_verbosity=warn",
        "--set", f"registry_anonymous={'true' if s.anonymous else 'false'}",
        "--set", f"registry_realm={s.realm}",
        "--set", f"registry_auth_url={s.auth_url or ''}",
        # Tenant isolation by digest: only with tenants (auth on).
        "--set", f"registry_ledger={'' if s.anonymous else s.data_dir / 'ledger' / 'ledger.db'}",
        "--set", f"registry_backend={upstream}",
        "--set", f"registry_admin={s.admin_addr.hostport}",
        "--set", f"registry_mesh_interface={s.mesh_interface if s.mesh_coordinator_url else ''}",
        "--set", f"registry_capture_dir={s.data_dir / 'captures'}",
    ]  # fmt: skip


BACKEND_BINARIES = {"zot": "zot", "distribution": "docker-registry"}


def require_backend(s: Settings) -> None:
    binary = BACKEND_BINARIES.get(s.backend)
    if binary and shutil.which(binary) is None:
        raise ConfigError(f"REGISTRY_BACKEND={s.backend}: `{binary}` is not on PATH")


def backend_command(s: Settings, config_file: Path) -> list[str]:
    return [BACKEND_BINARIES[s.backend], "serve", str(config_file)]


def supervisor_env(env: Mapping[str, str], s: Settings, config_file: Path) -> dict[str, str]:
    """The environment supervisord and its programs get. REGISTRY_* is removed: Distribution
    reads every REGISTRY_<SECTION>_<KEY> as a config override (and panics on ours); the
    gateway gets its settings on its command line."""
    child = {k: v for k, v in env.items() if not k.startswith("REGISTRY_")}
    external = s.backend == "external"
    child.update(
        TBF_RUNTIME_DIR=str(s.runtime_dir),
        TBF_PYTHON=sys.executable,
        TBF_GATEWAY_COMMAND=shlex.join(mitmdump_command(s)),
        TBF_BACKEND_COMMAND="true" if external else shlex.join(backend_command(s, config_file)),
        TBF_BACKEND_AUTOSTART="false" if external else "true",
        TBF_MESH_COMMAND=shlex.join([sys.executable, "-m", "mesh.follow", str(s.data_dir)]),
        TBF_MESH_AUTOSTART="true" if s.mesh_coordinator_url else "false",
    )
    return child


def lock_data_dir(s: Settings) -> IO[str]:
    """One stack per data dir: a second `run` on the same REGISTRY_DATA_DIR is refused."""
    lock = open(s.runtime_dir / "lock", "w")  # noqa: SIM115 - held for the process lifetime
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise ConfigError(
            f"REGISTRY_DATA_DIR={s.data_dir} is in use by another tabbify-registry"
        ) from None
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    return lock


def write_backend_config(s: Settings) -> Path:
    path = s.runtime_dir / f"{s.backend}-config.json"
    if s.backend != "external":
        path.write_text(json.dumps(backend_config.render(s), indent=2) + "\n")
    return path


def wait_reaping(pid: int) -> int:
    """Wait for supervisord, reaping every other child on the way: as a container's PID 1 we
    inherit orphans (wireguard-go's daemon among them) and must not leave zombies."""
    while True:
        child, status = os.wait()
        if child == pid:
            return os.waitstatus_to_exitcode(status)


def run(env: Mapping[str, str]) -> int:
    s = settings_mod.load(env)
    policy_store.read(s.policy_file)  # a bad policy refuses start-up (file:line on stderr)
    require_backend(s)  # before the mesh: a node that cannot serve should not join
    if s.mesh_coordinator_url:
        # With a mesh, the gateway listens on [ULA]:5000 and the realm names that address.
        s = settings_mod.load(env, ula=bootstrap.up(s))
    s.runtime_dir.mkdir(parents=True, exist_ok=True)
    (s.data_dir / "zot-cache").mkdir(exist_ok=True)
    _lock = lock_data_dir(s)
    fatal = s.runtime_dir / "fatal"
    fatal.unlink(missing_ok=True)
    config_file = write_backend_config(s)

    supervisord = subprocess.Popen(
        [str(BIN / "supervisord"), "--nodaemon", "--configuration", str(SUPERVISORD_CONF)],
        env=supervisor_env(env, s, config_file),
    )
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda signum, _frame: supervisord.send_signal(signum))
    status = wait_reaping(supervisord.pid)
    if fatal.exists():
        program = fatal.read_text().strip()
        print(f"tabbify-registry: {program} could not start; stopped", file=sys.stderr)
        return 1
    return status


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="tabbify-registry")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="mesh bootstrap, backend config, supervisord (foreground)")
    sub.add_parser("config", help="print the rendered backend config")
    mesh = sub.add_parser("mesh", help="mesh bootstrap only")
    mesh.add_argument("action", choices=["up"])
    policy_cmd.add_parser(sub)
    args = parser.parse_args(argv)
    env = os.environ
    try:
        if args.command == "policy":
            sys.exit(policy_cmd.main(env, args))
        elif args.command == "run":
            sys.exit(run(env))
        elif args.command == "config":
            print(json.dumps(backend_config.render(settings_mod.load(env)), indent=2))
        else:
            s = settings_mod.load(env)
            if s.mesh_coordinator_url is None:
                raise ConfigError("MESH_COORDINATOR_URL is not set: there is no mesh to bring up")
            print(bootstrap.up(s))
    except (ConfigError, MeshError, PolicyError, ValueError) as e:
        print(f"tabbify-registry: {e}", file=sys.stderr)
        sys.exit(2)
