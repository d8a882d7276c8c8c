"""addons/decisions/gc_plan.py: examples, then hypothesis properties over random registry graphs.

The properties use an oracle written from the documented rules (kept tags, reachability
through children / referrers / cosign attachment tags, grace for young manifests and blobs),
not the planner's own helpers.
"""

from __future__ import annotations

import json
import random
from datetime import timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from addons.decisions import gc_plan
from addons.decisions.gc_plan import (
    UNATTRIBUTED,
    Blob,
    Manifest,
    Reclaimed,
    Repository,
    Retention,
    Snapshot,
    Tag,
    apply_plan,
    plan,
)
from addons.decisions.manifest import ManifestError
from addons.decisions.signatures import signature_tag
from tests.support import cosign
from tests.support.images import digest, oci_index_layout, oci_layout

NOW = 100_000.0
OLD = NOW - 10 * 86400  # pushed ten days ago
D = {name: digest(name.encode()) for name in "abcdefghijklmnopqrstuvwxyz"}


def image(*blobs: str, pushed: float = OLD, subject: str | None = None, size: int = 500):
    return Manifest("image", blobs=blobs, subject=subject, size=size, pushed=pushed)


def index(*children: str, pushed: float = OLD):
    return Manifest("index", children=children, size=300, pushed=pushed)


def sizes(*names: str, size: int = 1000) -> dict[str, Blob]:
    return {D[n]: Blob(size, OLD) for n in names}


# --- examples ----------------------------------------------------------------------------------


def test_index_children_and_their_layers_stay():
    repo = Repository(
        tags={"multi": Tag(D["i"], OLD)},
        manifests={D["i"]: index(D["a"], D["b"]), D["a"]: image(D["x"]), D["b"]: image(D["y"])},
    )
    p = plan(Snapshot({"acme/app": repo}, sizes("x", "y")), Retention(), NOW)
    assert p.empty and p.totals() == Reclaimed()


def test_untagged_image_goes_but_a_blob_another_repository_uses_stays():
    acme = Repository(
        tags={"v1": Tag(D["a"], OLD)},
        manifests={D["a"]: image(D["x"]), D["b"]: image(D["y"], D["z"], size=222)},
    )
    globex = Repository(tags={"v1": Tag(D["c"], OLD)}, manifests={D["c"]: image(D["z"])})
    snap = Snapshot({"acme/app": acme, "globex/app": globex}, sizes("x", "y", "z"))
    p = plan(snap, Retention(), NOW)
    assert p.tags == ()
    assert p.manifests == (("acme/app", D["b"]),)
    assert set(p.blobs) == {D["b"], D["y"]}  # the manifest's own content and its unique layer
    assert p.bytes == 222 + 1000
    assert p.tenants == {"acme": Reclaimed(manifests=1, blobs=2, bytes=1222)}


def test_young_untagged_manifests_and_blobs_stay():
    """A push in flight: the index's children (and a loose layer) arrive before the index."""
    young = NOW - 60
    repo = Repository(manifests={D["a"]: image(D["x"], pushed=young)})
    blobs = {D["x"]: Blob(10, young), D["y"]: Blob(20, young), D["z"]: Blob(30, OLD)}
    p = plan(Snapshot({"acme/app": repo}, blobs), Retention(), NOW)
    assert p.manifests == () and p.blobs == (D["z"],)
    assert p.tenants == {UNATTRIBUTED: Reclaimed(blobs=1, bytes=30)}
    # With no grace, everything old enough goes.
    p = plan(Snapshot({"acme/app": repo}, blobs), Retention(untagged_after=0), NOW, blob_grace=0)
    assert p.manifests == (("acme/app", D["a"]),)
    assert set(p.blobs) == {D["a"], D["x"], D["y"], D["z"]}


def test_blob_of_unknown_age_counts_as_old():
    p = plan(Snapshot({}, {D["x"]: 5}), Retention(), NOW)
    assert p.blobs == (D["x"],) and p.bytes == 5


