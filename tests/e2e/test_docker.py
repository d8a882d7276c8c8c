"""Docker's CLI through the gateway, against a dockerd this module starts and stops.

The daemon is Debian 12's `docker.io` (`scripts/setup.sh --test` installs it), started so that
it leaves the host alone: its own data root, exec root, pid file, socket, config file and key
file under a temporary directory; no iptables, no bridge, no IP forwarding, no userland
proxy. It never runs a container: it only pushes and pulls. No image comes from the internet:
the image is an OCI layout from tests/support/images.py, turned into a `docker-archive:` tarball by
skopeo and `docker load`-ed.

The CLI is Debian's too (`/usr/bin/docker`, 20.10), with its own DOCKER_CONFIG: `docker login`
stores the Tabbify JWT there, never in ~/.docker.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import skopeo, skopeo_copy
from tests.support.images import oci_layout
from tests.support.stack import Stack

pytestmark = pytest.mark.e2e

DOCKERD = "/usr/sbin/dockerd"
DOCKER = "/usr/bin/docker"  # Debian's CLI, whatever else is first on PATH
START_TIMEOUT = 60.0
# What dockerd says when the machine, not our flags, is the problem: only then the tests skip.
CANNOT_RUN_HERE = (
    "operation not permitted",
    "permission denied",
    "cgroup",
    "not supported",
    "no such device",
    "kernel",
)


def host_state() -> dict[str, str]:
    """What a careless dockerd would change on the host."""
    state = {
        "interfaces": " ".join(sorted(os.listdir("/sys/class/net"))),
        "ip_forward": Path("/proc/sys/net/ipv4/ip_forward").read_text().strip(),
        "etc_docker_key": str(Path("/etc/docker/key.json").exists()),
    }
    if shutil.which("iptables"):
        out = subprocess.run(["iptables", "-S"], capture_output=True, text=True, timeout=30)
        state["iptables"] = out.stdout + out.stderr
    return state


class Dockerd:
    def __init__(self, root: Path, insecure_registry: str) -> None:
        self.root = root
        self.sock = root / "docker.sock"
        self.log = root / "dockerd.log"
        # Its own config file, never the host's /etc/docker/daemon.json; the key dockerd 20.10
        # makes for its identity goes here instead of /etc/docker/key.json (a config-file-only
        # setting).
        config = {"deprecated-key-path": str(root / "key.json")}
        (root / "daemon.json").write_text(json.dumps(config))
        self.args = [
            DOCKERD,
            f"--data-root={root / 'data'}",
            f"--exec-root={root / 'exec'}",
            f"--pidfile={root / 'dockerd.pid'}",
            f"--host=unix://{self.sock}",
            f"--config-file={root / 'daemon.json'}",
            "--storage-driver=vfs",
            "--iptables=false",
            "--ip6tables=false",
            "--ip-forward=false",
            "--ip-masq=false",
            "--bridge=none",
            "--userland-proxy=false",
            f"--insecure-registry={insecure_registry}",
        ]
        self.proc: subprocess.Popen[bytes] | None = None
        self.config = root / "cli"
        self.config.mkdir()

    def start(self) -> str | None:
        """None when serving; else why dockerd cannot run on this machine. Any other failure
        to start (a wrong flag of ours) raises."""
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                self.args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = self.log_tail(5)
                if any(marker in tail.lower() for marker in CANNOT_RUN_HERE):
                    return f"dockerd cannot run on this machine: {' | '.join(tail.splitlines())}"
                raise RuntimeError(f"dockerd exited {self.proc.returncode} at start:\n{tail}")
            if (
                self.docker("version", "--format", "{{.Server.Version}}", timeout=10).returncode
                == 0
            ):
                return None
            time.sleep(0.3)
        raise TimeoutError(f"dockerd did not answer within {START_TIMEOUT} s:\n{self.log_tail()}")

    def docker(
        self, *args: str, stdin: str | None = None, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.root),
            "DOCKER_HOST": f"unix://{self.sock}",
            "DOCKER_CONFIG": str(self.config),
            "DOCKER_CLI_EXPERIMENTAL": "enabled",  # `docker manifest` on older CLIs
        }
        return subprocess.run(
            [DOCKER, *args], input=stdin, env=env, capture_output=True, text=True, timeout=timeout
        )

    def log_tail(self, n: int = 20) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: dockerd, containerd
                self.proc.wait()
        # dockerd's containerd runs in the same session: nothing of it may outlive the test.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        for line in reversed(Path("/proc/mounts").read_text().splitlines()):
            mountpoint = line.split()[1]
            if mountpoint.startswith(str(self.root) + "/"):
                subprocess.run(["umount", "-l", mountpoint], check=False)


@pytest.fixture(scope="module")
def dockerd(registry: Stack) -> Iterator[Dockerd]:
    if not Path(DOCKERD).is_file() or not Path(DOCKER).is_file():
        pytest.fail("docker.io is not installed: scripts/setup.sh --test installs it")
    if os.geteuid() != 0:
        pytest.skip("dockerd needs root here (it is started without rootless mode)")
    before = host_state()
    # A short path: dockerd's containerd puts unix sockets under the exec root (108-byte limit).
    root = Path(tempfile.mkdtemp(prefix="tbf-dockerd-"))
    daemon = Dockerd(root, registry.host)
    try:
        why = daemon.start()
        if why:
            pytest.skip(why)
        yield daemon
    finally:
        daemon.stop()
        shutil.rmtree(root, ignore_errors=True)
    assert host_state() == before, "dockerd changed the host"


@pytest.fixture(scope="module")
def image(dockerd: Dockerd, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny image in the daemon, built locally: OCI layout → docker-archive → docker load."""
    work = tmp_path_factory.mktemp("docker-image")
    oci_layout(work / "layout", "v1", layer_sizes=(2048, 4096))
    archive = work / "image.tar"
    r = skopeo("copy", f"oci:{work / 'layout'}:v1", f"docker-archive:{archive}:tbf/probe:v1")
    assert r.returncode == 0, r.stderr
    r = dockerd.docker("load", "-i", str(archive))
    assert r.returncode == 0, r.stderr
    return "tbf/probe:v1"


