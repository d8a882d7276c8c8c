"""Client of the mesh coordinator (contract §5). Every answer is untrusted input.

The exchange is bounded (`mesh.fetch`: size cap, overall deadline, no redirects) and every
field passes `mesh.validate` before use. Anything that leaves no usable answer raises
`CoordinatorUnusable`: the node then keeps the identity and peers it has and retries later.
Individual bad peers inside a usable answer are not errors: they are skipped and reported.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from mesh import fetch, validate
from mesh.model import NodeState
from mesh.state import MeshError
from mesh.validate import PeerSet, Skipped


class CoordinatorUnusable(MeshError):
    """No usable answer (unreachable, slow, huge, redirected, 5xx, garbage, refused...).

    `auth_refused`: 401/403, the join key was refused. `answered`: an answer arrived whole (only its
    status or content was unusable), so the coordinator is reachable."""

    def __init__(
        self,
        reason: str,
        *,
        auth_refused: bool = False,
        answered: bool = True,
    ) -> None:
        super().__init__(reason)
        self.auth_refused = auth_refused
        self.answered = answered


@dataclass(frozen=True)
class JoinRequest:
    public_key: str
    hostname: str
    node_id: str | None
    ula: str | None


@dataclass(frozen=True)
class Joined:
    state: NodeState
    skipped: tuple[Skipped, ...]


def decode(answer: fetch.Answer, what: str) -> Any:
    """The JSON of a 200/201 answer; CoordinatorUnusable for any other status or a body that is
    not JSON (including nesting deep enough to exhaust the parser)."""
    status = answer.status
    if 300 <= status < 400:
        raise CoordinatorUnusable(
            f"coordinator answered {what} with a redirect ({status}), refused"
        )
    if status in (401, 403):
        raise CoordinatorUnusable(
            f"coordinator refused MESH_AUTH_KEY ({status})", auth_refused=True
        )
    if status not in (200, 201):
        raise CoordinatorUnusable(f"coordinator answered {what} with {status}")
    try:
        return json.loads(answer.body)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        raise CoordinatorUnusable(f"coordinator answered {what} without JSON") from None


class Coordinator:
    def __init__(self, url: str, auth_key: str | None, *, deadline: float = fetch.DEADLINE):
        self.url = url.rstrip("/")
        self.headers = {"Accept": "application/json", "Content-Type": "application/json"}
        if auth_key:
            self.headers["Authorization"] = f"Bearer {auth_key}"
        self.deadline = deadline

    def _exchange(
        self, method: str, path: str, what: str, body: dict[str, Any] | None = None
    ) -> fetch.Answer:
        data = json.dumps(body).encode() if body is not None else None
        try:
            return fetch.request(
                method, self.url + path, data, self.headers, deadline=self.deadline
            )
        except fetch.FetchError as e:
            raise CoordinatorUnusable(f"coordinator ({what}): {e}", answered=False) from None

    def join(self, req: JoinRequest, also_own: tuple[str, ...] = ()) -> Joined:
        """Register (or re-register) this node. `also_own`: addresses it still answers on."""
        body = {
            "public_key": req.public_key,
            "tags": ["registry"],
            "hostname": req.hostname,
            "node_id": req.node_id,
            "ula": req.ula,
        }
        data = decode(self._exchange("POST", "/v1/nodes", "the join", body), "the join")
        try:
            state, skipped = validate.join_answer(data, req.public_key, also_own)
        except validate.Invalid as e:
            raise CoordinatorUnusable(f"coordinator's join answer refused: {e}") from None
        return Joined(state, skipped)

    def peers(self, state: NodeState, own_key: str) -> PeerSet:
        """This node's peer set, each peer judged on its own."""
        node = validate.node_id(state.node_id)
        answer = self._exchange("GET", f"/v1/nodes/{node}/peers", "peers")
        if answer.status == 404:
            raise CoordinatorUnusable("coordinator does not know this node (404)")
        data = decode(answer, "peers")
        try:
            return validate.peers_answer(data, validate.context(state, own_key))
        except validate.Invalid as e:
            raise CoordinatorUnusable(f"coordinator's peer list refused: {e}") from None
