"""The backend's credential: only the registry's own programs reach the backend.

The backend listens on loopback (REGISTRY_BACKEND_ADDR), where any local user or process could
otherwise read and write every tenant's data around the gateway, its policy and its immutable
tags. Zot listens on TCP only (no unix socket), so the one mechanism both backends share is
HTTP Basic auth with a credential made per run: `tabbify-registry run` writes it (mode 0600,
`$REGISTRY_DATA_DIR/run/backend-credential`, one line `user:password`, which is also where an
operator finds it) and the backend's htpasswd file with its bcrypt hash. Every program that
talks to the backend reads that file: the gateway workers (which put it on every request they
forward, in place of whatever the client sent), the admin endpoint's health probe, `gc`.

The password is 256 random bits, so the bcrypt cost buys nothing against guessing: the lowest
cost (4) keeps the backend's check of every request near 1 ms of CPU.
"""

from __future__ import annotations

import base64
import secrets
from pathlib import Path

USER = "tabbify-registry"
BCRYPT_COST = 4
FILE_NAME = "backend-credential"  # under the runtime dir
HTPASSWD_NAME = "backend-htpasswd"


class CredentialError(ValueError):
    """A credential file that cannot be used; str() names the file."""


def make() -> str:
    """A new credential, `user:password`."""
    return f"{USER}:{secrets.token_urlsafe(32)}"


def parse(text: str, source: str) -> str:
    """`user:password` from the first line of a credential file."""
    line = text.strip().splitlines()[0].strip() if text.strip() else ""
    user, colon, password = line.partition(":")
    if not colon or not user or not password or any(c.isspace() for c in line):
        raise CredentialError(f"{source}: expected one line `user:password`")
    return line


def read(path: Path) -> str:
    try:
        return parse(path.read_text(), str(path))
    except OSError as e:
        raise CredentialError(f"{path}: {e.strerror}") from None


def htpasswd(credential: str) -> str:
    """The htpasswd line both backends read (bcrypt: Zot and Distribution both take `$2b$`)."""
    import bcrypt  # only `run` needs it

    user, _, password = credential.partition(":")
    digest = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=BCRYPT_COST))
    return f"{user}:{digest.decode()}\n"


def authorization(credential: str) -> str:
    """The value of the `Authorization` header that carries `credential`."""
    return "Basic " + base64.b64encode(credential.encode()).decode()


# The gateway process's own: set once at start by the BackendCredential addon (first of the
# addons, so every other addon sees it from its own `configure` on).
_current: str | None = None


def header() -> str | None:
    """The `Authorization` every request of this process to the backend carries (None
    without one): what the gateway forwards, and addons/clients/backend.py's clients."""
    return _current


def use(value: str | None) -> None:
    """Set this process's `Authorization` for the backend (the gateway's BackendCredential)."""
    global _current
    _current = value