def test_keep_last_by_push_time_with_protected_tags():
    tags = {
        "v1.0": Tag(D["a"], 1.0),
        "ci-1": Tag(D["b"], 2.0),
        "ci-2": Tag(D["c"], 3.0),
        "ci-3": Tag(D["d"], 4.0),
        "latest": Tag(D["d"], 4.0),
        signature_tag(D["b"]): Tag(D["s"], 9.0),  # newest, but never counts for keep_last
    }
    manifests = {D[n]: image(D["x"]) for n in "abcd"} | {D["s"]: image(D["y"])}
    repo = Repository(tags, manifests)
    p = plan(Snapshot({"acme/app": repo}), Retention(keep_last=2, protected=["v*"]), NOW)
    # ci-3 and latest tie on push time (name breaks the tie); v1.0 is protected.
    assert p.tags == (
        ("acme/app", "ci-1"),
        ("acme/app", "ci-2"),
        ("acme/app", signature_tag(D["b"])),
    )
    assert set(p.manifests) == {("acme/app", D["b"]), ("acme/app", D["c"]), ("acme/app", D["s"])}
    assert p.tenants["acme"].tags == 3


def test_protected_predicate_and_keep_zero():
    repo = Repository(
        {"keep": Tag(D["a"], 1.0), "drop": Tag(D["b"], 2.0)},
        {D["a"]: image(D["x"]), D["b"]: image(D["y"])},
    )
    r = Retention(keep_last=0, protected=lambda t: t == "keep")
    assert plan(Snapshot({"acme/x": repo}), r, NOW).tags == (("acme/x", "drop"),)


def test_signatures_and_referrers_follow_their_subject():
    kept, gone = D["a"], D["b"]
    repo = Repository(
        tags={
            "v1": Tag(kept, OLD),
            signature_tag(kept): Tag(D["s"], OLD),
            signature_tag(gone): Tag(D["t"], OLD),
            signature_tag(D["s"]): Tag(D["u"], OLD),  # a signature of the signature
        },
        manifests={
            kept: image(D["x"]),
            gone: image(D["y"]),
            D["s"]: image(D["p"]),
            D["t"]: image(D["q"]),
            D["u"]: image(D["o"]),
            D["r"]: image(D["n"], subject=kept),  # OCI 1.1 signature of the kept image
            D["v"]: image(D["m"], subject=D["r"]),  # a referrer of that referrer
            D["w"]: image(D["l"], subject=gone),
        },
    )
    p = plan(Snapshot({"acme/app": repo}), Retention(), NOW)
    assert p.tags == (("acme/app", signature_tag(gone)),)
    assert {d for _, d in p.manifests} == {gone, D["t"], D["w"]}
    assert {D["x"], D["p"], D["o"], D["n"], D["m"]}.isdisjoint(p.blobs)


def test_referrer_does_not_keep_its_subject():
    repo = Repository(
        tags={"sbom": Tag(D["r"], OLD)},
        manifests={D["a"]: image(D["x"]), D["r"]: image(D["y"], subject=D["a"])},
    )
    p = plan(Snapshot({"acme/app": repo}), Retention(), NOW)
    assert p.manifests == (("acme/app", D["a"]),)


def test_dangling_tag_still_protects_its_digest():
    repo = Repository(tags={"v1": Tag(D["a"], OLD)}, manifests={})
    p = plan(Snapshot({"acme/app": repo}, sizes("a")), Retention(), NOW)
    assert p.empty


def test_keep_last_removes_young_tags_with_their_manifests():
    """Three images pushed a minute ago, one tag each: keep_last = 1 removes two, even though
    their manifests are younger than untagged_after (that grace is for untagged manifests)."""
    young = NOW - 60
    repo = Repository(
        tags={"a": Tag(D["a"], young), "b": Tag(D["b"], young + 1), "c": Tag(D["c"], young + 2)},
        manifests={D[n]: image(D["x"], pushed=young) for n in "abc"},
    )
    p = plan(Snapshot({"acme/app": repo}), Retention(keep_last=1), NOW)
    assert p.tags == (("acme/app", "a"), ("acme/app", "b"))
    assert set(p.manifests) == {("acme/app", D["a"]), ("acme/app", D["b"])}
    assert p.blocked == ()


