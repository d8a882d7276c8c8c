"""decisions/target.py: the request target is parsed once, strictly, and forwarded canonically.

Every refused case is a target that Go's net/url (the backend) and Python would read
differently, or bytes outside RFC 3986.
"""

from __future__ import annotations

import pytest

from addons.decisions import target
from addons.decisions.target import Target, TargetError

SHA = "sha256:" + "a" * 64


@pytest.mark.parametrize(
    "raw",
    [
        # The reproduced attack: Python's query stops at '#', Go's raw query keeps it.
        f"/v2/acme/steal/blobs/uploads/?digest={SHA}#&mount={SHA}&from=globex/app",
        "/v2/acme/app/tags/list#x",
        "/v2/acme/app/blobs/uploads/?mount=x;from=globex/app",  # ';' split by older Go
        "/v2/acme/app/referrers/x?artifactType=a+b",  # '+' is a space in form decoding
        "/v2/acme%2F..%2Fglobex/app/tags/list",  # escapes in the path
        "/v2/acme/app/manifests/v1%00",
        "/v2/acme\\app/tags/list",
        "/v2/acme/app/tags/list?n=1&&last=x",  # an empty pair
        "/v2/acme/app/tags/list?=x",  # an empty key
        "/v2/acme/app/tags/list?n=%G1",  # a broken escape
        "/v2/acme/app/tags/list?n=%ff",  # not UTF-8 once decoded
        "/v2/acme/app/tags/list?n=1 2",
        "/v2/ä",
        "*",
        "",
        "v2/",
        "/v2/" + "a" * target.MAX_TARGET,
    ],
)
def test_ambiguous_or_malformed_targets_are_refused(raw):
    with pytest.raises(TargetError):
        target.parse(raw.encode())


def test_non_ascii_bytes_are_refused():
    with pytest.raises(TargetError):
        target.parse(b"/v2/\xff")


def test_a_plain_path_has_no_parameters():
    assert target.parse(b"/v2/acme/app/manifests/v1") == Target("/v2/acme/app/manifests/v1", ())
    assert target.parse(b"/v2/?") == Target("/v2/", ())


def test_parameters_are_decided_on_their_decoded_form_in_order():
    parsed = target.parse(b"/v2/a/b/blobs/uploads/?mo%75nt=sha256%3Aab&from=acme%2Fx&x")
    assert parsed.params == (("mount", "sha256:ab"), ("from", "acme/x"), ("x", ""))
    assert parsed.get_all("from") == ["acme/x"]


def test_the_forwarded_target_is_rebuilt_from_the_decision():
    assert target.canonical("/v2/a/b/tags/list") == "/v2/a/b/tags/list"
    assert (
        target.canonical("/v2/a/b/blobs/uploads/", {"mount": SHA, "from": "acme/x"})
        == f"/v2/a/b/blobs/uploads/?mount={SHA}&from=acme/x"
    )
    # Anything that is not plainly safe is escaped, so the backend reads the same values.
    state = "YWJj+/=="
    assert target.canonical("/u", {"_state": state}) == "/u?_state=YWJj%2B/%3D%3D"
    again = target.parse(target.canonical("/u", {"_state": state, "q": "a&b=c#d"}).encode())
    assert dict(again.params) == {"_state": state, "q": "a&b=c#d"}


def test_a_plus_is_a_space_only_where_the_gateway_answers_itself():
    raw = b"/auth/token?service=x&scope=repository:a/b:pull+repository:a/c:pull"
    assert target.parse(raw, form=True).get_all("scope") == [
        "repository:a/b:pull repository:a/c:pull"
    ]
    with pytest.raises(target.TargetError):
        target.parse(b"/v2/a/b/tags/list?last=a+b")
