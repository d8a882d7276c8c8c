"""The gateway process: mitmproxy's engine (as in mitmdump) in reverse mode, with only the
addons a reverse proxy needs, then ours. `python -m addons.gateway.chain --mode … --set k=v …`.

mitmdump loads ~40 default addons and dispatches every hook of every request to each of them
(about half the CPU of a small request, measured); this master loads mitmproxy's core, proxy
server, layer selection, client blocking and h2c refusal, and nothing else (no TLS: the
port is plain HTTP, see plain_http.PlainHttpOnly).

Our addons, in hook order:
   BackendCredential the run's backend credential (addons/gateway/backend_auth.py; no hooks)
0. PolicyFile      the current access policy (reloaded when its file changes; no hooks)
1. Intake          the request target parsed once, strictly; what kind of request it is
2. TokenEndpoint   `/auth/token`: Tabbify JWT → registry token
3. RegistryAccess  `/v2…`: token, policy rights (and token scopes), route parameters,
                   header hygiene, streaming
   MirrorGate      `mirror/<name>/…`: routed to its mirror, by-digest bodies verified
   WriteFreeze     while GC marks and sweeps, the writes that could revive a blob wait
   Accounting      sizes and push times of confirmed pushes; [[quota]] (before the ledger
                   records: a refused push is never recorded)
4. TenantIsolation digests the caller may not read never reach the backend
   ImmutableTags   a tag an [[immutable]] rule covers is never overwritten nor deleted
   SignedOnly      [[require_signature]]: manifests served only when signed by a trusted key
   Listing         the catalog (from the ledger, what the caller may pull); tag list pages
   ContentCache    manifests and blob HEADs by digest answered from memory, once allowed
5. Gate            forwards exactly what was decided (canonical target), or the refusal,
                   without buffering request bodies; denies what nobody allowed
6. AccessLog       one JSON line per request on stdout, counted in the metrics
7. FlowFeed        a bounded ring of redacted flow snapshots for the live view, sent to the
                   admin program only while a viewer is connected
   Capture         this worker's part of a debug capture
   Publisher       this worker's counters and states for the admin endpoint (once a second),
                   and the capture and live view the admin endpoint asks for
8. MeshAddress     follows the node's ULA when the mesh coordinator moves it (no request hooks)
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

from mitmproxy import exceptions, master, options
from mitmproxy.addons import (
    block,
    core,
    disable_h2c,
    errorcheck,
    next_layer,
    proxyserver,
    termlog,
)

from addons.config.token_keys import TokenKeyFile
from addons.decisions.metrics import Metrics
from addons.decisions.tokens import TokenSigner
from addons.engine import hardening, plain_http
from addons.gateway.access import RegistryAccess
from addons.gateway.accesslog import AccessLog
from addons.gateway.accounting import Accounting
from addons.gateway.backend_auth import BackendCredential
from addons.gateway.capture import Capture
from addons.gateway.connections import ConnectionGuard
from addons.gateway.contentcache import ContentCache
from addons.gateway.flowfeed import FlowFeed
from addons.gateway.freeze import WriteFreeze
from addons.gateway.gate import Gate
from addons.gateway.immutable import ImmutableTags
from addons.gateway.intake import Intake
from addons.gateway.isolation import TenantIsolation
from addons.gateway.listing import Listing
from addons.gateway.meshaddress import MeshAddress
from addons.gateway.mirror import MirrorGate
from addons.gateway.policy_store import PolicyFile
from addons.gateway.publish import Publisher
from addons.gateway.require_signature import SignedOnly
from addons.gateway.token_endpoint import TokenEndpoint


def gateway_addons(secret: bytes | None = None, key_file: Path | None = None) -> list[Any]:
    """`secret`: the registry-token key `run` made for this run (shared by every worker);
    None makes one for this process alone (a gateway run on its own, tests). `key_file`:
    REGISTRY_TOKEN_KEY_FILE, keys shared by several nodes (addons/config/token_keys.py), instead."""
    signer = TokenSigner(secret)
    metrics, capture, feed, policies = Metrics(), Capture(), FlowFeed(), PolicyFile()
    keys = [TokenKeyFile(signer, key_file)] if key_file else []
    isolation = TenantIsolation()
    return [
        BackendCredential(),  # first: every other addon's backend client carries it
        *keys,
        policies,
        Intake(),
        TokenEndpoint(signer, policies),
        RegistryAccess(signer, policies),
        MirrorGate(),
        WriteFreeze(),
        Accounting(policies, isolation),
        isolation,
        ImmutableTags(policies, isolation),
        SignedOnly(policies),
        Listing(policies, signer),
        ContentCache(),  # after every decision: only what they allowed is looked up
        Gate(),
        AccessLog(metrics),
        feed,  # after AccessLog: it takes the line the log wrote
        capture,
        Publisher(metrics, capture, feed),
        MeshAddress(),
    ]


class StartupCheck(errorcheck.ErrorCheck):
    """mitmproxy's start-up check (an error logged while the options are applied or the
    listeners bound exits 1: a port taken, an address not there), ended once the servers
    are up. mitmproxy's own keeps counting until every addon's `running` has returned, and
    counts errors from any thread: a worker slow to start on a busy machine then exited on
    the registry's own reports of its state (the ledger read-only, the policy file broken),
    which /healthz and the log carry and which must not stop a worker."""

    name = "errorcheck"  # the master looks it up by this name

    def running(self) -> None:  # first in the chain: before any addon starts its tasks
        self.finish()
        # The master checked once the servers were up; what came since is the registry at work.
        self.logger.has_errored.clear()


def make_master(
    opts: options.Options,
    mode: list[str],
    settings: list[str],
    secret: bytes | None = None,
    key_file: Path | None = None,
) -> master.Master:
    """The master with its addons, then the options: every addon's `configure` sees them."""
    m = master.Master(opts, with_termlog=False)
    log = termlog.TermLog(out=sys.stderr)  # stdout is the access log (JSON lines) alone
    # "LEVEL message": `run` reads the level and adds the time (addons/cli/logrelay.py).
    log.logger.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    m.addons.add(
        StartupCheck(),  # an error logged before the servers are up exits non-zero
        log,
        core.Core(),
        proxyserver.Proxyserver(),
        plain_http.PlainHttpOnly(),  # before NextLayer: a TLS ClientHello gets a plain 400
        ConnectionGuard(),  # connection caps, head deadline, idle timeout (hardening.py reports)
        next_layer.NextLayer(),
        block.Block(),
        disable_h2c.DisableH2C(),
        *gateway_addons(secret, key_file),
    )
    opts.update(mode=mode)
    opts.set(*settings)
    return m