def test_a_tag_that_cannot_go_without_what_stays_is_reported():
    """Distribution removes a tag only with its manifest: a tag sharing its digest with a kept
    tag, or naming a child of an index that stays, or a manifest not read, stays, with why."""
    repo = Repository(
        tags={
            "old": Tag(D["a"], 1.0),  # same manifest as the kept "new"
            "arm": Tag(D["c"], 2.0),  # a child of the kept index
            "lost": Tag(D["z"], 3.0),  # manifest not in the snapshot (unreadable)
            "gone": Tag(D["b"], 4.0),
            "multi": Tag(D["i"], 5.0),
            "new": Tag(D["a"], 6.0),
        },
        manifests={
            D["a"]: image(D["x"]),
            D["b"]: image(D["y"]),
            D["c"]: image(D["w"]),
            D["i"]: index(D["c"]),
        },
    )
    p = plan(Snapshot({"acme/app": repo}), Retention(keep_last=2), NOW)
    assert p.tags == (("acme/app", "gone"),) and p.manifests == (("acme/app", D["b"]),)
    why = {t: reason for _, t, reason in p.blocked}
    assert set(why) == {"old", "arm", "lost"}
    assert "also tagged new" in why["old"] and "cannot be removed alone" in why["old"]
    assert f"child of index {D['i']}" in why["arm"]
    assert "could not be read" in why["lost"]
    assert p.report()["tags_not_removed"][0] == {
        "repository": "acme/app",
        "tag": "arm",
        "reason": why["arm"],
    }
    assert p.tenants["acme"].tags == 1
    # Nothing the kept tags reach is planned away.
    assert {D["x"], D["w"], D["a"], D["c"], D["i"]}.isdisjoint(p.blobs)


def test_protected_tag_keeps_every_tag_on_its_manifest():
    repo = Repository(
        tags={"v1.0": Tag(D["a"], 1.0), "ci-1": Tag(D["a"], 2.0), "ci-2": Tag(D["b"], 3.0)},
        manifests={D["a"]: image(D["x"]), D["b"]: image(D["y"])},
    )
    p = plan(Snapshot({"acme/app": repo}), Retention(keep_last=0, protected=["v*"]), NOW)
    assert p.tags == (("acme/app", "ci-2"),)
    assert [(t, "also tagged v1.0" in why) for _, t, why in p.blocked] == [("ci-1", True)]


def test_a_protected_attachment_tag_stays_with_its_subject_gone():
    """An [[immutable]] rule can name cosign tags (`sha256-*`): such a tag is never removed,
    even when the image it signs goes."""
    gone = D["a"]
    repo = Repository(
        tags={"old": Tag(gone, 1.0), signature_tag(gone): Tag(D["s"], 2.0)},
        manifests={gone: image(D["x"]), D["s"]: image(D["y"])},
    )
    p = plan(Snapshot({"acme/app": repo}), Retention(keep_last=0, protected=["sha256-*"]), NOW)
    assert p.tags == (("acme/app", "old"),) and p.manifests == (("acme/app", gone),)
    assert D["y"] not in p.blobs


def test_report_is_json_and_sums_up():
    acme = Repository(tags={"old": Tag(D["a"], 1.0)}, manifests={D["a"]: image(D["x"])})
    globex = Repository(manifests={D["b"]: image(D["x"], D["y"])})
    snap = Snapshot({"acme/app": acme, "globex/app": globex}, sizes("x", "y"))
    p = plan(snap, {"acme/app": Retention(keep_last=0)}, NOW)
    report = json.loads(json.dumps(p.report()))
    assert report["totals"] == {"tags": 1, "manifests": 2, "blobs": 4, "bytes": 2000 + 500 + 500}
    # Shared layer x is charged once, to the first tenant by name.
    assert report["tenants"]["acme"] == {"tags": 1, "manifests": 1, "blobs": 2, "bytes": 1500}
    assert report["tenants"]["globex"] == {"tags": 0, "manifests": 1, "blobs": 2, "bytes": 1500}
    assert report["tags"] == [{"repository": "acme/app", "tag": "old"}]


def test_retention_for_each_repository():
    repo = Repository(
        {"a": Tag(D["a"], 1.0), "b": Tag(D["b"], 2.0)},
        {D["a"]: image(D["x"]), D["b"]: image(D["y"])},
    )
    snap = Snapshot({"acme/one": repo, "acme/two": repo})
    by_callable = plan(snap, lambda r: Retention(keep_last=1 if r == "acme/one" else None), NOW)
    by_mapping = plan(snap, {"acme/one": Retention(keep_last=1)}, NOW)
    assert by_callable == by_mapping
    assert by_mapping.tags == (("acme/one", "a"),)


