"""The OCI distribution-spec conformance suite through the gateway
(see tests/support/conformance.py).

Fails when a spec that passes against the backend does not pass through the gateway, in
anonymous mode or with a tenant token, and lists each one with the request the suite sent and
both answers. Skips only when the suite's sources (`../shared/conformance`, outside this
repository, or `$CONFORMANCE_SRC`) are absent.
"""

from __future__ import annotations

import pytest

from tests.support import conformance

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, conformance.Run]:
    try:
        binary = conformance.build()
    except conformance.SuiteUnavailable as e:
        pytest.skip(str(e))
    return conformance.run_all(binary, tmp_path_factory.mktemp("conformance"))


def test_the_suite_ran_every_workflow_in_every_mode(runs):
    """A harness that silently ran nothing would pass the comparison below."""
    assert set(runs) == set(conformance.MODES)
    for mode, run in runs.items():
        categories = {s.category for s in run.specs.values() if s.status == "passed"}
        assert categories == set(conformance.CATEGORIES), (mode, categories)
        assert run.counts()["passed"] >= 50, (mode, run.counts())
        # the same specs everywhere: the comparison is spec by spec
        assert run.specs.keys() == runs["direct"].specs.keys(), mode
    print("\n" + conformance.table(runs))


def test_every_spec_that_passes_against_the_backend_passes_through_the_gateway(runs):
    print("\n" + conformance.report(runs))
    found = conformance.regressions(runs)
    keys = list(dict.fromkeys(r.gateway.key for r in found))
    assert not keys, (
        f"{len(keys)} spec(s) pass against the backend but not through the gateway "
        f"({', '.join(sorted({r.mode for r in found}))}):\n"
        + "\n".join(conformance.describe_spec(k, runs) for k in keys)
    )
