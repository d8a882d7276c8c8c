"""The live view in a real browser (headless Chromium) while real clients push and pull through
the whole stack: flows appear as they happen with the right fields, nothing secret reaches
the page, and what clients sent is shown as text, never as markup."""

from __future__ import annotations

import base64
import io
import json
import re
import socket
import time
from pathlib import Path

import pytest
import requests
from mitmproxy import io as mitmio

from tests.conftest import skopeo_copy
from tests.e2e.test_gateway import bearer, push_blob, token
from tests.support import browser
from tests.support.browser import Browser
from tests.support.images import oci_layout
from tests.support.rawhttp import Conn
from tests.support.stack import Stack

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not browser.available(), reason="no chromium (scripts/setup.sh --test)"),
]

# Client-controlled text that would run or render if the page parsed it as HTML.
HTML_AGENT = '<img src=x onerror="window.__xss=1"><b id="injected">agent</b>'
HTML_TARGET = "/v2/acme/app/manifests/<script>window.__xss=2</script>"

ROWS = """[...document.querySelectorAll('#flows tbody tr.flow')].map(tr => ({
  id: tr.dataset.id,
  time: tr.querySelector('.c-time').textContent,
  tenant: tr.querySelector('.c-tenant').textContent,
  method: tr.querySelector('.c-method').textContent,
  repository: tr.querySelector('.c-repository').textContent,
  reference: tr.querySelector('.c-reference').textContent,
  status: tr.querySelector('.c-status').textContent,
  decision: tr.querySelector('.c-decision').textContent,
  reason: tr.querySelector('.c-rule').textContent,
  bytes_in: tr.querySelector('.c-in').textContent,
  bytes_out: tr.querySelector('.c-out').textContent,
  duration: tr.querySelector('.c-duration').textContent,
  backend: tr.querySelector('.c-backend').textContent,
}))"""

# Opens every flow in turn; returns each detail panel's HTML and text.
OPEN_ALL = """(async () => {
  const out = [];
  const detail = document.getElementById('detail');
  for (const tr of [...document.querySelectorAll('#flows tbody tr.flow')]) {
    tr.click();
    for (let i = 0; i < 200 && detail.dataset.id !== tr.dataset.id; i++) {
      await new Promise(r => setTimeout(r, 25));
    }
    out.push({id: tr.dataset.id, html: detail.outerHTML, text: detail.textContent});
  }
  return out;
})()"""


def admin_url(stack: Stack) -> str:
    return "http://" + stack.env["REGISTRY_ADMIN_ADDR"]


def raw_get(stack: Stack, target: str, agent: str = "raw") -> int:
    conn = Conn(stack.port)
    conn.send(
        f"GET {target} HTTP/1.1\r\nHost: {stack.host}\r\nUser-Agent: {agent}\r\n"
        "Connection: close\r\n\r\n".encode()
    )
    answer = conn.read_answer()
    assert answer is not None
    return answer.status