def test_retention_validation():
    for bad in (
        {"keep_last": -1},
        {"keep_last": 1.5},
        {"keep_last": True},
        {"untagged_after": -1},
        {"untagged_after": timedelta(seconds=-1)},
        {"protected": "v*"},
    ):
        with pytest.raises(ValueError):
            Retention(**bad)
    assert gc_plan.seconds(Retention(untagged_after=timedelta(hours=2)).untagged_after) == 7200


def test_describe_manifest(tmp_path):
    img = oci_layout(tmp_path / "a", "v1")
    m = gc_plan.describe_manifest(img["blobs"][img["digest"]], pushed=5.0)
    assert m.kind == "image" and m.children == () and m.subject is None and m.pushed == 5.0
    layers = [layer["digest"] for layer in img["manifest"]["layers"]]
    assert m.blobs == (img["manifest"]["config"]["digest"], *layers)
    idx = oci_index_layout(tmp_path / "i", "multi")
    mi = gc_plan.describe_manifest(idx["blobs"][idx["digest"]])
    assert mi.kind == "index" and len(mi.children) == 2 and mi.blobs == ()
    s = cosign.sign(cosign.Signer(), img["digest"], referrer_of={"digest": img["digest"]})
    ms = gc_plan.describe_manifest(s.manifest)
    assert ms.subject == img["digest"] and len(ms.blobs) == 2 and ms.size == len(s.manifest)
    for bad in (
        b"[]",
        b"\xff",
        b'{"layers": {"digest": "sha256:x"}}',
        b'{"layers": "x"}',
        b'{"subject": {"digest": 5}}',
        b'{"layers": [{"digest": "sha256:' + b"A" * 64 + b'"}]}',
    ):
        with pytest.raises(ManifestError):
            gc_plan.describe_manifest(bad)


def test_gc_reads_a_manifest_as_a_push_is_read():
    """One reader (manifest.parse, manifest.parts): where gc's own sha256-only reading and the
    push's differed, gc now reads what the backend reads, or refuses (and keeps)."""
    sha512 = "sha512:" + "e" * 128
    # A key Go folds (`Layers` fills `layers`): the backend links those layers; read without
    # them, they were swept from under a kept manifest. Refused now: kept with all it names.
    for bad in (
        {"config": {"digest": D["c"]}, "Layers": [{"digest": D["x"]}]},
        {"layers": {"digest": D["x"]}},  # one descriptor where Go wants a list
        {"config": [{"digest": D["c"]}]},  # a list where Go wants one descriptor
        {"layers": [], "subject": "x"},  # a subject that is no descriptor
        {"layers": [], "subject": {"size": 1}},  # nor names a digest
    ):
        with pytest.raises(ManifestError):
            gc_plan.describe_manifest(json.dumps(bad).encode())
    # A sha512 blob is a blob (it was refused as unreadable, so never collected).
    m = gc_plan.describe_manifest(json.dumps({"layers": [{"digest": sha512}]}).encode())
    assert m.blobs == (sha512,) and m.kind == "image"
    # A media type that is no string is no index (it raised TypeError, not a refusal).
    m = gc_plan.describe_manifest(
        b'{"mediaType": [], "blobs": [{"digest": "%s"}]}' % D["b"].encode()
    )
    assert m.kind == "other" and m.blobs == (D["b"],)


def test_what_an_unreadable_manifest_might_name_stays():
    """A manifest gc cannot read stays (not in the snapshot); what it might name stays too,
    blobs and manifests alike, even when a removed manifest names them as well."""
    repo = Repository(
        tags={"old": Tag(D["a"], 1.0), "new": Tag(D["n"], 2.0)},
        manifests={D["a"]: image(D["x"], D["y"]), D["c"]: image(D["z"])},
        kept=frozenset({D["x"], D["c"]}),  # "new" names an unreadable manifest naming these
    )
    p = plan(Snapshot({"acme/app": repo}, sizes("x", "y", "z")), Retention(keep_last=1), NOW)
    assert p.manifests == (("acme/app", D["a"]),) and set(p.blobs) == {D["a"], D["y"]}
    assert p.tags == (("acme/app", "old"),)


