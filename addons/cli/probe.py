"""`python -m addons.cli.probe /livez|/readyz|/healthz`: ask the admin endpoint
(REGISTRY_ADMIN_ADDR, default 127.0.0.1:5002) from inside the container; exit 0 on 200, 1
otherwise, with the answer on one line. For HEALTHCHECK and exec probes: the admin endpoint
is loopback only, where an orchestrator's HTTP probe cannot reach it."""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request

PATHS = ("/livez", "/readyz", "/healthz")


def main(argv: list[str]) -> int:
    path = argv[0] if argv else "/livez"
    if path not in PATHS:
        print(f"probe: expected one of {', '.join(PATHS)}", file=sys.stderr)
        return 2
    admin = os.environ.get("REGISTRY_ADMIN_ADDR") or "127.0.0.1:5002"
    try:
        with urllib.request.urlopen(f"http://{admin}{path}", timeout=4) as answer:
            print(answer.read().decode(errors="replace").strip())
            return 0
    except urllib.error.HTTPError as e:
        print(f"{e.code} {e.read().decode(errors='replace').strip()}")
    except (OSError, ValueError) as e:
        print(f"admin endpoint {admin} unreachable: {e}")
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