def read_secret(fd: int) -> bytes:
    """The key `run` made for this run, from the sealed memfd every worker inherits: never a
    file, never the environment. Read with pread, so every worker reads it whole."""
    secret = os.pread(fd, 1024, 0)
    if len(secret) < 32:
        raise ValueError(f"--token-fd {fd}: no registry-token key there")
    return secret


async def run(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="addons.gateway.chain")
    parser.add_argument("--mode", action="append", required=True)
    parser.add_argument("--set", action="append", default=[], metavar="OPTION=VALUE")
    parser.add_argument(
        "--token-fd", type=int, help="descriptor of the run's registry-token key (memfd)"
    )
    parser.add_argument(
        "--token-key-file", type=Path, help="REGISTRY_TOKEN_KEY_FILE: shared keys (wins)"
    )
    args = parser.parse_args(argv)

    try:
        hardening.apply()  # mitmproxy engine patches, for the pinned versions only
    except hardening.EngineVersionError as e:
        print(f"gateway: {e}", file=sys.stderr)
        sys.exit(1)
    try:
        key_file = args.token_key_file
        secret = read_secret(args.token_fd) if args.token_fd is not None and not key_file else None
        m = make_master(options.Options(), args.mode, args.set, secret, key_file)
    except (exceptions.OptionsError, OSError, ValueError) as e:
        print(f"gateway: {e}", file=sys.stderr)
        sys.exit(1)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, m.shutdown)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    await m.run()


if __name__ == "__main__":
    asyncio.run(run(sys.argv[1:]))
