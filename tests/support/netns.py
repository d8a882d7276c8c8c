"""An isolated underlay for real-WireGuard tests: network namespaces on a Linux bridge.

    with Underlay() as net:
        coordinator = CoordinatorStandin(net.gateway).start()
        a, b = net.add_host("a"), net.add_host("b")
        wa, wb = WgClient(a, coordinator), WgClient(b, coordinator)
        wa.sync()
        assert wb.ping6(wa.ula)

`Underlay` owns a bridge `tbfbr<k>` with 10.77.<k>.1/24 in the root namespace (where the
coordinator stand-in listens) and one namespace `tbf-<name>-<k>` per host, cabled by a veth
pair (`eth0` inside, 10.77.<k>.<n>/24, default route via the bridge). `k` is taken under an
flock on /run/tbf-underlay/<k>.lock, so concurrent test runs never share a `k`; whatever a
crashed run left (any slot whose lock nobody holds) is swept first. Leaving the context stops
every process in those namespaces (SIGTERM, then SIGKILL) and deletes namespaces, veths, the
bridge, /etc/netns/<ns> and the WireGuard UAPI sockets of the interfaces made there.

Inside a namespace: IPv6 is enabled; there is no DNS (/etc/netns/<ns>/resolv.conf points at
127.0.0.1, so lookups fail at once instead of timing out - http.server's getfqdn() on bind
would otherwise hang 10 s); `Host.hosts_file()` gives names to ULAs for skopeo.

`WgClient` is a mesh *client* node built with the real tools (wg, wireguard-go, ip), not with
the product code. wireguard-go keeps its UAPI socket in /var/run/wireguard/<ifname>.sock, which
is shared by all namespaces: two interfaces with the same name in two namespaces cannot both
run, hence the per-underlay, per-host interface names.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

MESH_PREFIX = "fd5a:1f02::/32"
WG_PORT = 51820
LOCK_DIR = Path("/run/tbf-underlay")
WG_SOCKET_DIR = Path("/var/run/wireguard")
NETNS_ETC = Path("/etc/netns")
K_RANGE = range(20, 250)
CMD_TIMEOUT = 30.0

Cmd = str | Sequence[str]


def sh(cmd: Cmd, *, check: bool = True, **kw: Any) -> subprocess.CompletedProcess[str]:
    """subprocess.run with text output captured and a timeout, raising with stderr on failure."""
    argv = shlex.split(cmd) if isinstance(cmd, str) else list(cmd)
    kw.setdefault("timeout", CMD_TIMEOUT)
    kw.setdefault("text", True)
    if "stdout" not in kw and "stderr" not in kw:
        kw.setdefault("capture_output", True)
    out = subprocess.run(argv, check=False, **kw)
    if check and out.returncode != 0:
        raise RuntimeError(
            f"{shlex.join(argv)} exited {out.returncode}: {(out.stderr or '').strip()}"
        )
    return out


def poll(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02) -> Any:
    """The first truthy value of `predicate()`, polled until `timeout` (then TimeoutError)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {predicate}")
        time.sleep(interval)


