"""The conformance harness's parsing (tests/support/conformance.py), on the suite's real
output shapes: a spec miscounted or matched to the wrong exchanges would make its verdict
worthless."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support import conformance

SRC = "/tmp/build/src/github.com/opencontainers/distribution-spec/conformance"

PREFIX = "OCI Distribution Conformance Tests"


def case(name: str, status: str, location: str, node: str = "It", inner: str = "") -> str:
    leaf = name.rsplit(" :: ", 1)[-1]
    full = f"{PREFIX} {name.replace(' :: ', ' ')}" if node == "It" else leaf
    enter = f"&gt; Enter [{node}] {leaf} - {SRC}/{location} @ x"
    return (
        f'<testcase name="{full}" status="{status}">{inner}'
        f"<system-err>{enter}</system-err></testcase>"
    )


FAILURE = (
    '<failure message="Expected&#xA;    &lt;int&gt;: 403&#xA;to equal&#xA;    &lt;int&gt;: 404"'
    ' type="failed">x</failure>'
)
JUNIT = (
    '<?xml version="1.0" encoding="UTF-8"?><testsuites><testsuite name="conformance tests">'
    + case("Pull Setup :: Populate registry with test blob", "passed", "01_pull_test.go:18")
    + case("Pull Setup :: Populate registry with test blob", "passed", "01_pull_test.go:36")
    + case(
        "Pull Pull manifests :: GET nonexistent manifest should return 404",
        "failed",
        "01_pull_test.go:198",
        inner=FAILURE,
    )
    + case(
        "Content Discovery Setup :: Get tag name",
        "skipped",
        "03_discovery_test.go:9",
        inner='<skipped message="skipped"></skipped>',
    )
    + case("html custom reporter", "passed", "00_suite_test.go:24", node="ReportAfterSuite")
    + "</testsuite></testsuites>"
)

RULE = "-" * 78
DEBUG = "DEBUG "  # as the suite prints it, with a trailing space
IT = f"{PREFIX} Pull Pull manifests [It]"
LOG = f"""Will run 3 of 3 specs
------------------------------
OCI Distribution Conformance Tests Pull Pull manifests GET nonexistent manifest should return 404
{SRC}/01_pull_test.go:198
{DEBUG}
==============================================================================
~~~ REQUEST ~~~
GET  /auth/token?service=tabbify-registry  HTTP/1.1
HOST   : 127.0.0.1:1
HEADERS:
\tAuthorization: Basic *****
BODY   :
***** NO CONTENT *****
{RULE}
~~~ RESPONSE ~~~
STATUS       : 200 OK
HEADERS      :
\tContent-Type: application/json
BODY         :
{{"token": "*****"}}
==============================================================================

{DEBUG}
==============================================================================
~~~ REQUEST ~~~
HEAD  /v2/acme/conformance/manifests/.INVALID_MANIFEST_NAME  HTTP/1.1
HOST   : 127.0.0.1:1
HEADERS:
\tAuthorization: Bearer *****
\tAccept: application/vnd.oci.image.manifest.v1+json
BODY   :
***** NO CONTENT *****
{RULE}
~~~ RESPONSE ~~~
STATUS       : 403 Forbidden
PROTO        : HTTP/1.1
HEADERS      :
\tContent-Length: 0
BODY         :
*** Error: Unable to format response body - "unexpected end of JSON input" ***

Log Body as-is:

==============================================================================

• [FAILED] [0.007 seconds]
{IT} GET nonexistent manifest should return 404
{SRC}/01_pull_test.go:198
------------------------------
OCI Distribution Conformance Tests Pull Setup Populate registry with test blob
{SRC}/01_pull_test.go:36
{DEBUG}
==============================================================================
~~~ REQUEST ~~~
PUT  /v2/acme/conformance/blobs/uploads/u?digest=sha256%3Aab  HTTP/1.1
HEADERS:
\tContent-Type: application/octet-stream
BODY   :
binary \x8b stuff
{RULE}
~~~ RESPONSE ~~~
STATUS       : 201 Created
HEADERS      :
\tLocation: /v2/acme/conformance/blobs/sha256:ab
BODY         :
***** NO CONTENT *****
==============================================================================
"""


@pytest.fixture
def run(tmp_path: Path) -> conformance.Run:
    (tmp_path / "junit.xml").write_text(JUNIT)
    (tmp_path / "suite.log").write_text(LOG)
    return conformance.load_run("gateway-token", tmp_path)


def test_specs_are_keyed_by_source_location_and_report_nodes_dropped(run):
    assert list(run.specs) == [
        "01_pull_test.go:18",
        "01_pull_test.go:36",  # same title as :18, another spec
        "01_pull_test.go:198",
        "03_discovery_test.go:9",
    ]
    spec = run.specs["01_pull_test.go:198"]
    assert (spec.category, spec.group, spec.title) == (
        "Pull",
        "Pull manifests",
        "GET nonexistent manifest should return 404",
    )
    assert spec.status == "failed" and "403" in spec.message
    assert run.specs["03_discovery_test.go:9"].category == "Content Discovery"
    assert run.counts() == {"passed": 2, "failed": 1, "skipped": 1}
    assert run.counts("Pull / Setup") == {"passed": 2, "failed": 0, "skipped": 0}


def test_exchanges_belong_to_the_spec_that_made_them(run):
    failed = run.specs["01_pull_test.go:198"]
    assert [e.request_line for e in failed.exchanges] == [
        "GET /auth/token?service=tabbify-registry",
        "HEAD /v2/acme/conformance/manifests/.INVALID_MANIFEST_NAME",
    ]
    (tested,) = failed.last_exchanges()  # after the token exchange
    assert tested.status == "403 Forbidden"
    assert tested.response_body == ""
    assert tested.request_headers["Accept"] == "application/vnd.oci.image.manifest.v1+json"
    assert tested.response_headers == {"Content-Length": "0"}
    (put,) = run.specs["01_pull_test.go:36"].exchanges
    assert put.status == "201 Created" and put.request_body_bytes > 0
    assert run.specs["01_pull_test.go:18"].exchanges == []


def test_regressions_compare_spec_by_spec(run, tmp_path):
    direct_dir = tmp_path / "direct"
    direct_dir.mkdir()
    (direct_dir / "junit.xml").write_text(
        JUNIT.replace('status="failed"', 'status="passed"').replace(FAILURE, "")
    )
    (direct_dir / "suite.log").write_text("")
    direct = conformance.load_run("direct", direct_dir)
    runs = {"direct": direct, "gateway-token": run}
    (found,) = conformance.regressions(runs)
    assert found.gateway.key == "01_pull_test.go:198"
    text = conformance.describe_spec(found.gateway.key, runs)
    assert "HEAD /v2/acme/conformance/manifests/.INVALID_MANIFEST_NAME" in text
    assert "< 403 Forbidden" in text
    assert "| Pull / Pull manifests | 1 / 0 / 0 | 0 / 1 / 0 |" in conformance.table(runs)


def test_missing_sources_skip_but_a_wrong_override_fails(monkeypatch, tmp_path):
    monkeypatch.setattr(conformance, "DEFAULT_SRC", tmp_path / "absent")
    monkeypatch.delenv(conformance.SRC_ENV, raising=False)
    with pytest.raises(conformance.SuiteUnavailable, match="absent"):
        conformance.source_dir()
    monkeypatch.setenv(conformance.SRC_ENV, str(tmp_path / "wrong"))
    with pytest.raises(RuntimeError, match="CONFORMANCE_SRC"):
        conformance.source_dir()
