"""A registry-token key shared by several nodes: REGISTRY_TOKEN_KEY_FILE (contract §2).

By default `run` makes the key per run, so a token is good on the node (and run) that issued
it only, and a client that moves to another node logs in again through the 401 challenge.
With the file, every node that reads the same keys accepts every node's tokens.

The file: one key per line (blank lines and `#` comments ignored), each at least 32
characters, used as they are (e.g. `openssl rand -base64 48`); the first signs, all verify.
At most 4 keys. Rotation without a restart, every node watching its copy (one `stat` a
second; a changed file is read again):

1. add the new key as a second line on every node (all now verify it);
2. move it to the first line on every node (new tokens are signed with it; tokens signed with
   the old key still verify while it stays listed);
3. after the token lifetime (300 s), remove the old line.

A file that becomes unreadable or invalid keeps the keys read last, with one log line.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

from addons import runstate
from addons.decisions.tokens import TokenSigner

logger = logging.getLogger(__name__)

MIN_KEY = 32
MAX_KEYS = 4
WATCH_EVERY = 1.0  # seconds


class KeyFileError(ValueError):
    pass


def read_keys(path: Path) -> list[bytes]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise KeyFileError(f"{path}: {getattr(e, 'strerror', None) or e}") from None
    keys = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if len(line) < MIN_KEY:
            raise KeyFileError(f"{path}:{n}: a key of at least {MIN_KEY} characters expected")
        keys.append(line.encode())
    if not keys:
        raise KeyFileError(f"{path}: no key in it")
    if len(keys) > MAX_KEYS:
        raise KeyFileError(f"{path}: at most {MAX_KEYS} keys (the first signs, all verify)")
    return keys


class TokenKeyFile:
    """Keeps a TokenSigner on the keys of the file (the addon of a gateway started with
    `--token-key-file`)."""

    def __init__(self, signer: TokenSigner, path: Path) -> None:
        self.signer, self.path = signer, path
        self._stamp = runstate.stamp(path)
        signer.use_keys(read_keys(path))  # at start a bad file is fatal: `run` checked it
        self._task: asyncio.Task[None] | None = None

    def reload(self) -> bool:
        """Read the file again if it changed; True when new keys are in use."""
        stamp = runstate.stamp(self.path)
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        try:
            keys = read_keys(self.path)
        except KeyFileError as e:
            logger.error("registry-token keys: keeping the previous keys: %s", e)
            return False
        self.signer.use_keys(keys)
        logger.warning("registry-token keys reloaded from %s (%d keys)", self.path, len(keys))
        return True

    async def running(self) -> None:
        self._task = asyncio.create_task(self._watch())

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(WATCH_EVERY)
            with contextlib.suppress(Exception):  # a watcher never takes the gateway down
                self.reload()

    async def done(self) -> None:
        if self._task:
            self._task.cancel()
