"""addons/decisions/quota.py: Harbor-style usage per tenant and the quota decision."""

from __future__ import annotations

from addons.decisions import quota

A, B, C = "sha256:" + "a" * 64, "sha256:" + "b" * 64, "sha256:" + "c" * 64
SIZES = {A: 100, B: 30, C: 7}


def test_shared_blob_counts_for_each_tenant():
    owned = {"acme": [A, B, B], "globex": [A], "empty": []}
    assert quota.usage(owned, SIZES) == {"acme": 130, "globex": 100, "empty": 0}


def test_unknown_sizes_count_zero():
    assert quota.usage({"acme": [A, "sha256:" + "f" * 64]}, SIZES) == {"acme": 100}


def test_incoming_is_zero_for_what_the_tenant_owns():
    assert quota.incoming({A}, A, 100) == 0
    assert quota.incoming({A}, B, 30) == 30
    assert quota.incoming(set(), B, -5) == 0


def test_would_exceed():
    usage = {"acme": 900}
    assert not quota.would_exceed("acme", usage, 1000, 100)  # exactly at the quota
    assert quota.would_exceed("acme", usage, 1000, 101)
    assert not quota.would_exceed("acme", usage, None, 10**12)
    assert not quota.would_exceed("new", usage, 10, 10)
    assert quota.would_exceed("new", usage, 10, 11)
    # Over a lowered quota: new bytes are refused, adding nothing is not.
    assert quota.would_exceed("acme", usage, 500, 1)
    assert not quota.would_exceed("acme", usage, 500, 0)


def test_quota_for():
    rules = [(["acme", "globex"], 1000), (["*"], 5000), (["acme"], 800)]
    assert quota.quota_for("acme", rules) == 800
    assert quota.quota_for("globex", rules) == 1000
    assert quota.quota_for("initech", rules) == 5000
    assert quota.quota_for("acme", []) is None
    assert quota.quota_for("acme", [(["globex"], 1)]) is None


def test_metrics_text():
    text = quota.metrics({"globex": 100, "acme": 130, 'x"\\\n': 1}, {"acme": 1000, "globex": None})
    lines = text.splitlines()
    assert 'tabbify_tenant_usage_bytes{tenant="acme"} 130' in lines
    assert 'tabbify_tenant_usage_bytes{tenant="globex"} 100' in lines
    assert 'tabbify_tenant_usage_bytes{tenant="x\\"\\\\\\n"} 1' in lines
    assert 'tabbify_tenant_quota_bytes{tenant="acme"} 1000' in lines
    assert not any("quota_bytes" in line and "globex" in line for line in lines)
    assert text.endswith("\n")
    assert "quota_bytes" not in quota.metrics({"acme": 1}, {})
    assert "uploading" not in quota.metrics({"acme": 1}, {}, {})
    parked = quota.metrics({"acme": 1}, {"acme": 10}, {"acme": 7}).splitlines()
    assert 'tabbify_tenant_uploading_bytes{tenant="acme"} 7' in parked


def test_unfinished_upload_decisions():
    from addons.gateway.uploads import session_of, stored_from
    from addons.storage.ledger import upload_decision

    # A new session beyond the bound is refused first; then bytes past the quota.
    assert upload_decision("acme", 0, 64, True, 1, 100, 64).reason == "uploads"
    assert upload_decision("acme", 0, 64, False, 1, 100, 64)  # a known session goes on
    refused = upload_decision("acme", 90, 3, False, 11, 100, 64)
    assert not refused and (refused.reason, refused.used, refused.uploads) == ("quota", 90, 3)
    assert upload_decision("acme", 90, 3, False, 10, 100, 64)  # exactly the quota
    assert upload_decision("acme", 500, 3, False, 0, 100, 64)  # nothing added: never refused
    assert upload_decision("acme", 90, 3, False, 50, 100, 64, upto=True).granted == 10
    assert not upload_decision("acme", 100, 3, False, 50, 100, 64, upto=True)

    from addons.gateway.streamcap import MAX_GRANT, MIN_GRANT, grant_size

    assert grant_size(1_000_000) == 250_000 and grant_size(10) == MIN_GRANT
    assert grant_size(10**12) == MAX_GRANT

    from addons.gateway.streamcap import WAIT_OTHERS, worth_waiting
    from addons.storage.ledger import Reservation

    short = Reservation(True, 900, granted=10, pending=300)  # 300 reserved in flight
    assert worth_waiting(short, 100, 0.0)  # 200 of them held by other requests
    assert not worth_waiting(short, 300, 0.0)  # all of them this request's own: final
    assert not worth_waiting(short, 100, WAIT_OTHERS)  # waited long enough

    uuid = "0f5b6c3e-5b0e-4a4e-9a43-1c2d3e4f5a6b"
    location = f"/v2/acme/app/blobs/uploads/{uuid}?_state=abc"
    assert session_of(location, "acme/app") == f"acme/app@{uuid}"
    assert session_of(location, "acme/other") is None  # another repository's: not this one
    assert session_of("/v2/acme/app/blobs/uploads/../x", "acme/app") is None
    assert session_of("", "acme/app") is None

    from mitmproxy.test import tutils

    def answer(value: str | None):
        r = tutils.tresp()
        if value is not None:
            r.headers["range"] = value
        return r

    assert stored_from(answer("0-399999")) == 400_000
    assert stored_from(answer(None)) is None and stored_from(answer("bytes=0-1")) is None
