"""The OCI distribution-spec conformance suite, against the backend and through the gateway.

    .venv/bin/python -m tests.support.conformance [--workdir DIR] [--json out.json]
    (`make conformance`)

The suite (distribution-spec v1.1.1's ginkgo `conformance/` package) is not part of this
repository. Its sources and a `build.sh` that builds the test binary with Debian's Go (GOPATH
mode, packages from apt, no module proxy) are looked up in `$CONFORMANCE_SRC`, else in
`../shared/conformance` next to the checkout. Without them this command says so and exits 2,
and `tests/e2e/test_conformance.py` skips with that reason.

One run starts the auth stand-in and two stacks (`tabbify-registry run`, Distribution backend):
one with auth, one anonymous. The suite then runs three times, with pull, push, content
discovery and content management enabled:

- `direct`: against the backend of the stack with auth (no gateway), namespace
  `acme/conformance-direct`;
- `gateway-anonymous`: through the anonymous stack's gateway, namespace `acme/conformance`;
- `gateway-token`: through the gateway with auth, as tenant `acme` (user `x`, a Tabbify JWT as
  the password), namespace `acme/conformance`, cross-mount namespace `acme/conformance-mount`.

Each run's `junit.xml` gives pass/fail/skip per spec; the suite's debug log (`OCI_DEBUG=1`, in
which the suite itself masks Authorization headers and tokens) gives the HTTP exchanges of
each spec, so a spec that passes direct but fails through the gateway is reported with the
request the suite sent and both answers.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

from tests.support.stack import ROOT, Stack
from tests.support.standins.auth import AuthStandin, tabbify_jwt

SRC_ENV = "CONFORMANCE_SRC"
DEFAULT_SRC = ROOT.parent / "shared" / "conformance"
CACHE = ROOT / "build" / "conformance"
SUITE_TIMEOUT = 600

MODES = ("direct", "gateway-anonymous", "gateway-token")
NAMESPACE = "acme/conformance"
CROSSMOUNT = "acme/conformance-mount"
CATEGORIES = ("Pull", "Push", "Content Discovery", "Content Management")
SUITE_PREFIX = "OCI Distribution Conformance Tests "
MAX_SHOWN = 3  # exchanges shown per spec and mode in a report
# Request/response headers worth showing in a report (the rest is noise or masked anyway).
SHOWN_HEADERS = {
    "accept",
    "content-type",
    "content-length",
    "content-range",
    "range",
    "location",
    "link",
    "docker-content-digest",
    "oci-subject",
    "oci-filters-applied",
    "www-authenticate",
}


class SuiteUnavailable(Exception):
    """The conformance sources are not there: the caller skips (tests) or exits 2."""


# --- building ---------------------------------------------------------------------------


def source_dir() -> Path:
    """The suite's sources: `$CONFORMANCE_SRC` (must be right when set), else the optional
    `../shared/conformance` (its absence is the one reason to skip)."""
    chosen = os.environ.get(SRC_ENV)
    src = Path(chosen) if chosen else DEFAULT_SRC
    if (src / "build.sh").is_file() and (src / "src").is_dir():
        return src
    if chosen:
        raise RuntimeError(f"{SRC_ENV}={chosen} does not hold the suite's build.sh and src/")
    raise SuiteUnavailable(
        f"the OCI conformance suite's sources are not in {DEFAULT_SRC} "
        f"(optional, outside this repository; or set {SRC_ENV})"
    )


def _tree_digest(src: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in src.rglob("*") if p.is_file() and p.name != "conformance.test"):
        h.update(str(path.relative_to(src)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def build(src: Path | None = None, cache: Path = CACHE) -> Path:
    """The test binary, built by the sources' own build.sh once per source tree (cached)."""
    src = src or source_dir()
    binary = cache / f"conformance-{_tree_digest(src)}.test"
    if binary.is_file():
        return binary
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="conformance-src-") as tmp:
        # A writable copy: the reference folder may be read-only, and build.sh copies it again.
        work = Path(tmp) / "conformance"
        shutil.copytree(src, work, symlinks=True, ignore=shutil.ignore_patterns("*.test"))
        for path in [work, *work.rglob("*")]:
            if not path.is_symlink():
                path.chmod(path.stat().st_mode | 0o200)
        partial = cache / f".{binary.name}.{os.getpid()}"
        result = subprocess.run(
            ["sh", str(work / "build.sh"), str(partial)],
            capture_output=True,
            text=True,
            timeout=900,
        )
        if result.returncode != 0 or not partial.is_file():
            raise RuntimeError(
                f"building the conformance suite failed ({result.returncode}):\n"
                + result.stdout[-3000:]
                + result.stderr[-3000:]
            )
        partial.replace(binary)
    return binary


