"""`tabbify-registry run | config | mesh up | policy | gc | dev-auth` (contract §1, §7): the
arguments, and which command runs (run.py is the PID-1 sequence).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from urllib.parse import urlsplit

from addons.cli import deployment, devauth
from addons.cli import gc as gc_cmd
from addons.cli import policy as policy_cmd
from addons.cli.programs import load_mirrors
from addons.cli.run import run
from addons.config import settings as settings_mod
from addons.config.settings import ConfigError, Settings, version
from addons.decisions.policy import PolicyError
from addons.gateway import policy_store
from mesh import bootstrap
from mesh.state import MeshError
from zot import config as backend_config


def printable_config(s: Settings) -> dict[str, object]:
    """What `config` prints: the rendered config without its secrets (the upload secret and
    a password inside REGISTRY_CACHE_URL are named, not shown). The policy's retention rules
    are part of Zot's config."""
    policy = None if s.anonymous else policy_store.read(s.policy_file)
    found = load_mirrors(s)
    creds = (
        s.runtime_dir / backend_config.ZOT_SYNC_CREDENTIALS
        if any(m.credentials_file for m in found)
        else None
    )
    if s.nodes.http_secret_file is not None:
        secret = f"<from REGISTRY_HTTP_SECRET_FILE={s.nodes.http_secret_file}>"
        config = backend_config.render(s, secret, policy, found, creds)
    else:
        config = backend_config.render(s, policy=policy, mirrors=found, credentials=creds)
    cache = config.get("storage", {}).get("cacheDriver")
    if isinstance(cache, dict) and urlsplit(cache.get("url", "")).password:
        cache["url"] = "<REGISTRY_CACHE_URL: it holds a password>"
    return config


ENVIRONMENT = """\
environment (read by run, config, gc and policy; docs/contract.md has each):
  REGISTRY_DATA_DIR              everything persistent (default /var/lib/tabbify-registry)
  REGISTRY_STORAGE               local (default) or s3
  REGISTRY_S3_BUCKET, REGISTRY_S3_REGION, REGISTRY_S3_ENDPOINT   with s3
  REGISTRY_AUTH_URL              Tabbify auth base URL; unset = anonymous dev mode, loopback only
  REGISTRY_LISTEN                gateway address (default 127.0.0.1:5000, [ULA]:5000 on a mesh)
  REGISTRY_EXTERNAL_URL          the base URL clients use (default http://<listen address>)
  REGISTRY_ADMIN_ADDR            health, metrics, live view; loopback (default 127.0.0.1:5002)
  REGISTRY_BACKEND               zot, distribution or external (default: zot if on PATH)
  REGISTRY_BACKEND_ADDR          the backend's loopback address (default 127.0.0.1:5001)
  REGISTRY_BACKEND_CREDENTIAL_FILE  the backend's credential (Zot cluster, external backend)
  REGISTRY_WORKERS               gateway worker processes (default: number of cores)
  REGISTRY_LOG_LEVEL             operator log (stderr): debug, info (default), warning, error
  REGISTRY_POLICY_FILE           access policy (default $REGISTRY_DATA_DIR/policy.toml)
  REGISTRY_GC_INTERVAL           periodic garbage collection, e.g. 24h (default: none)
  REGISTRY_UPLOAD_MAX_AGE        unfinished uploads are purged this old (default 1h)
  REGISTRY_MIRRORS_FILE          upstream registries mirrored read-only under mirror/<name>/
  REGISTRY_HEADER_TIMEOUT        seconds to receive a request's head (default 60)
  REGISTRY_IDLE_TIMEOUT          seconds an idle client connection is kept (default 75)
  REGISTRY_CACHE_MB              manifests by digest kept in memory per worker (default 48, 0 off)
  REGISTRY_MAX_CONNECTIONS       client connections of the node (default: descriptors allow)
  REGISTRY_MAX_CLIENT_CONNECTIONS  connections of one client address (default 256)
  REGISTRY_MAX_CLIENT_PENDING    slow request heads of one client address (default 32)
  REGISTRY_CATALOG_SCAN          names one catalog page looks at, at most (default 20000)
  REGISTRY_LEDGER_URL            shared ledger, s3://bucket/prefix or postgresql://...
  REGISTRY_TOKEN_KEY_FILE        shared registry-token keys for several nodes
  REGISTRY_HTTP_SECRET_FILE      shared upload-state secret for several nodes
  REGISTRY_CACHE_URL             shared Zot dedupe cache for several nodes
  REGISTRY_CLUSTER_MEMBERS, REGISTRY_CLUSTER_HASH_KEY   a Zot cluster
  MESH_COORDINATOR_URL           mesh coordinator; unset = no mesh
  MESH_AUTH_KEY                  join credential for the coordinator
  MESH_INTERFACE                 WireGuard interface (default tbf0)
  MESH_POLL_SECONDS              peer set refresh (default 30)
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="tabbify-registry",
        description="Private OCI registry front door (see the README).",
        epilog=ENVIRONMENT,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"tabbify-registry {version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="mesh bootstrap, backend config, supervisord (foreground)")
    sub.add_parser("config", help="print the rendered backend config")
    mesh = sub.add_parser(
        "mesh", help="mesh bootstrap only", description="Mesh commands (MESH_COORDINATOR_URL)."
    )
    mesh_commands = mesh.add_subparsers(dest="action", required=True)
    mesh_commands.add_parser(
        "up",
        help="join the mesh and bring its interface up, then exit",
        description="Join the mesh named by MESH_COORDINATOR_URL: register this node with the "
        "coordinator, bring the WireGuard interface up and print its address. `run` does this "
        "itself at start-up; this is the mesh step alone.",
    )
    policy_cmd.add_parser(sub)
    gc_cmd.add_parser(sub)
    devauth.add_parser(sub)
    args = parser.parse_args(argv)
    env = os.environ
    try:
        if args.command == "dev-auth":
            sys.exit(devauth.main(args))
        elif args.command == "policy":
            sys.exit(policy_cmd.main(env, args))
        elif args.command == "gc":
            # Acts on the running deployment: only with the settings it records.
            deployed = deployment.environment(env, required=True)
            sys.exit(gc_cmd.main(settings_mod.load(deployed), args))
        elif args.command == "run":
            sys.exit(run(env))
        elif args.command == "config":
            deployed = deployment.environment(env, required=False)
            print(json.dumps(printable_config(settings_mod.load(deployed)), indent=2))
        else:
            s = settings_mod.load(env)
            if s.mesh_coordinator_url is None:
                raise ConfigError("MESH_COORDINATOR_URL is not set: there is no mesh to bring up")
            print(bootstrap.up(s))
    except (ConfigError, MeshError, PolicyError, ValueError) as e:
        print(f"tabbify-registry: {e}", file=sys.stderr)
        sys.exit(2)
