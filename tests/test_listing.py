"""Listings: pages of tag lists and of the catalog (addons/listing.py, Ledger.repositories)."""

from __future__ import annotations

from addons.ledger import Ledger
from addons.listing import next_link, page


def test_a_page_is_sorted_after_last_and_at_most_n():
    tags = ["v3", "v1", "latest", "v2", "v1"]
    assert page(tags, None, None) == (["latest", "v1", "v2", "v3"], False)
    assert page(tags, 2, None) == (["latest", "v1"], True)
    assert page(tags, 2, "v1") == (["v2", "v3"], False)
    assert page(tags, 1, "v2") == (["v3"], False)
    assert page(tags, 0, None) == ([], True)
    assert page(tags, 5, "zzz") == ([], False)


def test_the_next_link_is_relative_and_escaped():
    assert next_link("/v2/acme/app/tags/list", 2, "v1") == (
        '</v2/acme/app/tags/list?n=2&last=v1>; rel="next"'
    )
    assert (
        next_link("/v2/_catalog", 1, "acme/a b") == '</v2/_catalog?n=1&last=acme/a%20b>; rel="next"'
    )


def test_repositories_are_listed_by_prefix_in_order_and_after_last(tmp_path):
    ledger = Ledger(tmp_path / "ledger.db")
    for name in ("acme/b", "acme/a", "acme-x/a", "acme0/a", "acmex/a", "globex/a", "acme/a/b"):
        ledger.add(name.split("/")[0], [], repository=name)
    assert ledger.repositories("acme/", "", 10) == ["acme/a", "acme/a/b", "acme/b"]
    assert ledger.repositories("acme/", "acme/a", 10) == ["acme/a/b", "acme/b"]
    assert ledger.repositories("acme/", "acme/a/b", 1) == ["acme/b"]
    assert ledger.repositories("acme/", "acme/b", 10) == []
    assert ledger.repositories("acme/", "aaa", 10) == ["acme/a", "acme/a/b", "acme/b"]
    assert ledger.repositories("acme/", "", 2) == ["acme/a", "acme/a/b"]
