"""addons/decisions/manifest.py: a manifest is read exactly as the Go backend reads it, or refused.

Each refused case is one where Python's json and Go's encoding/json would see different
references (case-folded or repeated keys, depth, encodings, non-JSON constants); the
differential test (test_differential.py) checks the same against Go itself.
"""

from __future__ import annotations

import json

import pytest

from addons.decisions import manifest, strictjson
from addons.decisions.manifest import ManifestError

D = ["sha256:" + c * 64 for c in "0123456789abcdef"]
OCI = "application/vnd.oci.image.manifest.v1+json"


def refs(doc: dict | str | bytes) -> list[str]:
    body = doc if isinstance(doc, bytes) else (doc if isinstance(doc, str) else json.dumps(doc))
    return manifest.references(manifest.parse(body.encode() if isinstance(body, str) else body))


def test_an_image_manifest_references_its_config_and_layers_not_its_subject():
    doc = {
        "schemaVersion": 2,
        "mediaType": OCI,
        "config": {"mediaType": "x", "digest": D[0], "size": 1},
        "layers": [{"digest": D[1]}, {"digest": D[2]}],
        "subject": {"digest": D[3]},
    }
    assert refs(doc) == [D[0], D[1], D[2]]


def test_an_index_references_its_children():
    doc = {"manifests": [{"digest": D[4], "platform": {"os": "linux"}}, {"digest": D[5]}]}
    assert refs(doc) == [D[4], D[5]]
    assert manifest.children(manifest.parse(json.dumps(doc).encode())) == [D[4], D[5]]


def test_null_fields_are_empty_as_in_go():
    assert refs({"config": None, "layers": None, "manifests": None}) == []


def test_repeated_references_count_once():
    assert refs({"layers": [{"digest": D[1]}, {"digest": D[1]}]}) == [D[1]]


REFUSED = {
    # What Go would read differently from a plain json.loads.
    "case-variant-field": {"Layers": [{"digest": D[1]}]},
    "upper-case-field": {"LAYERS": [{"digest": D[1]}]},
    "long-s-folds-to-s-in-go": {"layer\u017f": [{"digest": D[1]}]},
    "long-s-in-subject": {"\u017fubject": {"digest": D[1]}},
    "long-s-in-digest": {"blobs": [{"dige\u017ft": D[1]}]},
    "case-variant-beside-canonical": {"layers": [], "Layers": [{"digest": D[1]}]},
    "case-variant-digest": {"layers": [{"Digest": D[1]}]},
    "case-variant-subject": {"Subject": {"digest": D[1]}},
    "case-variant-manifests": {"MANIFESTS": [{"digest": D[1]}]},
}


@pytest.mark.parametrize("doc", REFUSED.values(), ids=REFUSED.keys())
def test_fields_go_would_fold_are_refused(doc):
    with pytest.raises(ManifestError, match="spelled"):
        refs(doc)


@pytest.mark.parametrize(
    "body",
    [
        '{"layers": [], "layers": [{"digest": "D1"}]}'.replace("D1", D[1]),  # Go: the last
        '{"layers": [{"digest": "D1", "digest": "D2"}]}'.replace("D1", D[1]).replace("D2", D[2]),
        '{"annotations": {"a": "1", "a": "2"}}',
    ],
    ids=["top-level", "descriptor", "annotations"],
)
def test_repeated_keys_are_refused(body):
    with pytest.raises(ManifestError, match="repeats"):
        refs(body)


def test_deep_nesting_is_refused_without_recursion():
    for depth in (strictjson.MAX_DEPTH + 1, 5_000, 200_000):
        body = '{"annotations": {"x": ' + "[" * depth + "]" * depth + "}}"
        with pytest.raises(ManifestError, match="deeper"):
            refs(body)
    fine = '{"annotations": {"x": ' + "[" * 50 + "]" * 50 + "}}"
    assert refs(fine) == []


def test_brackets_inside_strings_do_not_count_as_depth():
    body = json.dumps({"annotations": {"x": "[" * 10_000 + '\\"{' * 100}})
    assert refs(body) == []


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[]",
        b'"x"',
        b"",
        json.dumps({"layers": {"digest": D[0]}}).encode(),
        json.dumps({"layers": [{"digest": "sha256:short"}]}).encode(),
        json.dumps({"layers": [{"digest": "SHA256:" + "a" * 64}]}).encode(),
        json.dumps({"layers": [{"digest": "sha384:" + "a" * 96}]}).encode(),
        json.dumps({"manifests": [{}]}).encode(),
        json.dumps({"manifests": ["x"]}).encode(),
        json.dumps({"config": {"digest": 5}}).encode(),
        json.dumps({"config": []}).encode(),
        json.dumps({"subject": {"digest": "nope"}}).encode(),
        b"\xff\xfe{\x00}\x00",  # UTF-16: Python's json would read it, Go would not
        "\ufeff{}".encode(),  # a byte order mark
        b'{"layers": [], "x": "\xff"}',  # invalid UTF-8
        b'{"size": NaN}',
        b'{"size": Infinity}',
        b'{"size": 1' + b"0" * 5000 + b"}",  # Python refuses > 4300 digits
        b'{"layers": []} {}',  # trailing data
    ],
)
def test_malformed_manifests_are_refused(body):
    with pytest.raises(ManifestError):
        refs(body)


def test_a_manifest_over_4_mib_is_refused():
    body = json.dumps({"annotations": {"x": "a" * manifest.MAX_MANIFEST}}).encode()
    with pytest.raises(ManifestError, match="4 MiB"):
        refs(body)


@pytest.mark.parametrize(
    "content_type",
    [
        OCI,
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "Application/VND.OCI.image.manifest.v1+json; charset=utf-8",
    ],
)
def test_manifest_media_types_are_read(content_type):
    assert manifest.read(json.dumps({"layers": [{"digest": D[1]}]}).encode(), content_type) == [
        D[1]
    ]


@pytest.mark.parametrize(
    "content_type",
    [
        "",
        "application/json",
        "application/x-www-form-urlencoded",
        "application/vnd.docker.distribution.manifest.v1+prettyjws",  # schema 1: fsLayers
        "application/vnd.oci.artifact.manifest.v1+json",
    ],
)
def test_other_content_types_are_refused(content_type):
    with pytest.raises(ManifestError, match="Content-Type"):
        manifest.read(b"{}", content_type)


def test_what_an_unreadable_manifest_might_name():
    """gc keeps every digest a manifest it cannot read might name: under any key or spelling,
    escaped or not, and in bytes that are no JSON at all."""
    body = b'{"Layers": [{"digest": "%s"}], "x": {"y": ["%s", "\\u0073ha256:%s"]}}' % (
        D[2].encode(),
        D[3].encode(),
        b"1" * 64,
    )
    assert json.loads(body)["x"]["y"][1] == D[1]  # what Go (and Python) decode it to
    assert manifest.might_name(body) == {D[1], D[2], D[3]}
    sha512 = "sha512:" + "f" * 128
    assert manifest.might_name(b"\xff{" + D[4].encode() + b" " + sha512.encode()) == {D[4], sha512}
    assert manifest.might_name(b"[" * 100_000) == set()
