"""The README's screenshot of the live view, taken while real traffic flows.

    .venv/bin/python scripts/liveview_demo.py [--seconds 90] [--screenshot docs/live-view.png]

Starts the auth stand-in and a stack (Distribution backend, 2 workers), makes traffic from
three tenants for `--seconds` (skopeo pushes and pulls, manifest and blob GETs, and what gets
refused: another tenant's repository, an unknown tag, no token), and near the end takes the
screenshot in headless Chromium (1400x900) with one refused flow opened. Chromium's own
`--screenshot` flag shoots at the page's load event, before the event stream has delivered
anything, so the page is driven over the DevTools protocol (tests/support/browser.py) instead: wait
for flows, click one, capture. Loopback only; every loop is bounded in time.
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.conftest import skopeo_copy  # noqa: E402
from tests.support.browser import Browser  # noqa: E402
from tests.support.images import oci_layout  # noqa: E402
from tests.support.stack import Stack  # noqa: E402
from tests.support.standins.auth import AuthStandin, tabbify_jwt  # noqa: E402

TENANTS = ("acme", "globex", "initech")


def token(stack: Stack, jwt: str) -> str:
    r = requests.get(
        f"{stack.url}/auth/token", params={"service": "tabbify-registry"}, auth=("x", jwt)
    )
    r.raise_for_status()
    return str(r.json()["token"])


def traffic(stack: Stack, tmp: Path, until: float) -> None:
    jwts = {t: tabbify_jwt({"sub": f"ci-{t}", "network": t}) for t in TENANTS}
    layout = tmp / "layout"
    oci_layout(layout, "v1", (4096, 2_000_000))
    for tenant, jwt in jwts.items():
        skopeo_copy(f"oci:{layout}:v1", f"docker://{stack.host}/{tenant}/app:v1", jwt)
    accept = {"Accept": "application/vnd.oci.image.manifest.v1+json"}
    rng = random.Random(7)
    pulls = 0
    while time.time() < until:
        tenant = rng.choices(TENANTS, weights=(6, 3, 1))[0]
        auth = {"Authorization": f"Bearer {token(stack, jwts[tenant])}", **accept}
        for _ in range(rng.randint(5, 30)):
            requests.get(f"{stack.url}/v2/{tenant}/app/manifests/v1", headers=auth, timeout=10)
        if rng.random() < 0.3:
            other = rng.choice([t for t in TENANTS if t != tenant])
            requests.get(f"{stack.url}/v2/{other}/app/manifests/v1", headers=auth, timeout=10)
        if rng.random() < 0.3:
            requests.get(f"{stack.url}/v2/{tenant}/app/manifests/v9", headers=auth, timeout=10)
        if rng.random() < 0.2:
            requests.get(f"{stack.url}/v2/", timeout=10)
        if rng.random() < 0.15:
            pulls += 1
            skopeo_copy(
                f"docker://{stack.host}/{tenant}/app:v1",
                f"oci:{tmp / f'pull{pulls}'}:v1",
                jwts[tenant],
            )
            shutil.rmtree(tmp / f"pull{pulls}", ignore_errors=True)
        time.sleep(rng.uniform(0.05, 0.4))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=90)
    parser.add_argument("--screenshot", type=Path, default=ROOT / "docs" / "live-view.png")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tbf-demo-") as name:
        tmp = Path(name)
        auth = AuthStandin().start()
        stack = Stack(tmp / "data", auth.url, REGISTRY_WORKERS="2")
        try:
            stack.start()
            admin = "http://" + stack.env["REGISTRY_ADMIN_ADDR"] + "/"
            # A viewer from the start, so that the overview covers the whole run.
            requests.get(admin.rstrip("/") + "/live/flows", timeout=10)
            until = time.time() + args.seconds
            worker = threading.Thread(target=traffic, args=(stack, tmp, until), daemon=True)
            worker.start()
            while time.time() < until - 20:
                requests.get(admin.rstrip("/") + "/live/flows", timeout=10)  # keeps the feed on
                time.sleep(5)
            with Browser(1400, 900) as page:
                page.open(admin)
                page.wait_for("document.querySelectorAll('#flows tbody tr').length > 50")
                time.sleep(max(0.0, until - time.time() - 5))
                page.evaluate("document.getElementById('pause').click()")  # rows stay put
                page.evaluate(
                    "(() => { const tr = [...document.querySelectorAll('#flows tbody tr.flow')]"
                    ".find(tr => tr.querySelector('.c-status').textContent === '403');"
                    " tr.scrollIntoView({block: 'center'}); tr.click(); })()"
                )
                page.wait_for("document.getElementById('detail').dataset.id")
                time.sleep(1.5)  # the next overview
                page.screenshot(args.screenshot)
            worker.join(60)
            print(f"wrote {args.screenshot}")
        finally:
            stack.stop()
            auth.stop()


if __name__ == "__main__":
    main()
