"""The gateway's real mitmproxy engine in this test process, on a loopback port.

The same master as `python -m addons.gateway.chain` (chain.py: make_master), run on its own
event loop in a thread, in front of any backend. In-process so that a test can reach into it:
monkeypatch a function to raise (fail-closed tests) or mint a registry token directly.
The engine patches (engine/hardening.py) are applied while it runs and reverted when it stops:
the rest of the test process sees mitmproxy as it is.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

from mitmproxy import options

from addons.decisions.tokens import TokenSigner
from addons.engine import hardening
from addons.gateway import chain
from tests.support.stack import free_port, wait_for

REALM = "http://127.0.0.1:5000/auth/token"


class InProcessGateway:
    """`with InProcessGateway(backend_url, ledger=path) as gw:` → `gw.url`, `gw.token(t)`."""

    def __init__(
        self,
        backend: str,
        *,
        ledger: Path | None = None,
        anonymous: bool = False,
        auth_url: str = "",
        extra: tuple[str, ...] = (),
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.settings = [
            "connection_strategy=lazy",
            "termlog_verbosity=error",
            f"registry_anonymous={'true' if anonymous else 'false'}",
            f"registry_realm={REALM}",
            f"registry_auth_url={auth_url}",
            f"registry_ledger={ledger or ''}",
            *extra,
        ]
        self.mode = [f"reverse:{backend}@127.0.0.1:{self.port}"]
        self.master: Any = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.failure: BaseException | None = None

    def _run(self) -> None:
        async def main() -> None:
            self.loop = asyncio.get_running_loop()
            self.master = chain.make_master(options.Options(), self.mode, self.settings)
            await self.master.run()

        try:
            asyncio.run(main())
        except BaseException as e:  # surfaced by __enter__ / the tests
            self.failure = e

    def __enter__(self) -> InProcessGateway:
        hardening.apply()
        try:
            self._start()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _start(self) -> None:
        self.thread.start()

        def listening() -> bool:
            if self.failure is not None:
                raise RuntimeError("the in-process gateway failed") from self.failure
            proxy = self.master and self.master.addons.get("proxyserver")
            return bool(proxy and any(s.listen_addrs for s in proxy.servers))

        wait_for(listening, 20)

    def __exit__(self, *exc: object) -> None:
        if self.loop is not None and self.master is not None:
            self.loop.call_soon_threadsafe(self.master.shutdown)
        if self.thread.is_alive():
            self.thread.join(10)
        if not self.thread.is_alive():  # else its engine may still run: left patched
            hardening.revert()

    @property
    def signer(self) -> TokenSigner:
        return self.master.addons.get("registryaccess").signer

    def token(self, tenant: str) -> str:
        return self.signer.mint(tenant)[0]

    def addon(self, name: str) -> Any:
        return self.master.addons.get(name)
