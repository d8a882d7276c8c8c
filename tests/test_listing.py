"""Listings: pages of tag lists and of the catalog (addons/listing.py, Ledger.repositories)."""

from __future__ import annotations

from addons.ledger import Ledger
from addons.listing import catalog_page, next_link, page


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
        ledger.add(name.split("/")[0], [], repository=name, listed=True)
    assert ledger.repositories("acme/", "", 10) == ["acme/a", "acme/a/b", "acme/b"]
    assert ledger.repositories("acme/", "acme/a", 10) == ["acme/a/b", "acme/b"]
    assert ledger.repositories("acme/", "acme/a/b", 1) == ["acme/b"]
    assert ledger.repositories("acme/", "acme/b", 10) == []
    assert ledger.repositories("acme/", "aaa", 10) == ["acme/a", "acme/a/b", "acme/b"]
    assert ledger.repositories("acme/", "", 2) == ["acme/a", "acme/a/b"]


def _names_after(names: list[str]):
    ordered = sorted(names)

    def scan(prefix: str, after: str, limit: int) -> list[str]:
        start = after if after > prefix else prefix
        out = [n for n in ordered if n.startswith(prefix) and (n > start or n == prefix == start)]
        return [n for n in out if n > after][:limit]

    return scan


def test_the_catalog_page_merges_the_ranges_the_caller_can_pull_from():
    names = ["acme/base/a", "acme/base/b", "acme/private", "globex/app", "globex/z", "initech/x"]
    pullable = lambda n: n.startswith(("globex/", "acme/base/"))  # noqa: E731
    prefixes = ["acme/base/", "globex/"]
    scan = _names_after(names)
    assert catalog_page(scan, prefixes, pullable, "", 10) == (
        ["acme/base/a", "acme/base/b", "globex/app", "globex/z"],
        None,
    )
    assert catalog_page(scan, prefixes, pullable, "", 2) == (
        ["acme/base/a", "acme/base/b"],
        "acme/base/b",
    )
    assert catalog_page(scan, prefixes, pullable, "acme/base/b", 2) == (
        ["globex/app", "globex/z"],
        None,
    )
    assert catalog_page(scan, prefixes, pullable, "globex/z", 2) == ([], None)


def test_the_catalog_page_scans_a_bounded_number_of_names(monkeypatch):
    import addons.listing as listing

    monkeypatch.setattr(listing, "SCAN_BATCH", 10)
    monkeypatch.setattr(listing, "MAX_SCANNED", 30)
    names = [f"acme/r{i:04d}" for i in range(1000)]
    calls = []

    def scan(prefix: str, after: str, limit: int) -> list[str]:
        calls.append(after)
        return [n for n in names if n > after][:limit]

    found, after = catalog_page(scan, [""], lambda n: n.endswith("999"), "", 5)
    assert found == [] and after == "acme/r0029" and len(calls) == 3
    found, after = catalog_page(scan, [""], lambda n: n.endswith("999"), "acme/r0990", 5)
    assert found == ["acme/r0999"] and after is None
