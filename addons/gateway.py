"""The gateway process: mitmproxy's engine (as in mitmdump) in reverse mode, with only the
addons a reverse proxy needs, then ours. `python -m addons.gateway --mode … --set k=v …`.

mitmdump loads ~40 default addons and dispatches every hook of every request to each of them
(about half the CPU of a small request, measured); this master loads mitmproxy's core, proxy
server, layer selection, client blocking and h2c refusal, and nothing else (no TLS: the
port is plain HTTP, see hardening.PlainHttpOnly).

Our addons, in hook order:
1. TokenEndpoint   `/auth/token`: Tabbify JWT → registry token
2. RegistryAccess  everything else: token, namespace, header hygiene, streaming
3. TenantIsolation digests a tenant has no record of never reach the backend
4. Refusals        delivers 4xx decisions without buffering request bodies
5. AccessLog       one JSON line per request on stdout, counted in the metrics
6. Capture, Admin  the operator's loopback endpoint: /healthz, /metrics, /capture
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
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

from addons import hardening
from addons.access import RegistryAccess
from addons.accesslog import AccessLog
from addons.admin import Admin
from addons.capture import Capture
from addons.isolation import TenantIsolation
from addons.metrics import Metrics
from addons.refusal import Refusals
from addons.token_endpoint import TokenEndpoint
from addons.tokens import TokenSigner


def gateway_addons() -> list[Any]:
    signer = TokenSigner()  # the secret is made here, once per process, never written anywhere
    metrics, capture = Metrics(), Capture()
    return [
        TokenEndpoint(signer),
        RegistryAccess(signer),
        TenantIsolation(),
        Refusals(),
        AccessLog(metrics, flush_every=0.05),
        capture,
        Admin(metrics, capture),
    ]


def make_master(opts: options.Options, mode: list[str], settings: list[str]) -> master.Master:
    """The master with its addons, then the options: every addon's `configure` sees them."""
    m = master.Master(opts, with_termlog=False)
    m.addons.add(
        errorcheck.ErrorCheck(),  # an error logged during start-up exits non-zero
        termlog.TermLog(out=sys.stderr),  # stdout is the access log (JSON lines) alone
        core.Core(),
        proxyserver.Proxyserver(),
        hardening.PlainHttpOnly(),  # before NextLayer: a TLS ClientHello gets a plain 400
        next_layer.NextLayer(),
        block.Block(),
        disable_h2c.DisableH2C(),
        *gateway_addons(),
    )
    opts.update(mode=mode)
    opts.set(*settings)
    return m


async def run(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="addons.gateway")
    parser.add_argument("--mode", action="append", required=True)
    parser.add_argument("--set", action="append", default=[], metavar="OPTION=VALUE")
    args = parser.parse_args(argv)

    hardening.apply()  # mitmproxy engine patches: see addons/hardening.py
    try:
        m = make_master(options.Options(), args.mode, args.set)
    except exceptions.OptionsError as e:
        print(f"gateway: {e}", file=sys.stderr)
        sys.exit(1)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, m.shutdown)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    await m.run()


if __name__ == "__main__":
    asyncio.run(run(sys.argv[1:]))
