"""Differential tests: what the backend receives is exactly what the gateway decided on.

The backend is a Go program, so the backend's parse is Go's: behind the gateway (its real
engine, in-process) sits tests/standins/recorder, a Go server that records how net/http,
net/url and encoding/json read each request it gets. Hypothesis drives request targets and
manifest bodies built from the pieces that parsers disagree on (fragments, `;`, `+`, escaped
keys, repeated and case-variant parameters and JSON keys, depth) through the gateway as tenant
acme, over a raw socket so no client library tidies them up. For every input:

- refused (4xx) → the backend received nothing;
- forwarded → Go parsed the target without error into exactly one value per key, the target
  was canonical (re-encoding Go's own parse gives the same bytes), and Go's view of the
  manifest names exactly the digests the gateway checked;
- never a cross-tenant effect: no forwarded mount, blob read or manifest reference names
  anything but acme's own repository and digests (globex's digest G is known to the backend
  but not to acme), and never a 5xx.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from addons.decisions import manifest, target
from tests.support.inproc import InProcessGateway
from tests.support.rawhttp import Conn
from tests.support.stack import free_port, wait_for

A = "sha256:" + "a" * 64  # acme's own digest
G = "sha256:" + "f" * 64  # globex's: acme must never reach it
ACME_OWNED = {A}
RECORDER_SRC = Path(__file__).parents[1] / "support" / "standins" / "recorder" / "main.go"
OCI = "application/vnd.oci.image.manifest.v1+json"
DIFF = settings(
    max_examples=250,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@dataclass
class Rig:
    gw: InProcessGateway
    recorder: str
    token: str

    def reset(self) -> None:
        requests.post(f"{self.recorder}/_recorder/reset", timeout=5)

    def received(self) -> list[dict]:
        return requests.get(f"{self.recorder}/_recorder/log", timeout=5).json()

    def send(self, method: str, raw_target: bytes, body: bytes = b"", **headers: str) -> int:
        """One request as raw bytes; the answer's status (0 = closed without one)."""
        self.reset()
        head = [f"{method} ".encode() + raw_target + b" HTTP/1.1", b"Host: registry"]
        head.append(f"Authorization: Bearer {self.token}".encode())
        head += [f"{k.replace('_', '-')}: {v}".encode() for k, v in headers.items()]
        head.append(f"Content-Length: {len(body)}".encode())
        conn = Conn(self.gw.port)
        try:
            conn.send(b"\r\n".join(head) + b"\r\n\r\n" + body)
            answer = conn.read_answer(method)
        finally:
            conn.close()
        return answer.status if answer else 0


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    go = shutil.which("go")
    assert go, "Go is needed (scripts/setup.sh --test installs golang-go)"
    work = tmp_path_factory.mktemp("recorder")
    binary = work / "recorder"
    env = {**os.environ, "GO111MODULE": "off", "GOCACHE": str(work / "cache"), "CGO_ENABLED": "0"}
    subprocess.run([go, "build", "-o", str(binary), str(RECORDER_SRC)], check=True, env=env)
    port = free_port()
    proc = subprocess.Popen([str(binary), f"127.0.0.1:{port}"])
    recorder = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: requests.get(f"{recorder}/_recorder/log", timeout=1).ok)
        ledger = work / "ledger.db"
        with InProcessGateway(recorder, ledger=ledger) as gw:
            isolation = gw.addon("tenantisolation")
            isolation.ledger.add("acme", [A])
            isolation.ledger.add("globex", [G])
            yield Rig(gw, recorder, gw.token("acme"))
    finally:
        proc.terminate()
        proc.wait(10)


# --- request targets --------------------------------------------------------------------------

KEYS = ["mount", "from", "digest", "Mount", "MOUNT", "m%6Funt", "%6Dount", "fr%6Fm", "%64igest",
        "mount%00", "n", "_state", "x"]  # fmt: skip
VALUES = [A, G, A.replace(":", "%3A"), G.replace(":", "%3a"), "acme/base", "globex/app",
          "globex%2Fapp", "acme/base%23", "acme%2Fbase", "", "acme/base#", "a+b", "%G0", "%ff",
          "sha256%3A" + "f" * 64]  # fmt: skip
SEPARATORS = ["&", ";", "#&", "&&", "+&", "&#", "&amp;"]
TAILS = ["", "#", f"#&mount={G}&from=globex/app", f"#&digest={G}", "?", f"?mount={G}"]
PATHS = ["/v2/acme/steal/blobs/uploads/", "/v2/acme%2Fsteal/blobs/uploads/",
         "/v2/acme/steal/blobs/uploads/;x", "/v2/globex/app/blobs/uploads/"]  # fmt: skip


@st.composite
def upload_targets(draw: st.DrawFn) -> str:
    pairs = draw(st.lists(st.tuples(st.sampled_from(KEYS), st.sampled_from(VALUES)), max_size=4))
    seps = draw(st.lists(st.sampled_from(SEPARATORS), min_size=len(pairs), max_size=len(pairs)))
    joined = zip(pairs, seps, strict=True)
    query = "".join(f"{sep if i else ''}{k}={v}" for i, ((k, v), sep) in enumerate(joined))
    path = draw(st.sampled_from(PATHS))
    return path + ("?" + query if pairs else "") + draw(st.sampled_from(TAILS))


@st.composite
def blob_targets(draw: st.DrawFn) -> str:
    digest = draw(st.sampled_from([A, G, G.replace(":", "%3A"), A + "#", G.upper()]))
    tail = draw(st.sampled_from(["", f"?digest={A}", f"#/../{G}", f";{G}", "?", f"?x={G}"]))
    repo = draw(st.sampled_from(["acme/x", "acme/x/../../globex/app", "globex/app", "acme//x"]))
    return f"/v2/{repo}/blobs/{digest}{tail}"