def netns_usable() -> str | None:
    """Why real-namespace tests cannot run here, or None when they can."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, bridges, TUN)"
    if not os.path.exists("/dev/net/tun"):
        return "needs /dev/net/tun"
    return None


def _links() -> list[str]:
    out = sh(["ip", "-o", "link", "show"], check=False).stdout
    return [m.group(1) for m in re.finditer(r"^\d+: ([^:@]+)[@:]", out, re.M)]


def _netns_list() -> list[str]:
    out = sh(["ip", "netns", "list"], check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _ns_pids(ns: str) -> list[int]:
    out = sh(["ip", "netns", "pids", ns], check=False).stdout
    return [int(p) for p in out.split() if p.isdigit()]


def _kill_ns_processes(ns: str, grace: float = 1.0, timeout: float = 5.0) -> None:
    """SIGTERM everything in the namespace (wireguard-go then removes its UAPI socket), and
    SIGKILL whatever is still there after `grace` seconds."""
    start = time.monotonic()
    sig = signal.SIGTERM
    while pids := _ns_pids(ns):
        if sig == signal.SIGTERM and time.monotonic() - start > grace:
            sig = signal.SIGKILL
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        if time.monotonic() - start > timeout:
            raise RuntimeError(f"processes {pids} in {ns} survive SIGKILL")
        time.sleep(0.02)


def _delete_ns(ns: str) -> None:
    _kill_ns_processes(ns, grace=0)
    if ns in _netns_list():
        sh(["ip", "netns", "del", ns])
    shutil.rmtree(NETNS_ETC / ns, ignore_errors=True)


def _addresses_in_use() -> set[str]:
    out = sh(["ip", "-o", "-4", "addr", "show"], check=False).stdout
    return {
        str(ipaddress.IPv4Interface(m.group(2)).network)
        for m in re.finditer(r"^\d+: (\S+)\s+inet (\S+)", out, re.M)
        if not m.group(1).startswith("tbfbr")
    }


def _try_lock(k: int) -> int | None:
    """The fd holding slot k's lock, or None when another live process holds it."""
    fd = os.open(LOCK_DIR / f"{k}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _slots_present() -> set[int]:
    """Every k that has a namespace, bridge or veth of ours on this machine."""
    found = {int(m.group(1)) for ns in _netns_list() if (m := re.fullmatch(r"tbf-.+-(\d+)", ns))}
    for link in _links():
        if m := re.fullmatch(r"tbfbr(\d+)|tbfv(\d+)-\d+", link):
            found.add(int(m.group(1) or m.group(2)))
    return found


def _clean_slot(k: int) -> None:
    """Remove everything named after slot k (the caller holds its lock)."""
    suffix = f"-{k}"
    for ns in _netns_list():
        if ns.startswith("tbf-") and ns.endswith(suffix):
            _delete_ns(ns)
    if NETNS_ETC.is_dir():
        for d in NETNS_ETC.glob(f"tbf-*{suffix}"):
            shutil.rmtree(d, ignore_errors=True)
        with contextlib.suppress(OSError):
            NETNS_ETC.rmdir()  # only when empty
    if WG_SOCKET_DIR.is_dir():
        for sock in WG_SOCKET_DIR.glob(f"wgc{k}n*.sock"):
            sock.unlink(missing_ok=True)
    for link in _links():
        if re.fullmatch(rf"tbfbr{k}|tbfv{k}-\d+", link):
            sh(["ip", "link", "del", link], check=False)


class Host:
    """One namespace on the underlay: `ns`, `ip` (underlay address), run/popen inside it."""

    def __init__(self, underlay: Underlay, name: str, ns: str, ip: str, index: int) -> None:
        self.underlay = underlay
        self.name = name
        self.ns = ns
        self.ip = ip
        self.index = index
        self.procs: list[subprocess.Popen[Any]] = []
        # WireGuard interfaces made in this namespace: their UAPI sockets are removed on close
        # (they live in the shared /var/run/wireguard and outlast a SIGKILLed wireguard-go).
        self.wg_ifnames: list[str] = []

    def argv(self, cmd: Cmd) -> list[str]:
        return [
            "ip",
            "netns",
            "exec",
            self.ns,
            *(shlex.split(cmd) if isinstance(cmd, str) else cmd),
        ]

    def run(self, cmd: Cmd, **kw: Any) -> subprocess.CompletedProcess[str]:
        """subprocess.run inside the namespace; text, captured, 30 s timeout unless told.

        `check=True` raises RuntimeError (with stderr) on a non-zero exit; default False.
        """
        kw.setdefault("check", False)
        return sh(self.argv(cmd), **kw)

    def popen(self, cmd: Cmd, **kw: Any) -> subprocess.Popen[Any]:
        """subprocess.Popen inside the namespace (own session); killed when the underlay closes."""
        kw.setdefault("start_new_session", True)
        kw.setdefault("stdin", subprocess.DEVNULL)
        proc = subprocess.Popen(self.argv(cmd), **kw)
        self.procs.append(proc)
        return proc

    def hosts_file(self, mapping: Mapping[str, str]) -> Path:
        """Write /etc/netns/<ns>/hosts ({name: address}); `ip netns exec` binds it on /etc/hosts.

        Only processes started after this call see it.
        """
        directory = NETNS_ETC / self.ns
        directory.mkdir(parents=True, exist_ok=True)
        lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
        lines += [f"{addr}\t{name}" for name, addr in mapping.items()]
        path = directory / "hosts"
        path.write_text("\n".join(lines) + "\n")
        return path

    def listeners(self, addr: str, port: int) -> int:
        """How many TCP sockets listen on addr:port inside the namespace (one per worker)."""
        out = self.run(["ss", "-Hltn"], timeout=5).stdout
        want = f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"
        return sum(want in line.split() for line in out.splitlines())

    def wait_port(self, addr: str, port: int, timeout: float = 10.0) -> None:
        """Wait until something listens on addr:port (TCP) inside the namespace."""
        poll(lambda: self.listeners(addr, port), timeout, 0.05)

    def wait_link(self, ifname: str, timeout: float = 10.0) -> None:
        """Wait until the interface exists inside the namespace."""
        poll(lambda: self.run(["ip", "link", "show", "dev", ifname]).returncode == 0, timeout)

    def __repr__(self) -> str:
        return f"Host({self.ns!r}, ip={self.ip!r})"


class Underlay:
    """A bridge and namespaces for one test (module); a context manager that always cleans up."""

    def __init__(self) -> None:
        self.k: int | None = None
        self.hosts: list[Host] = []
        self._lock_fd: int | None = None

    @property
    def bridge(self) -> str:
        return f"tbfbr{self.k}"

    @property
    def gateway(self) -> str:
        """The bridge's address in the root namespace: where root-namespace servers listen."""
        return f"10.77.{self.k}.1"

    @property
    def subnet(self) -> str:
        return f"10.77.{self.k}.0/24"

    def __enter__(self) -> Underlay:
        try:
            self._claim()
            # A fixed MAC: otherwise the bridge takes the lowest MAC of its ports and changes it
            # when a host is added, leaving stale ARP entries for the gateway in the namespaces.
            mac = f"02:74:62:66:00:{self.k:02x}"
            sh(["ip", "link", "add", self.bridge, "address", mac, "type", "bridge"])
            sh(["ip", "addr", "add", f"{self.gateway}/24", "dev", self.bridge])
            sh(["ip", "link", "set", self.bridge, "up"])
        except BaseException:
            with contextlib.suppress(Exception):  # the original error is the one to see
                self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _claim(self) -> None:
        """Sweep the leftovers of dead runs, then pick a k whose lock is ours and whose subnet
        nothing else uses."""
        LOCK_DIR.mkdir(parents=True, exist_ok=True)
        for k in _slots_present():
            fd = _try_lock(k)
            if fd is not None:  # nobody holds it: what is there belongs to a dead run
                try:
                    _clean_slot(k)
                finally:
                    os.close(fd)
        in_use = _addresses_in_use()
        start = os.getpid() % len(K_RANGE)
        for i in range(len(K_RANGE)):
            k = K_RANGE[(start + i) % len(K_RANGE)]
            if f"10.77.{k}.0/24" in in_use:
                continue
            fd = _try_lock(k)
            if fd is None:
                continue
            self.k, self._lock_fd = k, fd
            _clean_slot(k)
            return
        raise RuntimeError("no free underlay slot (10.77.20-249.0/24)")

    def add_host(self, name: str) -> Host:
        """A namespace `tbf-<name>-<k>` with eth0 = 10.77.<k>.<n>/24, lo up, default route."""
        if self.k is None:
            raise RuntimeError("Underlay is not entered")
        if not re.fullmatch(r"[a-z0-9]{1,20}", name) or any(h.name == name for h in self.hosts):
            raise ValueError(f"bad or duplicate host name {name!r}")
        n = len(self.hosts) + 2
        if n > 254:
            raise RuntimeError("underlay is full")
        ns, ip, veth = f"tbf-{name}-{self.k}", f"10.77.{self.k}.{n}", f"tbfv{self.k}-{n}"
        host = Host(self, name, ns, ip, n)
        self.hosts.append(host)  # registered first: close() cleans up a half-built host
        sh(["ip", "netns", "add", ns])
        sh(["ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns])
        sh(["ip", "link", "set", veth, "master", self.bridge, "up"])
        ip_ns = ["ip", "-n", ns]
        sh([*ip_ns, "link", "set", "lo", "up"])
        sh([*ip_ns, "addr", "add", f"{ip}/24", "dev", "eth0"])
        sh([*ip_ns, "link", "set", "eth0", "up"])
        sh([*ip_ns, "route", "add", "default", "via", self.gateway])
        # No DNS server is reachable from the underlay: make lookups fail at once instead of
        # timing out (http.server's getfqdn() on bind, clients resolving unknown names).
        etc = NETNS_ETC / ns
        etc.mkdir(parents=True, exist_ok=True)
        (etc / "resolv.conf").write_text("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
        # Namespaces inherit disable_ipv6 from the defaults; the mesh is IPv6.
        enable = "for c in all default; do echo 0 > /proc/sys/net/ipv6/conf/$c/disable_ipv6; done"
        host.run(["sh", "-c", enable], check=True)
        return host

    def close(self) -> None:
        """Stop, delete, release; every step runs even when an earlier one fails.

        Processes get SIGTERM first (wireguard-go then removes its UAPI socket; supervisord
        stops its children), SIGKILL after a second.
        """
        errors: list[str] = []
        for host in self.hosts:
            for pid in _ns_pids(host.ns):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
        with contextlib.suppress(TimeoutError):
            poll(lambda: not any(_ns_pids(h.ns) for h in self.hosts), 1.0, 0.02)
        for host in self.hosts:
            try:
                _delete_ns(host.ns)
            except Exception as e:
                errors.append(f"{host.ns}: {e}")
            for proc in host.procs:
                if proc.poll() is None:  # not in the namespace any more: its own business
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(proc.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(5)
            for name in host.wg_ifnames:
                Path(WG_SOCKET_DIR, f"{name}.sock").unlink(missing_ok=True)
        if self.k is not None:
            try:
                _clean_slot(self.k)
            except Exception as e:
                errors.append(f"leftovers: {e}")
        self.hosts = []
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        if errors:
            raise RuntimeError("underlay cleanup: " + "; ".join(errors))


class Coordinator(Protocol):
    def add_node(
        self, public_key: str, endpoint: str, ula: str | None = None
    ) -> tuple[str, str]: ...

    def peers_for(self, node_id: str) -> list[dict[str, Any]]: ...


_PING = r"""
import os, select, socket, struct, sys, time
addr, count, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
ident = os.getpid() & 0xFFFF
for seq in range(count):
    s.sendto(struct.pack("!BBHHH", 128, 0, 0, ident, seq) + b"tbf-ping", (addr, 0))
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        if not select.select([s], [], [], left)[0]:
            break
        data = s.recv(2048)
        if len(data) >= 8:
            kind, _code, _sum, got_ident, got_seq = struct.unpack("!BBHHH", data[:8])
            if kind == 129 and got_ident == ident and got_seq == seq:
                sys.exit(0)
sys.exit(1)
"""


class WgClient:
    """A mesh client node inside `host`, built with wg/wireguard-go/ip (not the product code).

    Registers its public key with `coordinator.add_node(pubkey, "<host ip>:51820")`, runs
    `wireguard-go <ifname>` in the namespace, and configures key, port 51820, `<ula>/128`
    (nodad), the route to the mesh prefix and the coordinator's peer set for it.
    """

    def __init__(self, host: Host, coordinator: Coordinator, ifname: str | None = None) -> None:
        self.host = host
        self.coordinator = coordinator
        # Unique across namespaces: wireguard-go's UAPI socket path is global.
        self.ifname = ifname or f"wgc{host.underlay.k}n{host.index}"
        if len(self.ifname) > 15:
            raise ValueError(f"interface name {self.ifname!r} longer than 15 characters")
        self.private_key = sh(["wg", "genkey"]).stdout.strip()
        self.public_key = sh(["wg", "pubkey"], input=self.private_key + "\n").stdout.strip()
        self.node_id, self.ula = coordinator.add_node(self.public_key, f"{host.ip}:{WG_PORT}")
        self._up()
        self.sync()

    def _up(self) -> None:
        h, dev = self.host, self.ifname
        env = {**os.environ, "WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD": "1"}
        h.wg_ifnames.append(dev)
        # Foreground (-f), as our child: we see it die and reap it (a daemonized wireguard-go is
        # re-parented to PID 1, which in some sandboxes leaves it a zombie for a while).
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 (lives as long as the daemon)
        self.proc = h.popen(
            ["wireguard-go", "-f", dev], env=env, stdout=self._log, stderr=subprocess.STDOUT
        )
        sock = WG_SOCKET_DIR / f"{dev}.sock"

        def ready() -> bool:
            if self.proc.poll() is not None:
                self._log.seek(0)
                log = self._log.read().decode(errors="replace").strip()
                raise RuntimeError(f"wireguard-go {dev} exited {self.proc.returncode}: {log}")
            return sock.exists() and h.run(["ip", "link", "show", dev]).returncode == 0

        poll(ready, 10)
        h.run(
            ["wg", "set", dev, "private-key", "/dev/stdin", "listen-port", str(WG_PORT)],
            input=self.private_key + "\n",
            check=True,
        )
        h.run(["ip", "-6", "addr", "add", f"{self.ula}/128", "dev", dev, "nodad"], check=True)
        h.run(["ip", "link", "set", dev, "up"], check=True)
        h.run(["ip", "-6", "route", "add", MESH_PREFIX, "dev", dev], check=True)

    def peers(self) -> set[str]:
        """Public keys of the peers configured on the interface now."""
        out = self.host.run(["wg", "show", self.ifname, "peers"], check=True).stdout
        return set(out.split())

    def sync(self) -> None:
        """Apply the coordinator's current peer set in one `wg set`, without touching live peers'
        sessions (existing peers are updated in place, gone ones removed)."""
        wanted = self.coordinator.peers_for(self.node_id)
        args: list[str] = []
        for p in wanted:
            args += [
                "peer",
                p["public_key"],
                "endpoint",
                p["endpoint"],
                "persistent-keepalive",
                str(p.get("persistent_keepalive", 0)),
                "allowed-ips",
                ",".join(p["allowed_ips"]),
            ]
        for gone in self.peers() - {p["public_key"] for p in wanted}:
            args += ["peer", gone, "remove"]
        if args:
            self.host.run(["wg", "set", self.ifname, *args], check=True)

    def ping6(self, addr: str, count: int = 3, timeout: float = 2.0) -> bool:
        """ICMPv6 echo from this namespace: True as soon as one of `count` requests is answered
        (each waits up to `timeout` s). Python raw socket: no dependency on iputils-ping."""
        out = self.host.run(
            [sys.executable, "-c", _PING, addr, str(count), str(timeout)],
            timeout=count * timeout + 10,
        )
        return out.returncode == 0

    def __repr__(self) -> str:
        return f"WgClient({self.host.ns!r}, {self.ifname!r}, ula={self.ula!r})"
