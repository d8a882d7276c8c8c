"""What an immutable tag reaches (addons/gateway/immutable.py): the walk, its bounds, its cache.

The end-to-end tests (e2e/test_policy.py) run it against Distribution with skopeo; these
drive the same code against a backend answered in memory, to reach the bounds (a thousand
manifests, a backend that fails half-way) that a real push would take minutes to build.
"""

from __future__ import annotations

import asyncio
import hashlib
import json

import httpx
import pytest

from addons.clients.backend import AsyncClient, Unavailable
from addons.decisions.manifest import made_of
from addons.decisions.policy import parse
from addons.gateway import immutable
from addons.gateway.immutable import ImmutableTags
from addons.gateway.policy_store import PolicyFile

POLICY = parse('[[immutable]]\nrepositories = ["acme/rel/**"]\ntags = ["v*"]\n', "policy.toml")
REPO = "acme/rel/app"


def sha(body: bytes) -> str:
    return "sha256:" + hashlib.sha256(body).hexdigest()


def blob(n: int) -> str:
    return "sha256:" + hashlib.sha256(b"blob %d" % n).hexdigest()


def image(n: int) -> bytes:
    return json.dumps({"config": {"digest": blob(n)}, "layers": [{"digest": blob(n + 1)}]}).encode()


def index(children: list[bytes]) -> bytes:
    return json.dumps({"manifests": [{"digest": sha(c)} for c in children]}).encode()


class Backend:
    """A registry's read API over `manifests` (by digest) and `tags`, counting requests."""

    def __init__(self, manifests: list[bytes], tags: dict[str, bytes]) -> None:
        self.manifests = {sha(m): m for m in [*manifests, *tags.values()]}
        self.tags = tags
        self.requests: list[str] = []
        self.broken = False

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(f"{request.method} {request.url.path}")
        if self.broken:
            return httpx.Response(500)
        path = request.url.path
        if path == f"/v2/{REPO}/tags/list":
            return httpx.Response(200, json={"name": REPO, "tags": sorted(self.tags)})
        reference = path.rsplit("/", 1)[1]
        body = self.tags.get(reference) or self.manifests.get(reference)
        if body is None:
            return httpx.Response(404)
        return httpx.Response(200, content=body, headers={"Docker-Content-Digest": sha(body)})


def protects(tags: ImmutableTags, digest: str) -> str | None:
    return asyncio.run(tags._protects(POLICY, REPO, digest))


def gateway(backend: Backend) -> ImmutableTags:
    tags = ImmutableTags(PolicyFile())
    tags.client = AsyncClient("http://backend", transport=httpx.MockTransport(backend))
    return tags


def test_references_are_children_and_blobs_never_the_subject():
    doc = {
        "config": {"digest": blob(1)},
        "layers": [{"digest": blob(2)}, {"digest": "sha256:NOT-A-DIGEST"}, "junk"],
        "blobs": [{"digest": blob(3)}],
        "fsLayers": [{"blobSum": blob(4)}],
        "manifests": [{"digest": blob(5)}],
        "subject": {"digest": blob(6)},
    }
    assert made_of(doc) == ([blob(5)], [blob(1), blob(2), blob(3), blob(4)])
    with pytest.raises(ValueError):
        made_of([])


def test_a_delete_is_refused_for_everything_a_covered_tag_reaches_and_only_that():
    a, b, loose = image(10), image(20), image(30)
    top = index([a, b])
    tags = gateway(Backend([a, b, loose], {"v1": top, "latest": loose}))
    for digest in (sha(top), sha(a), sha(b), blob(10), blob(11), blob(20), blob(21)):
        assert protects(tags, digest) == "immutable policy.toml:1", digest
    for digest in (sha(loose), blob(30), blob(31)):
        assert protects(tags, digest) is None, digest


def test_what_a_digest_reaches_is_read_once():
    children = [image(i * 10) for i in range(20)]
    backend = Backend(children, {"v1": index(children), "v2": children[0]})
    tags = gateway(backend)
    assert protects(tags, blob(999)) is None
    first = len(backend.requests)
    assert first == 1 + 2 + 21  # tag list, a HEAD per covered tag, each manifest once
    backend.requests.clear()
    assert protects(tags, blob(998)) is None
    assert len(backend.requests) == 3  # the tag list and the HEADs: the rest is cached


def test_a_covered_tag_reaching_too_many_manifests_refuses_the_delete(monkeypatch):
    monkeypatch.setattr(immutable, "MAX_REACH", 10)
    children = [image(i * 10) for i in range(11)]
    tags = gateway(Backend(children, {"v1": index(children)}))
    assert "more than 10 manifests" in (protects(tags, blob(999)) or "")


def test_a_delete_that_would_read_too_much_is_503_and_the_next_one_goes_further(monkeypatch):
    monkeypatch.setattr(immutable, "MAX_FETCHES", 6)
    children = [image(i * 10) for i in range(8)]
    tags = gateway(Backend(children, {"v1": index(children)}))
    with pytest.raises(Unavailable):
        protects(tags, blob(999))
    assert protects(tags, blob(999)) is None  # what the first one read is cached
    assert protects(tags, blob(10)) is not None


def test_a_backend_that_cannot_answer_or_lies_fails_closed():
    a = image(10)
    backend = Backend([a], {"v1": index([a])})
    backend.broken = True
    with pytest.raises(Unavailable):
        protects(gateway(backend), blob(999))
    backend.broken = False
    backend.manifests[sha(a)] = image(40)  # bytes that are not what the digest names
    with pytest.raises(Unavailable):
        protects(gateway(backend), blob(999))


def test_a_missing_child_is_protected_and_not_cached():
    a, b = image(10), image(20)
    backend = Backend([a], {"v1": index([a, b])})  # b is not in the repository
    tags = gateway(backend)
    assert protects(tags, sha(b)) is not None
    assert sha(b) not in tags.reach and sha(index([a, b])) not in tags.reach
    backend.manifests[sha(b)] = b  # pushed later: its blobs are protected from then on
    assert protects(tags, blob(21)) is not None


def test_a_wide_index_is_refused_before_its_children_are_read():
    wide = json.dumps({"manifests": [{"digest": blob(i)} for i in range(5000)]}).encode()
    backend = Backend([], {"v1": wide})
    assert "more than 1000 manifests" in (protects(gateway(backend), blob(99_999)) or "")
    assert len(backend.requests) == 3  # tag list, HEAD, the index: no child was asked for


def test_a_child_named_many_times_is_read_and_counted_once():
    a = image(10)
    levels = [a]
    for _ in range(6):  # each level names the one below 300 times: 300**6 paths, 7 manifests
        child = {"digest": sha(levels[-1])}
        levels.append(json.dumps({"manifests": [child] * 300}).encode())
    backend = Backend(levels[:-1], {"v1": levels[-1]})
    assert protects(gateway(backend), blob(11)) is not None
    assert len(backend.requests) == 2 + len(levels)


def test_a_repository_no_rule_covers_costs_no_backend_request():
    backend = Backend([], {"v1": image(10)})
    tags = gateway(backend)
    assert asyncio.run(tags._protects(POLICY, "acme/other", blob(10))) is None
    assert backend.requests == []