def test_flows_appear_live_redacted_and_as_text(registry, acme_jwt, tmp_path: Path):
    oci_layout(tmp_path / "layout", "v1")
    with Browser() as page:
        page.open(admin_url(registry) + "/")
        page.wait_for("document.getElementById('status').textContent === 'live'")

        # Real clients, while the page is open.
        src, repo = f"oci:{tmp_path / 'layout'}:v1", f"docker://{registry.host}/acme/live-view:v1"
        pushed = skopeo_copy(src, repo, acme_jwt)
        assert pushed.returncode == 0, pushed.stderr
        pulled = skopeo_copy(repo, f"oci:{tmp_path / 'pulled'}:v1", acme_jwt)
        assert pulled.returncode == 0, pulled.stderr
        registry_token = token(registry, acme_jwt)
        requests.get(
            f"{registry.url}/v2/globex/secret/manifests/v1", headers=bearer(registry_token)
        )
        assert raw_get(registry, "/v2/", HTML_AGENT) == 401
        assert raw_get(registry, HTML_TARGET) == 400

        page.wait_for(
            f"""{ROWS}.some(r => r.method === 'PUT' && r.reference === 'v1')
              && {ROWS}.some(r => r.status === '400')
              && {ROWS}.some(r => r.repository === 'globex/secret')"""
        )
        page.evaluate("document.getElementById('pause').click()")  # hold the table still
        rows = page.evaluate(ROWS)

        def one(**want: str) -> dict[str, str]:
            found = [r for r in rows if all(r[k] == v for k, v in want.items())]
            assert found, (want, rows)
            return found[0]

        manifest = one(method="PUT", repository="acme/live-view", reference="v1")
        assert (manifest["tenant"], manifest["status"], manifest["decision"]) == (
            "acme",
            "201",
            "allow",
        )
        assert manifest["bytes_in"] not in ("", "0 B") and manifest["backend"].endswith("ms")
        assert re.fullmatch(r"\d\d:\d\d:\d\d\.\d{3}", manifest["time"])
        blob_pulls = [
            r
            for r in rows
            if r["method"] == "GET"
            and r["reference"].startswith("sha256:")
            and r["status"] == "200"
        ]
        assert blob_pulls and all(r["bytes_out"] not in ("", "0 B") for r in blob_pulls)
        assert all(r["duration"] for r in rows)
        foreign = one(repository="globex/secret")
        assert (foreign["tenant"], foreign["status"], foreign["decision"]) == (
            "acme",
            "403",
            "deny",
        )
        assert foreign["reason"]  # the rule or reason behind the refusal
        unauthenticated = one(status="401", tenant="-")
        assert (
            unauthenticated["decision"] == "deny"
            and "unauthenticated" in (unauthenticated["reason"])
        )
        malformed = one(status="400")
        assert malformed["decision"] == "deny" and "malformed" in malformed["reason"]

        # The overview has the tenant, the filters filter.
        page.wait_for(
            "[...document.querySelectorAll('#tenants tbody td:first-child')]"
            ".some(td => td.textContent === 'acme')"
        )
        page.evaluate(
            "(() => { const s = document.getElementById('f-decision'); s.value = 'deny';"
            " s.dispatchEvent(new Event('input')); })()"
        )
        shown = page.evaluate(ROWS)
        assert shown and all(r["decision"] == "deny" for r in shown)
        page.evaluate(
            "(() => { const s = document.getElementById('f-decision'); s.value = '';"
            " s.dispatchEvent(new Event('input')); })()"
        )

        details = page.evaluate(OPEN_ALL)
        assert len(details) == len(rows)
        dom = page.evaluate("document.documentElement.outerHTML") + "".join(
            d["html"] for d in details
        )

        # Nothing secret: not the Tabbify JWT, not a registry token, not a credential header.
        basic = base64.b64encode(f"x:{acme_jwt}".encode()).decode()  # skopeo's Basic auth
        for secret in (
            acme_jwt,
            registry_token,
            *acme_jwt.split(".")[1:],
            registry_token.split(".")[2],
            basic[:40],
        ):
            assert secret not in dom
        assert not re.search(r"eyJ[\w-]+\.[\w-]+\.", dom)  # nothing JWT-shaped
        assert not re.search(r"(Bearer|Basic)\s+(?!realm=)[\w.~+/=-]{8,}", dom)
        assert "REDACTED" in dom  # the token requests' Authorization, replaced

        # What a client sent is text on the page, never markup.
        agent = [d for d in details if HTML_AGENT in d["text"]]
        assert agent, "the user agent with HTML in it is shown"
        target = [d for d in details if "<script>window.__xss=2</script>" in d["text"]]
        assert target, "the request target with HTML in it is shown"
        assert page.evaluate("window.__xss === undefined")
        assert page.evaluate(
            "document.querySelector('#injected, main img, main script, #detail b') === null"
        )

        # A capture started and stopped from the page (its CSRF token).
        page.evaluate("document.getElementById('capture-start').click()")
        page.wait_for("document.getElementById('capture-status').textContent.includes('writing')")
        page.evaluate("document.getElementById('capture-stop').click()")
        page.wait_for("document.getElementById('capture-status').textContent.includes('last')")

        # A `rule` in the access-log line (the access policy's) is shown beside the reason.
        page.evaluate("document.getElementById('pause').click()")  # resume
        feed = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        rule = {
            "seq": 1, "end": time.time(), "time": "2026-01-01T00:00:00.000Z", "tenant": "acme",
            "method": "GET", "repository": "acme/ruled", "reference": "v1", "status": 403,
            "decision": "deny:policy", "rule": "no-<i>pulls</i>",
        }  # fmt: skip
        feed.sendto(  # as a worker sends it (addons/gateway/flowfeed.py `encode`)
            json.dumps({"pid": 1, "worker": 0, "dropped": 0}).encode()
            + b"\n"
            + json.dumps(rule).encode()
            + b"\t{}",
            str(registry.data_dir / "run" / "workers" / "liveview.sock"),
        )
        feed.close()
        ruled = page.wait_for(f"{ROWS}.find(r => r.repository === 'acme/ruled')")
        assert ruled["reason"] == "rule no-<i>pulls</i> · policy"
        assert page.evaluate("document.querySelector('main i') === null")

        assert page.console_errors() == []  # no CSP violation, no script error

        # The download: what the view shows, as a mitmproxy flow file.
        link = page.evaluate("document.getElementById('download').href")
    data = requests.get(link, timeout=30).content
    assert acme_jwt.encode() not in data and registry_token.encode() not in data
    flows = list(mitmio.FlowReader(io.BytesIO(data)).stream())
    assert any(
        f.request.method == "PUT" and f.request.path == "/v2/acme/live-view/manifests/v1"
        for f in flows
    )
    authorized = [f for f in flows if "authorization" in f.request.headers]
    assert authorized and {f.request.headers["authorization"] for f in authorized} == {"REDACTED"}


def test_the_view_is_refused_under_another_name(registry):
    """DNS rebinding: the attacker's name resolving to 127.0.0.1 is not this endpoint."""
    port = registry.env["REGISTRY_ADMIN_ADDR"].rpartition(":")[2]
    r = requests.get(admin_url(registry) + "/", headers={"Host": f"rebind.example:{port}"})
    assert r.status_code == 403
    r = requests.post(
        admin_url(registry) + "/capture",
        headers={"Origin": "http://rebind.example", "Content-Type": "text/plain"},
    )
    assert r.status_code == 403