@pytest.fixture(scope="module")
def logged_in(dockerd: Dockerd, registry: Stack, acme_jwt: str) -> Dockerd:
    r = dockerd.docker(
        "login", registry.host, "--username", "x", "--password-stdin", stdin=acme_jwt
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Login Succeeded" in r.stdout
    stored = json.loads((dockerd.config / "config.json").read_text())
    assert registry.host in stored["auths"]  # in the test's DOCKER_CONFIG, not ~/.docker
    return dockerd


def test_login_with_a_wrong_password_is_refused(dockerd, registry):
    r = dockerd.docker(
        "login", registry.host, "--username", "x", "--password-stdin", stdin="not-a-jwt"
    )
    assert r.returncode != 0
    assert "unauthorized" in r.stderr.lower() or "401" in r.stderr, r.stderr


def test_push_remove_pull(logged_in, image, registry):
    ref = f"{registry.host}/acme/docker-probe:v1"
    assert logged_in.docker("tag", image, ref).returncode == 0
    r = logged_in.docker("push", ref)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "digest: sha256:" in r.stdout
    pushed_digest = r.stdout.split("digest: ")[1].split()[0]

    r = logged_in.docker("rmi", ref, image)
    assert r.returncode == 0, r.stderr
    assert logged_in.docker("image", "inspect", ref).returncode != 0  # really gone

    r = logged_in.docker("pull", ref)
    assert r.returncode == 0, r.stdout + r.stderr
    assert pushed_digest in r.stdout
    r = logged_in.docker("image", "inspect", "--format", "{{json .RepoDigests}}", ref)
    assert r.returncode == 0 and pushed_digest in r.stdout, r.stdout + r.stderr
    assert logged_in.docker("tag", ref, image).returncode == 0  # for the other tests


def test_another_tenants_namespace_is_denied_with_a_readable_message(logged_in, image, registry):
    ref = f"{registry.host}/globex/docker-probe:v1"
    assert logged_in.docker("tag", image, ref).returncode == 0
    r = logged_in.docker("push", ref)
    assert r.returncode != 0
    print(r.stdout + r.stderr)
    assert "denied" in r.stderr.lower(), r.stdout + r.stderr
    assert "acme/" in r.stderr, r.stderr  # names the namespace the caller may push to
    r = logged_in.docker("pull", ref)
    assert r.returncode != 0
    print(r.stderr)
    assert "denied" in r.stderr.lower(), r.stderr


def test_manifest_inspect_create_push(logged_in, image, registry, acme_jwt, tmp_path):
    """`docker manifest` talks to the registry from the CLI itself (Go's HTTP client, TLS
    first): it needs the plain-HTTP 400 answer to a ClientHello to fall back to HTTP."""
    ref = f"{registry.host}/acme/docker-manifest:v1"
    assert logged_in.docker("tag", image, ref).returncode == 0
    r = logged_in.docker("push", ref)
    assert r.returncode == 0, r.stdout + r.stderr
    pushed_digest = r.stdout.split("digest: ")[1].split()[0]

    r = logged_in.docker("manifest", "inspect", "--insecure", ref)
    assert r.returncode == 0, r.stdout + r.stderr
    manifest = json.loads(r.stdout)
    assert manifest["schemaVersion"] == 2 and len(manifest["layers"]) == 2

    index = f"{registry.host}/acme/docker-manifest:multi"
    r = logged_in.docker("manifest", "create", "--insecure", index, ref)
    assert r.returncode == 0, r.stdout + r.stderr
    r = logged_in.docker("manifest", "push", "--insecure", "--purge", index)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip().startswith("sha256:"), r.stdout

    r = logged_in.docker("manifest", "inspect", "--insecure", index)
    assert r.returncode == 0, r.stdout + r.stderr
    listed = json.loads(r.stdout)
    assert [m["digest"] for m in listed["manifests"]] == [pushed_digest]
    # and the list is in the registry, readable by another client
    out = tmp_path / "pulled"
    r = skopeo_copy(f"docker://{index}", f"oci:{out}:x", acme_jwt)
    assert r.returncode == 0, r.stderr


def test_debian_docker_rejects_ipv6_literals_but_takes_a_host_name(
    dockerd, image, registry, acme_jwt
):
    """The README's mesh section: Debian 12's docker (20.10) refuses a bracketed IPv6 address
    in an image reference, as its skopeo and podman do; a host name for the address is the
    way (here `localhost`, which every /etc/hosts has, for the gateway's 127.0.0.1)."""
    r = dockerd.docker("pull", "[::1]:5000/acme/x:v1")
    assert r.returncode != 0
    assert "invalid reference format" in r.stderr, r.stderr

    host = f"localhost:{registry.port}"
    r = dockerd.docker("login", host, "--username", "x", "--password-stdin", stdin=acme_jwt)
    assert r.returncode == 0, r.stdout + r.stderr
    ref = f"{host}/acme/by-name:v1"
    assert dockerd.docker("tag", image, ref).returncode == 0
    r = dockerd.docker("push", ref)
    assert r.returncode == 0, r.stdout + r.stderr
    r = dockerd.docker("manifest", "inspect", "--insecure", ref)
    assert r.returncode == 0, r.stdout + r.stderr


def test_a_shared_base_image_builds_into_another_tenants_image_with_layers_mounted(
    logged_in, image, registry, acme_jwt, globex_jwt, tmp_path
):
    """The policy's first story with Docker itself: acme shares `acme/base/**` read-only with
    globex (a policy edit on the running stack); globex builds `FROM acme/base/img` and pushes
    into its own namespace: Docker mounts the base layers from acme/base/img."""
    policy = registry.data_dir / "policy.toml"
    policy.write_text(
        '[[grant]]\nrepositories = ["acme/base/**"]\ntenants = ["globex"]\nactions = ["pull"]\n'
    )
    try:
        base = f"{registry.host}/acme/base/img:v1"
        assert logged_in.docker("tag", image, base).returncode == 0
        r = logged_in.docker("push", base)
        assert r.returncode == 0, r.stdout + r.stderr
        time.sleep(3)  # the policy edit is in force within ~2 s
        r = logged_in.docker(
            "login", registry.host, "--username", "x", "--password-stdin", stdin=globex_jwt
        )
        assert r.returncode == 0, r.stdout + r.stderr
        assert logged_in.docker("rmi", base).returncode == 0
        r = logged_in.docker("pull", base)  # globex pulls acme's base image
        assert r.returncode == 0, r.stdout + r.stderr
        (tmp_path / "Dockerfile").write_text(f"FROM {base}\nLABEL built.by=globex\n")
        app = f"{registry.host}/globex/app:v1"
        r = logged_in.docker("build", "-t", app, str(tmp_path))
        assert r.returncode == 0, r.stdout + r.stderr
        before = len(registry.access_log())
        r = logged_in.docker("push", app)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "Mounted from acme/base/img" in r.stdout, r.stdout
        pushed = [e for e in registry.access_log()[before:] if e["repository"] == "globex/app"]
        mounts = [e for e in pushed if e["method"] == "POST" and e["status"] == 201]
        assert mounts and all(e["tenant"] == "globex" for e in mounts)
        # Read-only: globex cannot push into acme/base.
        r = logged_in.docker("tag", app, f"{registry.host}/acme/base/img:globex")
        r = logged_in.docker("push", f"{registry.host}/acme/base/img:globex")
        assert r.returncode != 0 and "denied" in r.stderr.lower(), r.stdout + r.stderr
    finally:
        policy.unlink()
        r = logged_in.docker(
            "login", registry.host, "--username", "x", "--password-stdin", stdin=acme_jwt
        )
        assert r.returncode == 0
