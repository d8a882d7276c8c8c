"""The mirror: the first pull of an image through it, the second, and a direct pull from the
upstream, in ONE run.

    .venv/bin/python -m tests.bench.mirror [--layers 10] [--layer-mib 4] [--repeat 3]
                                           [--json out.json]

Starts a plain Distribution as the upstream (Docker Hub's stand-in, with its token front as
in tests/standins/upstream.py), pushes one image of `--layers` random layers there with
skopeo, and a stack (`tabbify-registry run`, Distribution backend, auth on with the
stand-in) that mirrors it. Then `skopeo copy` to a fresh local directory:

- first: through the mirror, nothing cached (the mirror fetches from the upstream);
- second: through the mirror again (cached; the median of `--repeat`);
- direct: straight from the upstream registry, no gateway, no token front (the median of
  `--repeat`).

Noisy machine: compare only within one run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.support import images
from tests.support.stack import Stack
from tests.support.standins.auth import AuthStandin, tabbify_jwt
from tests.support.standins.upstream import TOKEN, USER, HubFront, Upstream


def skopeo_copy(src: str, dest: Path, *creds: str) -> float:
    started = time.monotonic()
    r = subprocess.run(
        ["skopeo", "--insecure-policy", "copy", "--src-tls-verify=false", *creds, src,
         f"oci:{dest}:v1"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    if r.returncode != 0:
        raise RuntimeError(r.stderr)
    return time.monotonic() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tests.bench.mirror")
    parser.add_argument("--layers", type=int, default=10)
    parser.add_argument("--layer-mib", type=float, default=4.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-mirror") as tmp:
        base = Path(tmp)
        upstream = Upstream(base / "upstream").start()
        hub = HubFront(upstream.port).start()
        auth = AuthStandin().start()
        stack = None
        try:
            size = int(args.layer_mib * 2**20)
            image = images.oci_layout(base / "layout", "v1", (size,) * args.layers)
            total = sum(len(b) for b in image["blobs"].values())
            r = subprocess.run(
                ["skopeo", "--insecure-policy", "copy", "--dest-tls-verify=false",
                 f"oci:{base / 'layout'}:v1",
                 f"docker://127.0.0.1:{upstream.port}/library/bench:1"],
                capture_output=True, text=True, timeout=600,
            )  # fmt: skip
            if r.returncode != 0:
                raise RuntimeError(r.stderr)
            mirrors = base / "mirrors.toml"
            robot = base / "robot"
            robot.write_text(f"{USER}:{TOKEN}\n")
            mirrors.write_text(
                f'[[mirror]]\nname = "docker.io"\nurl = "{hub.url}"\ncredentials_file = "{robot}"\n'
            )
            stack = Stack(base / "data", auth.url, REGISTRY_MIRRORS_FILE=str(mirrors)).start()
            jwt = tabbify_jwt({"sub": "bench", "network": "bench"})
            creds = ("--src-creds", f"x:{jwt}")
            through = f"docker://{stack.host}/mirror/docker.io/library/bench:1"
            first = skopeo_copy(through, base / "first", *creds)
            time.sleep(2)  # Distribution commits what it fetched in the background
            second = [skopeo_copy(through, base / f"second{i}", *creds) for i in range(args.repeat)]
            direct_ref = f"docker://127.0.0.1:{upstream.port}/library/bench:1"
            direct = [skopeo_copy(direct_ref, base / f"direct{i}") for i in range(args.repeat)]
        finally:
            if stack is not None:
                stack.stop()
            auth.stop()
            hub.stop()
            upstream.stop()
    result = {
        "layers": args.layers,
        "image_mib": round(total / 2**20, 1),
        "first_through_mirror_s": round(first, 2),
        "second_through_mirror_s": round(statistics.median(second), 2),
        "direct_from_upstream_s": round(statistics.median(direct), 2),
        "runs": {"second": [round(s, 2) for s in second], "direct": [round(s, 2) for s in direct]},
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