def test_the_page_paints_its_rows_and_opened_flows_show_their_bodies(registry, acme_jwt):
    """Traffic while nobody looks, then: a plain `chromium --headless --dump-dom` (no waiting
    for scripts) already has the rows; an opened flow shows the manifest pushed, the one
    pulled and the error JSON a client got, with subject, user agent and the client's Host,
    and a JWT inside a body is redacted; the download carries the same bodies."""
    t = token(registry, acme_jwt)
    headers = {**bearer(t), "User-Agent": "body-test/1.0"}
    repo = "acme/bodies"
    config = push_blob(registry, repo, b"{}", headers)
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": config, "size": 2},
        "layers": [],
        "annotations": {"note": f"pasted {acme_jwt} here"},
    }  # fmt: skip
    body = json.dumps(manifest).encode()
    r = requests.put(
        f"{registry.url}/v2/{repo}/manifests/v1",
        data=body,
        headers={**headers, "Content-Type": manifest["mediaType"]},
        timeout=10,
    )
    assert r.status_code == 201, r.text
    r = requests.get(
        f"{registry.url}/v2/{repo}/manifests/v1",
        headers={**headers, "Accept": manifest["mediaType"]},
        timeout=10,
    )
    assert r.status_code == 200 and r.content == body
    r = requests.get(f"{registry.url}/v2/globex/secret/manifests/v1", headers=headers, timeout=10)
    assert r.status_code == 403 and r.json()["errors"]  # the gateway's refusal
    r = requests.get(f"{registry.url}/v2/{repo}/manifests/nope", headers=headers, timeout=10)
    assert r.status_code == 404 and r.json()["errors"]  # the backend's, streamed through

    # A plain screenshot-style load: chromium's own defaults, no script waited for.
    profile = Path(browser.tempfile.mkdtemp(prefix="tbf-dump-"))
    dump = browser.subprocess.run(
        [browser.shutil.which("chromium") or browser.CHROMIUM, "--headless", "--no-sandbox",
         f"--user-data-dir={profile}", "--dump-dom", admin_url(registry) + "/"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert 'class="c-repository">acme/bodies<' in dump.stdout, dump.stdout[-2000:]
    assert "body-test/1.0" in dump.stdout and acme_jwt not in dump.stdout

    with Browser() as page:
        page.open(admin_url(registry) + "/")
        cells = """[...document.querySelectorAll('#flows tbody tr.flow')].map(tr => ({
          id: tr.dataset.id,
          method: tr.querySelector('.c-method').textContent,
          repository: tr.querySelector('.c-repository').textContent,
          status: tr.querySelector('.c-status').textContent,
          reference: tr.querySelector('.c-reference').textContent,
          subject: tr.querySelector('.c-subject').textContent,
          host: tr.querySelector('.c-host').textContent,
          agent: tr.querySelector('.c-agent').textContent,
        }))"""
        page.wait_for("document.getElementById('status').textContent === 'live'")  # its script
        page.wait_for(f"{cells}.some(r => r.repository === 'globex/secret')")
        rows = page.evaluate(cells)

        def opened(method: str, repository: str, status: str, reference: str = "v1") -> str:
            [row] = [
                r for r in rows
                if (r["method"], r["repository"], r["status"], r["reference"], r["agent"])
                == (method, repository, status, reference, "body-test/1.0")
            ]  # fmt: skip
            assert (row["subject"], row["host"]) == ("user-1", registry.host)
            page.evaluate(f"document.querySelector('tr.flow[data-id=\"{row['id']}\"]').click()")
            page.wait_for(
                f"document.getElementById('detail').dataset.id === '{row['id']}'"
                " && document.querySelector('#detail pre') !== null"
            )
            return page.evaluate("document.getElementById('detail').textContent")

        pushed = opened("PUT", repo, "201")
        assert '"schemaVersion": 2' in pushed and "pasted REDACTED here" in pushed
        pulled = opened("GET", repo, "200")
        assert '"schemaVersion": 2' in pulled and "pasted REDACTED here" in pulled
        refused = opened("GET", "globex/secret", "403")
        assert re.search(r'"code": ?"DENIED"', refused), refused
        unknown = opened("GET", repo, "404", "nope")
        assert re.search(r'"code": ?"MANIFEST_UNKNOWN"', unknown), unknown
        dom = page.evaluate("document.documentElement.outerHTML")
        assert acme_jwt not in dom and acme_jwt.split(".")[2] not in dom
        assert page.console_errors() == []
        link = page.evaluate("document.getElementById('download').href")
    data = requests.get(link, timeout=30).content
    assert acme_jwt.split(".")[2].encode() not in data
    flows = list(mitmio.FlowReader(io.BytesIO(data)).stream())
    [put] = [
        f
        for f in flows
        if (f.request.method, f.request.path) == ("PUT", f"/v2/{repo}/manifests/v1")
    ]
    assert b"pasted REDACTED here" in put.request.content
