"""One push at a time of an immutable tag on a node.

The immutable check asks the backend whether the tag exists, then lets the first push through;
two first pushes racing each other would both pass and the later one would overwrite the
earlier. So a PUT of a covered tag first claims it: an exclusive, non-blocking `flock` on a file
named for (repository, tag) under the run's state directory, which every worker of the node
shares. The claim is held until the backend has answered that PUT (or the flow failed), so a
second push of the same tag meanwhile is refused, and once the first is stored the backend's
answer refuses it. A worker that dies drops its locks with its descriptors: no claim outlives
its holder, nothing to expire.

The file is removed on release. A taker that locked a file someone just removed would hold a
lock nobody else can see, so a lock counts only when the path still names the locked inode.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Claim:
    path: Path
    fd: int

    def release(self) -> None:
        if self.fd < 0:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path)  # before unlocking: a waiter then sees a stale inode, retries
        os.close(self.fd)
        self.fd = -1


def claim_path(directory: Path, repository: str, tag: str) -> Path:
    # Hashed: repository names are paths with slashes, tags may be 128 characters.
    name = hashlib.sha256(f"{repository}:{tag}".encode()).hexdigest()
    return directory / f"{name}.claim"


def take(directory: Path, repository: str, tag: str) -> Claim | None:
    """The claim of (repository, tag), or None when another push holds it. OSError when the
    directory cannot hold claims (the caller fails closed)."""
    path = claim_path(directory, repository, tag)
    for _ in range(8):  # each retry means a holder released between our open and our lock
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except OSError:
            os.close(fd)
            raise
        try:
            current = os.stat(path)
        except FileNotFoundError:
            current = None
        if current is not None and current.st_ino == os.fstat(fd).st_ino:
            return Claim(path, fd)
        os.close(fd)  # the file we locked was released and removed: take the new one
    return None  # contended beyond reason: treat as held
