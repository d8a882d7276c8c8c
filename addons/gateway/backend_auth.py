"""The run's backend credential on every request this gateway process sends to the backend.

The credential itself (its file, its htpasswd line, the header):
addons/clients/backend_credential.py.
"""

from __future__ import annotations

from pathlib import Path

from mitmproxy import ctx, exceptions
from mitmproxy.addonmanager import Loader

from addons.clients import backend_credential
from addons.clients.backend_credential import CredentialError, authorization, read


class BackendCredential:
    """`registry_backend_credential`: the file of the run's backend credential; empty = the
    backend takes anonymous requests (an external registry that needs none, tests)."""

    def load(self, loader: Loader) -> None:
        loader.add_option(
            "registry_backend_credential",
            str,
            "",
            "File with the backend's `user:password` (sent on every request to the backend).",
        )

    def configure(self, updated: set[str]) -> None:
        if "registry_backend_credential" not in updated:
            return
        path = ctx.options.registry_backend_credential
        try:
            backend_credential.use(authorization(read(Path(path))) if path else None)
        except CredentialError as e:
            raise exceptions.OptionsError(f"registry_backend_credential: {e}") from None
