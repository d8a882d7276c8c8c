"""Manifests read exactly the way the Go backend reads them, or refused. Pure.

The isolation ledger decides on the digests a manifest references; the backend (Go's
encoding/json into image-spec structs) decides what it links. Where the two readings could
differ, the manifest is refused (400 MANIFEST_INVALID) instead of guessed at:

- Go matches JSON keys to struct fields case-insensitively (Unicode simple folding: `Layers`,
  `LAYERS`, even `layer\u017f` fill `layers`) and keeps the last of duplicate keys. A struct-level
  key (of the manifest or a descriptor) must therefore be spelled exactly as the spec does, and
  no object may repeat a key.
- Python would recurse without bound (RecursionError), Go stops at 10 000 levels: nesting
  deeper than MAX_DEPTH is refused before parsing, in one linear scan.
- Python's json accepts UTF-16/32 and NaN/Infinity, Go does not; Go replaces invalid UTF-8
  where Python fails. Only strict UTF-8 JSON without a BOM passes.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

from addons.decisions import strictjson
from addons.decisions.routes import DIGEST, is_digest

MAX_MANIFEST = 4 * 1024 * 1024  # Distribution's and Zot's own manifest size limit
MAX_DESCRIPTORS = 10_000

# The media types a manifest PUT may carry: what Zot and Distribution store as manifests.
MEDIA_TYPES = frozenset(
    {
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
    }
)
INDEX_TYPES = frozenset(
    {
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
    }
)

# Field names of the Go structs a manifest and its descriptors decode into (image-spec v1.1,
# Docker schema 2, the OCI artifact manifest): a key that folds to one of these must be
# spelled exactly so.
_MANIFEST_FIELDS = (
    "schemaVersion",
    "mediaType",
    "artifactType",
    "config",
    "layers",
    "manifests",
    "blobs",
    "subject",
    "annotations",
)
_DESCRIPTOR_FIELDS = (
    "mediaType",
    "artifactType",
    "digest",
    "size",
    "urls",
    "annotations",
    "data",
    "platform",
)
_REFERENCING = ("config", "layers", "manifests", "blobs")  # `subject` grants nothing: see below


class ManifestError(ValueError):
    """Not a manifest the gateway can read exactly as the backend would (MANIFEST_INVALID)."""


def digest_of(body: bytes) -> str:
    return "sha256:" + hashlib.sha256(body).hexdigest()


def media_type(content_type: str) -> str:
    """`application/vnd.oci.image.manifest.v1+json; charset=utf-8` → the bare type, lower."""
    return content_type.split(";", 1)[0].strip().lower()


def parse(body: bytes) -> dict[str, Any]:
    """The manifest as a JSON object, read strictly. Raises ManifestError."""
    if len(body) > MAX_MANIFEST:
        raise ManifestError("manifest larger than 4 MiB")
    doc = strictjson.loads(body, "manifest", limit=MAX_MANIFEST, error=ManifestError)
    if not isinstance(doc, dict):
        raise ManifestError("manifest is not a JSON object")
    _check_spelling(doc, _MANIFEST_FIELDS, "manifest")
    return doc


def _check_spelling(obj: dict[str, Any], fields: tuple[str, ...], what: str) -> None:
    folded = {f.casefold(): f for f in fields}
    for key in obj:
        canonical = folded.get(key.casefold())
        if canonical is not None and key != canonical:
            raise ManifestError(f"{what} key {key[:40]!r} must be spelled {canonical!r}")


def _descriptors(doc: dict[str, Any], key: str) -> list[dict[str, Any]]:
    value = doc.get(key)
    if value is None:  # absent or null: Go leaves the field empty
        return []
    items = [value] if key in ("config", "subject") else value
    if not isinstance(items, list) or not all(isinstance(d, dict) for d in items):
        raise ManifestError(f"manifest {key} is not a descriptor list")
    for d in items:
        _check_spelling(d, _DESCRIPTOR_FIELDS, "descriptor")
    return items


def _digest(descriptor: dict[str, Any]) -> str:
    digest = descriptor.get("digest")
    if not isinstance(digest, str) or not is_digest(digest):
        raise ManifestError(f"manifest references an invalid digest {digest!r:.80}")
    return digest


def references(doc: dict[str, Any]) -> list[str]:
    """Digests a manifest or index references: config, layers, blobs, child manifests.

    `subject` is not among them: it points at another manifest, which the tenant must already
    see for its own reasons; claiming it here would grant it. It is still read (spelling,
    digest grammar) so that a malformed one is refused rather than passed on.
    """
    named = _named(doc)
    refs = [d for key in _REFERENCING for d in named[key]]
    if len(refs) > MAX_DESCRIPTORS:
        raise ManifestError("manifest references too many blobs")
    return list(dict.fromkeys(refs))


def _named(doc: dict[str, Any]) -> dict[str, list[str]]:
    """The digests of each descriptor field (`_REFERENCING`, then `subject`), read and checked
    in that order: the one reading of a manifest's descriptors (`references`, `parts`)."""
    return {key: [_digest(d) for d in _descriptors(doc, key)] for key in (*_REFERENCING, "subject")}