# --- properties --------------------------------------------------------------------------------

PROPS = settings(
    max_examples=300,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
REPOS = ["acme/app", "acme/base", "globex/app", "initech/x/y"]
MANIFESTS = [digest(f"m{i}".encode()) for i in range(10)]
BLOBS = [digest(f"b{i}".encode()) for i in range(10)]
TAG_NAMES = ["latest", "v1", "v2", "v3", "dev", "rc1"]
times = st.floats(min_value=NOW - 10_000, max_value=NOW, allow_nan=False)


@st.composite
def snapshots(draw):
    # One description per manifest digest (content addressing): children and subjects point
    # only at earlier digests, as a real graph must; random gaps make some dangling.
    content = {}
    for i, d in enumerate(MANIFESTS):
        kind = draw(st.sampled_from(["image", "index", "other"]))
        earlier = MANIFESTS[:i]
        children = tuple(draw(st.lists(st.sampled_from(earlier), max_size=3))) if earlier else ()
        subject = draw(st.none() | st.sampled_from(earlier)) if earlier else None
        content[d] = Manifest(
            kind=kind,
            children=children if kind == "index" else (),
            blobs=tuple(draw(st.lists(st.sampled_from(BLOBS), max_size=3))),
            subject=subject,
            size=draw(st.integers(1, 999)),
        )
    repositories = {}
    for name in draw(st.lists(st.sampled_from(REPOS), min_size=1, max_size=4, unique=True)):
        held = draw(st.lists(st.sampled_from(MANIFESTS), max_size=8, unique=True))
        manifests = {d: Manifest(**{**vars(content[d]), "pushed": draw(times)}) for d in held}
        tags = {}
        targets = st.sampled_from(held) if held else st.sampled_from(MANIFESTS)
        for t in draw(st.lists(st.sampled_from(TAG_NAMES), max_size=5, unique=True)):
            tags[t] = Tag(draw(targets), draw(times))
        for subject in draw(st.lists(st.sampled_from(MANIFESTS), max_size=3, unique=True)):
            suffix = draw(st.sampled_from(["sig", "att", "sbom"]))
            tags[subject.replace(":", "-") + "." + suffix] = Tag(draw(targets), draw(times))
        repositories[name] = Repository(tags, manifests)
    blobs = {
        d: Blob(draw(st.integers(0, 5000)), draw(st.none() | times))
        for d in draw(st.lists(st.sampled_from(BLOBS + MANIFESTS), unique=True))
    }
    return Snapshot(repositories, blobs)


retentions = st.builds(
    Retention,
    keep_last=st.none() | st.integers(0, 4),
    untagged_after=st.floats(0, 10_000),
    protected=st.lists(st.sampled_from(["v*", "latest", "rc?", "nothing", "sha256-*"]), max_size=2),
)


def attachment(tag: str) -> str | None:
    head, _, suffix = tag.partition(".")
    if suffix in ("sig", "att", "sbom") and head.startswith("sha256-") and len(head) == 71:
        return "sha256:" + head[7:]
    return None


def must_keep(repo: Repository, r: Retention) -> set[str]:
    """Ordinary tags the retention rules keep (written from the rules, not from the planner)."""
    ordinary = [t for t in repo.tags if attachment(t) is None]
    protected = {t for t in ordinary if r.is_protected(t)}
    rest = sorted(
        (t for t in ordinary if t not in protected), key=lambda t: (-repo.tags[t].pushed, t)
    )
    return protected | set(rest if r.keep_last is None else rest[: r.keep_last])


def reach(repo: Repository, kept_tags: set[str], r: Retention) -> set[str]:
    """Manifests reachable in one repository, by breadth-first search with a fixed point."""
    tagged = {tag.manifest for tag in repo.tags.values()}
    reached = {repo.tags[t].manifest for t in kept_tags}
    reached |= {tag.manifest for t, tag in repo.tags.items() if attachment(t) and r.is_protected(t)}
    reached |= {
        d
        for d, m in repo.manifests.items()
        if d not in tagged and NOW - m.pushed < r.untagged_after
    }
    while True:
        grown = set(reached)
        for d in reached:
            if d in repo.manifests:
                grown |= set(repo.manifests[d].children)
        grown |= {d for d, m in repo.manifests.items() if m.subject in reached}
        grown |= {tag.manifest for t, tag in repo.tags.items() if attachment(t) in reached}
        if grown == reached:
            return reached
        reached = grown


def names(d: str, m: Manifest) -> set[str]:
    return {d, *m.blobs, *m.children}


@PROPS
@given(snap=snapshots(), r=retentions, blob_grace=st.floats(0, 10_000))
def test_properties(snap, r, blob_grace):
    p = plan(snap, r, NOW, blob_grace=blob_grace)
    deleted_tags, deleted = set(p.tags), set(p.manifests)
    protected_content: set[str] = set()
    for name, repo in snap.repositories.items():
        keep = must_keep(repo, r)
        reached = reach(repo, keep, r)
        # (a) nothing a kept tag reaches is removed: its tags, manifests, their content.
        assert not {(name, t) for t in keep} & deleted_tags
        assert not {(name, d) for d in reached} & deleted
        for t in repo.tags:
            if attachment(t) in reached:
                assert (name, t) not in deleted_tags
        protected_content |= {repo.tags[t].manifest for t in keep} | reached
        for d in reached & repo.manifests.keys():
            protected_content |= names(d, repo.manifests[d])
        # (b) what goes was unreachable and old: tags, manifests ...
        for t in {t for n, t in deleted_tags if n == name}:
            assert t in repo.tags
            assert attachment(t) not in reached if attachment(t) else t not in keep
            assert not r.is_protected(t)
        # A tag goes only with its manifest; one that would go but whose manifest stays is
        # reported, and stays.
        blocked = {t for n, t, _ in p.blocked if n == name}
        assert not blocked & {t for n, t in deleted_tags if n == name}
        for t in {t for n, t in deleted_tags if n == name} | blocked:
            goes = repo.tags[t].manifest in repo.manifests.keys() - reached
            assert goes == ((name, t) in deleted_tags)
            if goes:
                assert (name, repo.tags[t].manifest) in deleted
        for d in {d for n, d in deleted if n == name}:
            assert d in repo.manifests and d not in reached
            tagged = any(tag.manifest == d for tag in repo.tags.values())
            assert tagged or NOW - repo.manifests[d].pushed >= r.untagged_after
            # a tagged manifest goes only with every one of its tags
            assert all((name, t) in deleted_tags for t, v in repo.tags.items() if v.manifest == d)
        # ... and everything unreachable and old goes (the collector is complete).
        assert {(name, d) for d in repo.manifests.keys() - reached} <= deleted
    assert protected_content.isdisjoint(p.blobs)
    # (b) ... blobs: named by no remaining manifest of any repository, and old.
    remaining = {
        c
        for name, repo in snap.repositories.items()
        for d, m in repo.manifests.items()
        if (name, d) not in deleted
        for c in names(d, m)
    }
    for b in p.blobs:
        assert b not in remaining
        known = snap.blobs.get(b)
        if isinstance(known, Blob) and known.pushed is not None:
            assert NOW - known.pushed >= blob_grace
    # (c) idempotence: once applied, planning again removes nothing more.
    again = plan(apply_plan(snap, p), r, NOW, blob_grace=blob_grace)
    assert again.empty, again
    # (d) the per-tenant report adds up to the plan's totals.
    totals = p.totals()
    assert totals == Reclaimed(len(p.tags), len(p.manifests), len(p.blobs), p.bytes)
    assert all(v != Reclaimed() for v in p.tenants.values())


@PROPS
@given(snap=snapshots(), r=retentions, seed=st.integers())
def test_deterministic_whatever_the_input_order(snap, r, seed):
    rng = random.Random(seed)

    def shuffled(mapping):
        items = list(mapping.items())
        rng.shuffle(items)
        return dict(items)

    scrambled = Snapshot(
        shuffled(
            {
                n: Repository(shuffled(repo.tags), shuffled(repo.manifests))
                for n, repo in snap.repositories.items()
            }
        ),
        shuffled(snap.blobs),
    )
    assert plan(snap, r, NOW) == plan(scrambled, r, NOW)
