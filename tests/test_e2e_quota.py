"""`[[quota]]` end to end (CONTRACTS §8): sizes of confirmed uploads recorded in the ledger,
a push that would take the tenant over its quota refused (monolithic at its head, chunked
when the backend confirms it: then nothing is recorded or linked), re-pushes free, usage per
tenant in /metrics."""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from tests.conftest import skopeo_copy
from tests.images import oci_layout
from tests.stack import Stack, wait_for
from tests.standins.auth import AuthStandin, tabbify_jwt
from tests.test_e2e_gateway import bearer, push_blob, token

pytestmark = pytest.mark.e2e
POLICY = """
[[quota]]
tenants = ["acme"]
bytes = "{limit}"

[[quota]]
tenants = ["initech"]
bytes = "100kB"
"""


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, auth: AuthStandin) -> Iterator[Stack]:
    data = tmp_path_factory.mktemp("quota") / "data"
    data.mkdir()
    (data / "policy.toml").write_text(POLICY.format(limit="400kB"))
    s = Stack(data, auth.url, REGISTRY_WORKERS="2").start()
    yield s
    s.stop()


def metrics(stack: Stack) -> dict[str, int]:
    text = requests.get(f"http://{stack.env['REGISTRY_ADMIN_ADDR']}/metrics", timeout=5).text
    found = re.findall(r'^tabbify_tenant_usage_bytes\{tenant="([^"]+)"\} (\d+)$', text, re.M)
    return {t: int(n) for t, n in found}


def chunked_upload(stack: Stack, repo: str, blob: bytes, h: dict) -> requests.Response:
    """POST, two PATCHes, then the confirming PUT without a body (as containerd pushes)."""
    r = requests.post(f"{stack.url}/v2/{repo}/blobs/uploads/", headers=h, timeout=10)
    assert r.status_code == 202, r.text
    location, half = r.headers["Location"], len(blob) // 2
    for start, part in ((0, blob[:half]), (half, blob[half:])):
        r = requests.patch(
            stack.url + location,
            data=part,
            headers={**h, "Content-Range": f"{start}-{start + len(part) - 1}",
                     "Content-Type": "application/octet-stream"},
            timeout=30,
        )  # fmt: skip
        assert r.status_code == 202, r.text
        location = r.headers["Location"]
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    return requests.put(stack.url + location, params={"digest": digest}, headers=h, timeout=30)


def test_quota_refuses_what_does_not_fit_and_usage_is_in_metrics(
    stack: Stack, acme_jwt: str, globex_jwt: str, tmp_path: Path
) -> None:
    a, g = bearer(token(stack, acme_jwt)), bearer(token(stack, globex_jwt))
    image = oci_layout(tmp_path / "src", "v1", layer_sizes=(4096, 300_000))
    size = sum(len(b) for b in image["blobs"].values())
    dest = f"docker://{stack.host}/acme/q/app:v1"
    r = skopeo_copy(f"oci:{tmp_path / 'src'}:v1", dest, acme_jwt)
    assert r.returncode == 0, r.stderr
    wait_for(lambda: metrics(stack).get("acme") == size, timeout=20)
    text = requests.get(f"http://{stack.env['REGISTRY_ADMIN_ADDR']}/metrics", timeout=5).text
    assert 'tabbify_tenant_quota_bytes{tenant="acme"} 400000' in text

    # A monolithic upload that cannot fit: refused at its head.
    big = os.urandom(200_000)
    digest = "sha256:" + hashlib.sha256(big).hexdigest()
    r = requests.post(f"{stack.url}/v2/acme/q/app/blobs/uploads/", headers=a, timeout=10)
    r = requests.put(
        stack.url + r.headers["Location"], params={"digest": digest}, data=big,
        headers={**a, "Content-Type": "application/octet-stream"}, timeout=30,
    )  # fmt: skip
    assert r.status_code == 403 and r.json()["errors"][0]["message"] == "quota exceeded"

    # Chunked: refused when the backend confirms it; nothing is recorded nor linked.
    r = chunked_upload(stack, "acme/q/app", big, a)
    assert r.status_code == 403 and r.json()["errors"][0]["message"] == "quota exceeded"
    assert requests.head(f"{stack.url}/v2/acme/q/app/blobs/{digest}", headers=a).status_code == 404
    assert stack.backend_get(f"/v2/acme/q/app/blobs/{digest}", "HEAD").status_code == 404

    # What acme holds costs nothing again: a re-push and a copy into another repository.
    r = skopeo_copy(f"oci:{tmp_path / 'src'}:v1", dest, acme_jwt)
    assert r.returncode == 0, r.stderr
    r = skopeo_copy(dest, f"docker://{stack.host}/acme/q/copy:v1", acme_jwt)
    assert r.returncode == 0, r.stderr
    # A small blob still fits; another tenant has no quota.
    push_blob(stack, "acme/q/app", b"small" * 10, a)
    push_blob(stack, "globex/app", big, g)

    # The quota raised: the same push now passes.
    (stack.data_dir / "policy.toml").write_text(POLICY.format(limit="1MB"))
    wait_for(lambda: chunked_upload(stack, "acme/q/app", big, a).status_code == 201, timeout=10)
    wait_for(lambda: metrics(stack).get("acme") == size + 50 + len(big), timeout=20)
    assert metrics(stack).get("globex") == len(big)
    log = [e for e in stack.access_log() if e["decision"] == "deny:quota exceeded"]
    assert len(log) >= 2 and all(e["tenant"] == "acme" for e in log)


def test_uploads_racing_to_the_quota_cannot_overshoot_it(stack: Stack) -> None:
    """Twelve 20 kB uploads at once, confirmed by both workers at about the same time, for a
    tenant with 100 kB: exactly five fit, and usage ends at the quota."""
    h = bearer(token(stack, tabbify_jwt({"network": "initech"})))
    blobs = [os.urandom(20_000) for _ in range(12)]
    with ThreadPoolExecutor(len(blobs)) as pool:
        answers = list(pool.map(lambda b: chunked_upload(stack, "initech/app", b, h), blobs))
    codes = sorted(r.status_code for r in answers)
    assert codes == [201] * 5 + [403] * 7, [r.text for r in answers]
    wait_for(lambda: metrics(stack).get("initech") == 100_000, timeout=20)