def children(doc: dict[str, Any]) -> list[str]:
    """Digests of an index's child manifests."""
    return [_digest(d) for d in _descriptors(doc, "manifests")]


@dataclass(frozen=True)
class Parts:
    """What a manifest is made of, as `parts` reads it."""

    kind: str  # "index" | "image" | "other"
    children: tuple[str, ...]  # child manifests (an index's `manifests`)
    blobs: tuple[str, ...]  # config, layers, an artifact's blobs
    subject: str | None


def parts(doc: dict[str, Any]) -> Parts:
    """A parsed manifest (`parse`) split into what it is made of, read exactly as
    `references` reads it (garbage collection's snapshot: what a kept manifest keeps).
    Raises ManifestError."""
    named = _named(doc)
    kind = doc.get("mediaType")
    is_index = "manifests" in doc or (isinstance(kind, str) and kind in INDEX_TYPES)
    return Parts(
        kind="index" if is_index else ("image" if "layers" in doc else "other"),
        children=tuple(named["manifests"]),
        blobs=tuple(named["config"] + named["layers"] + named["blobs"]),
        subject=named["subject"][0] if named["subject"] else None,
    )


def read(body: bytes, content_type: str) -> list[str]:
    """A manifest PUT: check its media type and return what it references."""
    if media_type(content_type) not in MEDIA_TYPES:
        raise ManifestError("Content-Type is not an OCI or Docker manifest media type")
    return references(parse(body))


# --- manifests the backend already holds -------------------------------------------------------
# Read leniently, for what they are made of (immutable tags protect it, GC reports its sizes):
# never to grant anything. A manifest PUT is read strictly, above (`parse`, `references`).


def made_of(doc: object) -> tuple[list[str], list[str]]:
    """(child manifests, blobs) a manifest names: an index's `manifests`; an image's `config`
    and `layers`; an artifact's `blobs`; schema 1's `fsLayers`. Never `subject`: that is
    what this manifest refers to, not what it is made of. Only digests in the registry's
    grammar: nothing else can be deleted through the gateway anyway."""
    if not isinstance(doc, dict):
        raise ValueError("a manifest is a JSON object")

    def digests(items: object, key: str = "digest") -> list[str]:
        found = []
        for item in items if isinstance(items, list) else []:
            value = item.get(key) if isinstance(item, dict) else None
            if isinstance(value, str) and is_digest(value):
                found.append(value)
        return found

    blobs = digests([doc.get("config")]) + digests(doc.get("layers")) + digests(doc.get("blobs"))
    blobs += digests(doc.get("fsLayers"), "blobSum")
    return digests(doc.get("manifests")), blobs


_ANY_DIGEST = re.compile(DIGEST)


def might_name(body: bytes) -> set[str]:
    """Every digest a manifest that `parse` refuses might name, for garbage collection to
    keep (failing closed): each digest-shaped run in its bytes, and in its JSON strings as
    they decode (an escaped `\\u0073ha256:…` is a digest to Go). Whatever key or nesting
    names it: Go may read a key this module refuses to guess at."""
    texts = [body.decode("utf-8", "replace")]
    try:
        stack = [json.loads(body)]
    except (ValueError, RecursionError):
        stack = []
    while stack:
        node = stack.pop()
        if isinstance(node, str):
            texts.append(node)
        elif isinstance(node, dict):
            texts.extend(node)
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return {m[0] for text in texts for m in _ANY_DIGEST.finditer(text)}


def own_digests(body: bytes) -> set[str]:
    """A manifest's own names: the backend may know it by either algorithm."""
    return {
        f"sha256:{hashlib.sha256(body).hexdigest()}",
        f"sha512:{hashlib.sha512(body).hexdigest()}",
    }


def descriptor_sizes(body: bytes) -> dict[str, int]:
    """digest → size of the descriptors a manifest names (config, layers, blobs, children)."""
    try:
        doc = json.loads(body)
    except ValueError:
        return {}
    out: dict[str, int] = {}
    if not isinstance(doc, dict):
        return out
    for key in ("config", "layers", "blobs", "manifests"):
        items = doc.get(key)
        for d in items if isinstance(items, list) else [items]:
            if isinstance(d, dict) and isinstance(d.get("digest"), str):
                size = d.get("size")
                if type(size) is int and size >= 0:
                    out[d["digest"]] = size
    return out