# --- results ----------------------------------------------------------------------------


@dataclasses.dataclass
class Exchange:
    """One HTTP exchange as the suite's debug log shows it (secrets already masked)."""

    request_line: str
    request_headers: dict[str, str]
    request_body_bytes: int = 0
    status: str = ""
    response_headers: dict[str, str] = dataclasses.field(default_factory=dict)
    response_body: str = ""

    @property
    def is_token_exchange(self) -> bool:
        return " /auth/token" in self.request_line

    def describe(self, indent: str = "    ") -> str:
        def headers(h: dict[str, str]) -> str:
            shown = [f"{k}: {v}" for k, v in h.items() if k.lower() in SHOWN_HEADERS]
            return f" [{'; '.join(shown)}]" if shown else ""

        body = " ".join(self.response_body.split())
        if len(body) > 300:
            body = body[:300] + "…"
        has_length = any(k.lower() == "content-length" for k in self.request_headers)
        sent = f" (+ a body, ~{self.request_body_bytes} bytes as logged)"
        sent = sent if self.request_body_bytes and not has_length else ""
        return (
            f"{indent}> {self.request_line}{headers(self.request_headers)}{sent}\n"
            f"{indent}< {self.status}{headers(self.response_headers)}"
            + (f"\n{indent}  {body}" if body else "")
        )


@dataclasses.dataclass
class Spec:
    key: str  # "<file>:<line>" of the spec in the suite's sources: stable across runs
    category: str
    group: str
    title: str
    status: str  # passed | failed | skipped
    message: str = ""
    exchanges: list[Exchange] = dataclasses.field(default_factory=list)

    @property
    def row(self) -> str:
        return f"{self.category} / {self.group}"

    def last_exchanges(self) -> list[Exchange]:
        """The exchanges after the spec's last token exchange (what it was testing)."""
        tail: list[Exchange] = []
        for ex in reversed(self.exchanges):
            if ex.is_token_exchange:
                break
            tail.insert(0, ex)
        return tail


_ENTER = re.compile(r"> Enter \[(?P<node>[^]]+)\] (?P<leaf>.*) - (?P<path>\S+\.go):(?P<line>\d+) @")


def _split_name(name: str, leaf: str) -> tuple[str, str]:
    """(category, group) from a junit name "<suite> <category> <group> <leaf>"."""
    middle = name.removeprefix(SUITE_PREFIX)
    middle = middle[: -len(leaf)].strip() if leaf and middle.endswith(leaf) else middle
    for category in CATEGORIES:
        if middle == category or middle.startswith(category + " "):
            return category, middle[len(category) :].strip() or "-"
    first, _, rest = middle.partition(" ")
    return first, rest or "-"


def parse_junit(path: Path) -> dict[str, Spec]:
    """Specs by key, in run order. Names repeat in the suite; file:line does not."""
    specs: dict[str, Spec] = {}
    for case in ET.parse(path).iter("testcase"):
        name = case.get("name", "")
        err = case.findtext("system-err") or ""
        match = _ENTER.search(err)
        if match and match["node"] != "It":
            continue  # the suite's own report nodes (ReportAfterSuite), not specs
        leaf = match["leaf"] if match else name
        key = f"{Path(match['path']).name}:{match['line']}" if match else name
        while key in specs:  # should not happen; never lose a spec if it does
            key += "'"
        status = case.get("status", "")
        failure = case.find("failure")
        if failure is None:
            failure = case.find("error")
        if failure is not None and status not in ("failed", "panicked"):
            status = "failed"
        if status == "panicked":
            status = "failed"
        if status not in ("passed", "failed"):
            status = "skipped"
        message = ""
        if failure is not None:
            message = (failure.get("message") or failure.text or "").strip()
        category, group = _split_name(name, leaf)
        specs[key] = Spec(key, category, group, leaf, status, message)
    return specs


