"""Hot-path cost of the tenant-isolation ledger: authenticated blob HEAD rate through the
gateway with and without it, in ONE run.

    .venv/bin/python -m tests.bench.ledger [--duration 10] [--rounds 2]

Starts a full stack (auth on, ledger on), pushes one blob, then starts a second gateway process
over the same backend with the same options except `registry_ledger=` (off). Both verify the
same kind of registry token; the second one is a separate process with its own secret, so it
gets its own token. The two are loaded alternately (16 keep-alive connections,
tests.bench.httpload).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import requests

from addons.cli.programs import gateway_command
from addons.config import settings as settings_mod
from tests.bench.httpload import load
from tests.e2e.test_gateway import push_blob
from tests.support.stack import Stack, free_port, wait_for
from tests.support.standins.auth import AuthStandin, tabbify_jwt


def token(base: str, credential: str) -> dict[str, str]:
    r = requests.get(f"{base}/auth/token", auth=("x", credential), timeout=10)
    r.raise_for_status()
    return {"Authorization": f"Bearer {r.json()['token']}"}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--duration", type=float, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    credential = tabbify_jwt({"sub": "bench"})
    auth = AuthStandin().start()
    with tempfile.TemporaryDirectory(prefix="tbf-ledger-bench-") as tmp:
        stack = Stack(Path(tmp) / "data", auth.url).start()
        plain = None
        try:
            digest = push_blob(
                stack, "bench/ledger", os.urandom(4096), token(stack.url, credential)
            )
            port = free_port()
            env = {
                **stack.env,
                "REGISTRY_LISTEN": f"127.0.0.1:{port}",
                "REGISTRY_DATA_DIR": str(Path(tmp) / "plain"),
            }
            # Same options, but no ledger, and no run around it (its log FIFO, state dir).
            off = ("registry_ledger=", "registry_access_log=", "registry_state_dir=")
            command = [
                next((o for o in off if a.startswith(o)), a)
                for a in gateway_command(settings_mod.load(env))
            ]
            plain = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            plain_url = f"http://127.0.0.1:{port}"
            wait_for(lambda: requests.get(f"{plain_url}/v2/", timeout=2).status_code == 401, 20)
            targets = {
                "with ledger": (stack.url, token(stack.url, credential)),
                "without ledger": (plain_url, token(plain_url, credential)),
            }
            rates: dict[str, list[float]] = {name: [] for name in targets}
            for _ in range(args.rounds):
                for name, (base, headers) in targets.items():
                    r = load(
                        f"{base}/v2/bench/ledger/blobs/{digest}", "HEAD", headers, 16, args.duration
                    )
                    assert r.non_2xx_3xx == 0 and r.socket_errors == 0, (name, r)
                    rates[name].append(r.requests_per_s)
        finally:
            if plain:
                plain.terminate()
                plain.wait(10)
            stack.stop()
            auth.stop()
    best = {name: max(v) for name, v in rates.items()}
    for name, values in rates.items():
        print(f"{name:>15}: " + ", ".join(f"{v:.0f}" for v in values) + " HEAD/s")
    print(f"ledger cost: with/without = {best['with ledger'] / best['without ledger']:.2f}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
