"""The node's persisted mesh identity under $REGISTRY_DATA_DIR/mesh/.

    private.key   WireGuard private key (base64), mode 0600, created once
    state.json    node id, ULA, prefix, listen port, the last peer set *applied* to the
                  interface (no key material) and the ULAs being retired after a move
    status.json   the follower's health (ok / degraded and why), read by /healthz
    wg.conf       the rendered `wg syncconf` config (0600: holds the private key)

Every write is atomic (temp file, fsync, rename, fsync dir): a crash leaves the old file or
the new one, never half an identity.
"""

from __future__ import annotations

import base64
import json
from dataclasses import asdict
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from addons.runstate import write_atomic
from mesh import validate
from mesh.model import NodeState


class MeshError(Exception):
    """A mesh problem `run` reports as one line, exiting non-zero."""


def public_key(private_b64: str) -> str:
    raw = X25519PrivateKey.from_private_bytes(base64.b64decode(private_b64)).public_key()
    return base64.b64encode(raw.public_bytes(Encoding.Raw, PublicFormat.Raw)).decode()


class MeshDir:
    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / "mesh"
        self.key_file = self.path / "private.key"
        self.state_file = self.path / "state.json"
        self.wg_conf = self.path / "wg.conf"  # rendered for `wg syncconf`, 0600 (has the key)
        self.status_file = self.path / "status.json"

    def private_key(self) -> str:
        """The node's key, generated on first use and never again."""
        self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        if self.key_file.exists():
            key = self.key_file.read_text().strip()
            try:
                public_key(key)
            except ValueError:
                raise MeshError(f"{self.key_file} is not a WireGuard private key") from None
            return key
        raw = X25519PrivateKey.generate().private_bytes_raw()
        key = base64.b64encode(raw).decode()
        write_atomic(self.key_file, (key + "\n").encode())
        return key

    def load(self, own_key: str) -> tuple[NodeState | None, tuple[str, ...]]:
        """The persisted state and the peers dropped from it. The file was written from
        coordinator answers, possibly by an older version that checked less: it passes the
        same rules again, so a bad peer saved long ago cannot keep the interface down."""
        if not self.state_file.exists():
            return None, ()
        try:
            data = json.loads(self.state_file.read_text())
            state, skipped = validate.persisted_state(data, own_key)
        except (ValueError, RecursionError) as e:  # validate.Invalid is a ValueError
            raise MeshError(
                f"{self.state_file} is unreadable ({e}); remove it to re-join"
            ) from None
        return state, tuple(str(x) for x in skipped)

    def save(self, state: NodeState) -> None:
        self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_atomic(self.state_file, (json.dumps(asdict(state), indent=2) + "\n").encode())
