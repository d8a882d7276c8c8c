"""Listings: pages of tag lists and of the catalog (gateway/listing.py, Ledger.repositories)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from addons.decisions.tokens import TokenSigner
from addons.gateway.listing import CatalogCursor, CatalogPage, catalog_page, next_link, page
from addons.storage.sqlite import SqliteLedger


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
    ledger = SqliteLedger(tmp_path / "ledger.db")
    for name in ("acme/b", "acme/a", "acme-x/a", "acme0/a", "acmex/a", "globex/a", "acme/a/b"):
        ledger.add(name.split("/")[0], [], repository=name, listed=True)
    assert ledger.repositories("acme/", "", 10) == ["acme/a", "acme/a/b", "acme/b"]
    assert ledger.repositories("acme/", "acme/a", 10) == ["acme/a/b", "acme/b"]
    assert ledger.repositories("acme/", "acme/a/b", 1) == ["acme/b"]
    assert ledger.repositories("acme/", "acme/b", 10) == []
    assert ledger.repositories("acme/", "aaa", 10) == ["acme/a", "acme/a/b", "acme/b"]
    assert ledger.repositories("acme/", "", 2) == ["acme/a", "acme/a/b"]
    # A prefix that is a whole name (a grant of one repository): `after` stays exclusive,
    # or a page ending on that name would start the next one with it again, forever.
    assert ledger.repositories("acme/a", "", 10) == ["acme/a", "acme/a/b"]
    assert ledger.repositories("acme/a", "acme/a", 10) == ["acme/a/b"]


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
    assert catalog_page(scan, prefixes, pullable, "", 10) == CatalogPage(
        ["acme/base/a", "acme/base/b", "globex/app", "globex/z"], None
    )
    assert catalog_page(scan, prefixes, pullable, "", 2) == CatalogPage(
        ["acme/base/a", "acme/base/b"], "acme/base/b"
    )
    assert catalog_page(scan, prefixes, pullable, "acme/base/b", 2) == CatalogPage(
        ["globex/app", "globex/z"], None
    )
    assert catalog_page(scan, prefixes, pullable, "globex/z", 2) == CatalogPage([], None)


def test_the_catalog_page_scans_a_bounded_number_of_names(monkeypatch):
    import addons.gateway.listing as listing

    monkeypatch.setattr(listing, "SCAN_BATCH", 10)
    monkeypatch.setattr(listing, "MAX_SCANNED", 30)
    names = [f"acme/r{i:04d}" for i in range(1000)]
    calls = []

    def scan(prefix: str, after: str, limit: int) -> list[str]:
        calls.append(after)
        return [n for n in names if n > after][:limit]

    found = catalog_page(scan, [""], lambda n: n.endswith("999"), "", 5)
    # Stopped on a name the caller may not list: the position goes on sealed, never plain.
    assert found == CatalogPage([], "acme/r0029", sealed=True) and len(calls) == 3
    found = catalog_page(scan, [""], lambda n: n.endswith("999"), "acme/r0990", 5)
    assert found == CatalogPage(["acme/r0999"], None)


def test_a_cursor_opens_only_for_its_caller_and_its_keys():
    signer = TokenSigner()
    cursor = CatalogCursor(signer)
    sealed = cursor.seal("acme/secret-project", "globex\0")
    assert sealed.startswith("C") and "secret" not in sealed
    assert len(sealed) == len(cursor.seal("acme/x", "globex\0"))  # the length hides too
    assert cursor.open(sealed, "globex\0") == "acme/secret-project"
    assert cursor.open(sealed, "initech\0") is None  # bound to the caller
    assert CatalogCursor(TokenSigner()).open(sealed, "globex\0") is None  # another run
    assert (
        cursor.open(sealed[:-2] + ("A" if sealed[-2] != "A" else "B") + sealed[-1], "globex\0")
        is None
    )
    assert cursor.open("C" + "A" * 40, "globex\0") is None


def _follow(names: list[str], listable: set[str], prefixes: list[str], n: int, bound: int):
    """Every page the gateway would answer, following its links as a client would, with
    the plain `last` values it would show; sealed positions go through a real cursor, names
    come from a real ledger's range scans."""
    cursor, caller = CatalogCursor(TokenSigner()), "globex\0"
    with tempfile.TemporaryDirectory() as directory:
        ledger = SqliteLedger(Path(directory) / "ledger.db")
        for name in names:
            ledger.add(name.split("/")[0], [], repository=name, listed=True)
        scan = ledger.repositories
        last, pages, shown = "", [], []
        for _ in range(len(names) + 2):
            got = catalog_page(scan, prefixes, listable.__contains__, last, n, bound)
            pages.append(got.names)
            if got.after is None:
                return pages, shown
            value = cursor.seal(got.after, caller) if got.sealed else got.after
            shown.append(value)
            last = cursor.open(value, caller) if value.startswith("C") else value
            assert last is not None
    raise AssertionError("paging does not end")


_NAME = st.from_regex(r"(acme|globex|initech)/[a-c]{1,3}(/[a-c]{1,2})?", fullmatch=True)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(_NAME, st.booleans()), max_size=40, unique_by=lambda t: t[0]),
    st.integers(1, 5),
    st.integers(1, 12),
    st.sampled_from([[""], ["acme/", "globex/"], ["acme/a", "globex/"]]),
)
def test_catalog_pages_show_exactly_the_listable_names(entries, n, bound, prefixes):
    """Over random listable/unlistable sets and small scan bounds: the union of the pages is
    the listable set (in ranges the caller can pull from), in order, without repeats; no
    unlistable name is in any page or any plain `last` a link shows."""
    names = [name for name, _ in entries]
    listable = {name for name, ok in entries if ok and any(name.startswith(p) for p in prefixes)}
    pages, shown = _follow(names, listable, prefixes, n, bound)
    flat = [name for page in pages for name in page]
    assert flat == sorted(listable)
    assert all(len(page) <= n for page in pages)
    for value in shown:  # a plain `last` is a listed name; anything else is sealed
        assert value in listable or (value.startswith("C") and "/" not in value)


@pytest.mark.parametrize("bound", [1, 2, 7])
def test_a_run_of_unlistable_names_longer_than_the_bound_is_crossed(bound):
    names = [f"acme/p{i:02d}" for i in range(20)] + ["acme/z"]
    pages, shown = _follow(names, {"acme/z"}, ["acme/"], 3, bound)
    assert [name for page in pages for name in page] == ["acme/z"]
    assert all(value.startswith("C") or value == "acme/z" for value in shown)