GINKGO_RULE = "-" * 30  # ginkgo's line between specs (the debug log's rules are longer)
_LOCATION = re.compile(r"^(?P<path>/\S+\.go):(?P<line>\d+)$")


def parse_debug_log(text: str) -> dict[str, list[Exchange]]:
    """Exchanges by spec key from the suite's `-ginkgo.v` output with OCI_DEBUG=1.

    Verbose ginkgo prints each spec's full text and source location before running it; the
    debug logger then prints every exchange as a REQUEST/RESPONSE block while it runs.
    """
    out: dict[str, list[Exchange]] = {}
    lines = text.splitlines()
    key: str | None = None
    current: Exchange | None = None
    section = ""  # request | request-headers | request-body | response | response-...
    body: list[str] = []

    def finish_body() -> None:
        assert current is not None
        raw = "\n".join(body).strip()
        if section == "request-body":
            if raw != "***** NO CONTENT *****":
                current.request_body_bytes = len(raw.encode())
        else:
            # Bodies that are not JSON: "*** Error: Unable to format … Log Body as-is:\n<raw>"
            current.response_body = raw.partition("Log Body as-is:")[2].strip() or (
                "" if raw.startswith("*** Error") else raw
            )

    for i, line in enumerate(lines):
        loc = _LOCATION.match(line)
        if loc and i >= 2 and lines[i - 2] == GINKGO_RULE:
            key = f"{Path(loc['path']).name}:{loc['line']}"
            out.setdefault(key, [])
            current, section = None, ""
            continue
        if line == "~~~ REQUEST ~~~" and key is not None:
            method_target = " ".join(lines[i + 1].split()[:2]) if i + 1 < len(lines) else ""
            current = Exchange(method_target, {})
            out[key].append(current)
            section, body = "request", []
            continue
        if current is None:
            continue
        if section == "request-body" and line.startswith("-" * 40):
            finish_body()
            section = "response"
        elif section == "response" and line.startswith("STATUS"):
            current.status = line.partition(":")[2].strip()
        elif section in ("request", "response") and line.startswith("HEADERS"):
            section += "-headers"
        elif section.endswith("-headers") and line.startswith("BODY"):
            section = section.removesuffix("-headers") + "-body"
            body = []
        elif section.endswith("-headers") and line.startswith("\t"):
            name, _, value = line.strip().partition(": ")
            target = current.request_headers if section == "request-headers" else None
            (target if target is not None else current.response_headers)[name] = value
        elif section == "response-body" and line.startswith("=" * 40):
            finish_body()
            current, section = None, ""
        elif section.endswith("-body"):
            body.append(line)
    return out


@dataclasses.dataclass
class Run:
    mode: str
    root_url: str
    namespace: str
    returncode: int
    specs: dict[str, Spec]
    log: Path

    def counts(self, row: str | None = None) -> dict[str, int]:
        c = {"passed": 0, "failed": 0, "skipped": 0}
        for spec in self.specs.values():
            if row is None or spec.row == row:
                c[spec.status] += 1
        return c


def run_suite(
    binary: Path,
    mode: str,
    root_url: str,
    report_dir: Path,
    namespace: str,
    crossmount: str,
    username: str = "",
    password: str = "",
) -> Run:
    report_dir.mkdir(parents=True, exist_ok=True)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(report_dir),
        "OCI_ROOT_URL": root_url,
        "OCI_NAMESPACE": namespace,
        "OCI_CROSSMOUNT_NAMESPACE": crossmount,
        "OCI_TEST_PULL": "1",
        "OCI_TEST_PUSH": "1",
        "OCI_TEST_CONTENT_DISCOVERY": "1",
        "OCI_TEST_CONTENT_MANAGEMENT": "1",
        "OCI_DEBUG": "1",
        "OCI_REPORT_DIR": str(report_dir),
    }
    if username:
        env |= {"OCI_USERNAME": username, "OCI_PASSWORD": password}
    log = report_dir / "suite.log"
    with open(log, "wb") as out:
        proc = subprocess.run(
            [str(binary), "-ginkgo.v", "-ginkgo.no-color"],
            env=env,
            cwd=report_dir,
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=SUITE_TIMEOUT,
        )
    return load_run(mode, report_dir, root_url, namespace, proc.returncode)