def assert_same_parse(record: dict) -> None:
    """The forwarded target is exactly what Go parsed: no error, one value per key, and the
    gateway's canonical form of Go's own parse is byte-for-byte what was sent."""
    assert not record.get("query_error"), record
    query = record["query"] or {}
    assert all(len(v) == 1 for v in query.values()), record
    uri = record["request_uri"]
    assert not set("#;+ ") & set(uri), record
    reparsed = target.parse(uri.encode())
    assert reparsed.path == record["path"], record
    assert dict(reparsed.params) == {k: v[0] for k, v in query.items()}, record
    assert target.canonical(reparsed.path, dict(reparsed.params)) == uri, record


def assert_acme_only(record: dict) -> None:
    assert record["path"].startswith("/v2/acme/"), record
    form = record["form"]
    if "mount" in form or "from" in form:
        assert form.get("mount") in ACME_OWNED and form.get("from", "").startswith("acme/"), record
    if "/blobs/sha" in record["path"]:
        assert record["path"].rsplit("/", 1)[1] in ACME_OWNED, record
    assert "form" not in record["content_type"], record


@DIFF
@given(raw=st.one_of(upload_targets(), blob_targets()))
def test_a_forwarded_target_is_read_by_go_exactly_as_decided(rig, raw):
    method = "POST" if "/uploads/" in raw else "GET"
    status = rig.send(method, raw.encode())
    received = rig.received()
    assert status and status < 500, (raw, status)
    if status >= 400:
        assert received == [], (raw, received)
        return
    assert len(received) == 1, (raw, received)
    assert_same_parse(received[0])
    assert_acme_only(received[0])


def test_the_reproduced_fragment_attack_reaches_nothing(rig):
    raw = f"/v2/acme/steal/blobs/uploads/?digest={G}#&mount={G}&from=globex/app"
    assert rig.send("POST", raw.encode()) == 400
    assert rig.received() == []
    assert not rig.gw.addon("tenantisolation").ledger.has("acme", G)


def test_a_clean_mount_of_an_own_digest_is_forwarded_as_sent(rig):
    raw = f"/v2/acme/steal/blobs/uploads/?mount={A.replace(':', '%3A')}&from=acme%2Fbase"
    assert rig.send("POST", raw.encode()) == 202
    [record] = rig.received()
    assert record["form"] == {"mount": A, "from": "acme/base"}
    assert_same_parse(record)


# --- manifests --------------------------------------------------------------------------------

FIELD_KEYS = ["layers", "Layers", "LAYERS", "layer\u017f", "l\\u0061yers", "config", "Config",
              "manifests", "Manifests", "blobs", "subject", "SUBJECT"]  # fmt: skip
DIGEST_KEYS = ["digest", "Digest", "DIGEST", "dige\u017ft", "d\\u0069gest"]


@st.composite
def descriptors(draw: st.DrawFn) -> str:
    keys = draw(st.lists(st.sampled_from(DIGEST_KEYS), min_size=1, max_size=2))
    fields = [f'"{k}": "{draw(st.sampled_from([A, G]))}"' for k in keys]
    fields.append('"size": 1')
    return "{" + ", ".join(fields) + "}"


@st.composite
def manifest_bodies(draw: st.DrawFn) -> bytes:
    fields = ['"schemaVersion": 2']
    for key in draw(st.lists(st.sampled_from(FIELD_KEYS), max_size=4)):
        if key.lower() in ("config", "subject"):
            fields.append(f'"{key}": {draw(descriptors())}')
        else:
            items = draw(st.lists(descriptors(), max_size=2))
            fields.append(f'"{key}": [{", ".join(items)}]')
    depth = draw(st.sampled_from([0, 3, 70, 3000]))
    if depth:
        fields.append('"annotations": {"n": "' + "x" + '"}')
        fields.append('"x": ' + "[" * depth + "]" * depth)
    body = "{" + ", ".join(draw(st.permutations(fields))) + "}"
    return body.encode()


@DIFF
@given(body=manifest_bodies())
def test_go_reads_exactly_the_references_the_gateway_checked(rig, body):
    status = rig.send("PUT", b"/v2/acme/app/manifests/v1", body, Content_Type=OCI)
    received = rig.received()
    assert status and status < 500, (body, status)
    if status >= 400:
        assert received == [], (body, received)
        return
    [record] = received
    assert not record.get("json_error"), record
    checked = set(manifest.references(manifest.parse(body)))
    assert set(record.get("references") or []) == checked, (body, record)
    assert checked <= ACME_OWNED, (body, record)


def test_a_5000_level_manifest_is_refused_not_forwarded(rig):
    body = (
        b'{"schemaVersion": 2, "x": '
        + b"[" * 5000
        + b"]" * 5000
        + f', "layers": [{{"digest": "{G}"}}]}}'.encode()
    )
    assert rig.send("PUT", b"/v2/acme/app/manifests/v1", body, Content_Type=OCI) == 400
    assert rig.received() == []


def test_a_case_variant_key_hiding_a_foreign_layer_is_refused(rig):
    body = json.dumps({"schemaVersion": 2, "layers": [{"digest": A}], "Layers": [{"digest": G}]})
    status = rig.send("PUT", b"/v2/acme/app/manifests/v1", body.encode(), Content_Type=OCI)
    assert status == 400
    assert rig.received() == []
