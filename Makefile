# The README's two commands. Both install what is missing first (idempotent).
.PHONY: run test e2e unit lint conformance

run:
	scripts/setup.sh
	.venv/bin/tabbify-registry run

test:
	scripts/setup.sh --test
	.venv/bin/ruff check .
	.venv/bin/pytest

unit:
	scripts/setup.sh --test
	.venv/bin/pytest -m "not e2e"

e2e:
	scripts/setup.sh --test
	.venv/bin/pytest -m e2e

# The OCI conformance suite against the backend and through the gateway (tests/support/conformance.py);
# needs its sources in ../shared/conformance or $CONFORMANCE_SRC.
conformance:
	scripts/setup.sh --test
	.venv/bin/python -m tests.support.conformance