def load_run(
    mode: str, report_dir: Path, root_url: str = "", namespace: str = "", returncode: int = 0
) -> Run:
    """A run's results from its report directory (junit.xml and the suite's log)."""
    junit, log = report_dir / "junit.xml", report_dir / "suite.log"
    if not junit.is_file():
        tail = log.read_bytes()[-3000:].decode(errors="replace") if log.is_file() else ""
        raise RuntimeError(f"{mode}: the suite wrote no junit.xml (exit {returncode}):\n{tail}")
    specs = parse_junit(junit)
    for key, exchanges in parse_debug_log(log.read_bytes().decode(errors="replace")).items():
        if key in specs:
            specs[key].exchanges = exchanges
    return Run(mode, root_url, namespace, returncode, specs, log)


def run_all(binary: Path, workdir: Path) -> dict[str, Run]:
    """The three runs, each on a stack started here and stopped before returning."""
    auth = AuthStandin().start()
    stacks: list[Stack] = []
    try:
        with_auth = Stack(workdir / "stack-auth", auth.url)
        stacks.append(with_auth.start())
        anonymous = Stack(workdir / "stack-anonymous", None)
        stacks.append(anonymous.start())
        jwt = tabbify_jwt({"sub": "conformance", "network": "acme"})
        runs = {
            "direct": run_suite(
                binary,
                "direct",
                with_auth.backend_url,
                workdir / "direct",
                f"{NAMESPACE}-direct",
                f"{CROSSMOUNT}-direct",
                *(with_auth.backend_auth or ("", "")),  # the backend takes the run's alone
            ),
            "gateway-anonymous": run_suite(
                binary,
                "gateway-anonymous",
                anonymous.url,
                workdir / "gateway-anonymous",
                NAMESPACE,
                CROSSMOUNT,
            ),
            "gateway-token": run_suite(
                binary,
                "gateway-token",
                with_auth.url,
                workdir / "gateway-token",
                NAMESPACE,
                CROSSMOUNT,
                "x",
                jwt,
            ),
        }
    finally:
        for stack in stacks:
            stack.stop()
        auth.stop()
    return runs


# --- reporting ----------------------------------------------------------------------------


def rows(runs: dict[str, Run]) -> list[str]:
    seen: dict[str, None] = {}
    for run in runs.values():
        for spec in run.specs.values():
            seen.setdefault(spec.row)
    return list(seen)


def _cell(c: dict[str, int]) -> str:
    return f"{c['passed']} / {c['failed']} / {c['skipped']}"


def table(runs: dict[str, Run]) -> str:
    """Markdown: one row per spec group, pass / fail / skip per mode."""
    modes = [m for m in MODES if m in runs]
    lines = [
        "| spec group | " + " | ".join(f"{m} (pass / fail / skip)" for m in modes) + " |",
        "|---|" + "---|" * len(modes),
    ]
    for row in rows(runs):
        lines.append(f"| {row} | " + " | ".join(_cell(runs[m].counts(row)) for m in modes) + " |")
    lines.append(
        "| **all** | " + " | ".join(f"**{_cell(runs[m].counts())}**" for m in modes) + " |"
    )
    return "\n".join(lines)


@dataclasses.dataclass
class Regression:
    mode: str
    direct: Spec
    gateway: Spec


def regressions(runs: dict[str, Run]) -> list[Regression]:
    """Specs that pass against the backend but not through the gateway."""
    direct = runs["direct"].specs
    out = []
    for mode in MODES[1:]:
        if mode not in runs:
            continue
        for key, spec in runs[mode].specs.items():
            if key in direct and direct[key].status == "passed" and spec.status != "passed":
                out.append(Regression(mode, direct[key], spec))
    return out


def _redact(text: str) -> str:
    return re.sub(r"eyJ[\w-]+\.[\w-]+\.[\w-]+", "<jwt>", text)


def _normal(text: str) -> str:
    """For comparing answers across runs: digests, upload ids and names vary per run."""
    text = re.sub(r"sha256:[0-9a-f]{64}", "sha256:…", text)
    text = re.sub(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", "<uuid>", text)
    text = re.sub(r"\d{4}-\d\d-\d\dT[\d:.]+Z", "<time>", text)
    return re.sub(rf"{re.escape(NAMESPACE)}(-direct)?", "<ns>", " ".join(text.split()))


def _outcome(spec: Spec) -> str:
    exchanges = spec.last_exchanges()
    answers = [f"{ex.request_line} -> {ex.status} {ex.response_body}" for ex in exchanges]
    return _normal(spec.status + " " + spec.message + " " + " | ".join(answers))


def describe_spec(key: str, runs: dict[str, Run]) -> str:
    """A spec's outcome in every mode, with the exchanges it was testing (after any token
    exchange); a mode whose outcome repeats the previous one's says so instead."""
    first = next(run.specs[key] for run in runs.values() if key in run.specs)
    parts = [f"- {first.row} :: {first.title} ({key})"]
    shown: dict[str, str] = {}
    for mode, run in runs.items():
        spec = run.specs.get(key)
        if spec is None:
            parts.append(f"    {mode}: not run")
            continue
        outcome = _outcome(spec)
        same = next((m for m, o in shown.items() if o == outcome), None)
        shown[mode] = outcome
        head = spec.status.upper()
        if spec.message:
            head += ": " + " ".join(spec.message.split())
        if same:
            parts.append(f"    {mode}: {head} (same exchange as {same})")
            continue
        parts.append(f"    {mode}: {head}")
        exchanges = spec.last_exchanges()
        if len(exchanges) > MAX_SHOWN:
            parts.append(f"      ({len(exchanges) - MAX_SHOWN} earlier exchange(s) not shown)")
        parts.extend(ex.describe("      ") for ex in exchanges[-MAX_SHOWN:])
    return _redact("\n".join(parts))


def report(runs: dict[str, Run]) -> str:
    out = [table(runs), ""]
    found = regressions(runs)
    keys = list(dict.fromkeys(r.gateway.key for r in found))
    if keys:
        out.append(
            f"{len(keys)} spec(s) pass against the backend but fail through the gateway "
            f"({len(found)} gateway run(s)):"
        )
        out.extend(describe_spec(k, runs) for k in keys)
    else:
        out.append("Every spec that passes against the backend passes through the gateway.")
    both = [
        k
        for k, s in runs["direct"].specs.items()
        if s.status == "failed"
        and any(
            k in r.specs and r.specs[k].status == "failed" for m, r in runs.items() if m != "direct"
        )
    ]
    if both:
        out += ["", f"{len(both)} spec(s) fail against the backend and through the gateway:"]
        out.extend(describe_spec(k, runs) for k in both)
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.support.conformance", description=__doc__
    )
    parser.add_argument("--workdir", type=Path, help="keep stacks, logs and reports here")
    parser.add_argument("--json", type=Path, help="also write every run's specs as JSON")
    parser.add_argument(
        "--report-only", type=Path, metavar="DIR", help="report on a kept --workdir, run nothing"
    )
    args = parser.parse_args(argv)
    if args.report_only:
        runs = {m: load_run(m, args.report_only / m) for m in MODES}
        print(report(runs))
        return 1 if regressions(runs) else 0
    try:
        binary = build()
    except SuiteUnavailable as e:
        print(f"conformance: {e}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="conformance-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        runs = run_all(binary, workdir)
        print(report(runs))
        if args.json:
            data = {
                mode: {k: dataclasses.asdict(s) for k, s in run.specs.items()}
                for mode, run in runs.items()
            }
            args.json.write_text(_redact(json.dumps(data, indent=1)))
        if args.workdir:
            print(f"\nlogs and reports: {workdir}", file=sys.stderr)
    return 1 if regressions(runs) else 0


if __name__ == "__main__":
    sys.exit(main())
