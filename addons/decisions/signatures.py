"""Cosign signature verification for `[[require_signature]]` (pure: no mitmproxy, I/O injected).

What is verified, and where each format fact comes from (read in sigstore/cosign v3.1.2 and
sigstore/sigstore; no code taken from either):

- Tag scheme (specs/SIGNATURE_SPEC.md "Tag-based Discovery"): the signatures of
  `sha256:<hex>` live in the same repository under the tag `sha256-<hex>.sig`, as one OCI image
  manifest (or Docker v2s2 with COSIGN_DOCKER_MEDIA_TYPES) holding one layer per signature.
- Each signature layer (SIGNATURE_SPEC.md "OCI Image Manifest V1"; pkg/types/media.go;
  pkg/oci/static/signature.go): mediaType `application/vnd.dev.cosign.simplesigning.v1+json`,
  the payload is the layer blob, and the base64 (standard alphabet, padded:
  `base64.StdEncoding` in pkg/oci/internal/signature/layer.go) ASN.1 DER signature is the
  annotation `dev.cosignproject.cosign/signature`.
- Payload (SIGNATURE_SPEC.md "Simple Signing"; sigstore pkg/signature/payload/payload.go):
  `{"critical": {"identity": {"docker-reference": R}, "image": {"docker-manifest-digest": D},
  "type": "cosign container image signature"}, "optional": {...}|null}` as Go's json.Marshal
  writes it (compact). cosign's claim check (pkg/cosign/verifiers.go SimpleClaimVerifier)
  requires D == the image digest and ignores the identity; we also require the type, which
  cosign always writes.
- Algorithm (SIGNATURE_SPEC.md "Signature Schemes"; pkg/signature/keys.go LoadPublicKey uses
  crypto.SHA256): ECDSA P-256, signature over SHA-256 of the payload bytes, DER-encoded
  (sigstore's ECDSA verifier uses Go's ecdsa.VerifyASN1, strict DER; OpenSSL, under
  `cryptography`, also rejects non-canonical DER). Other key types are refused at load: for
  them the hash cosign uses depends on its version and flags (`--signature-digest-algorithm`,
  `LoadDefaultVerifier`), so we could not promise to verify exactly what cosign verifies.
- OCI 1.1 referrers mode (`cosign sign --registry-referrers-mode=oci-1-1`,
  pkg/oci/remote/write.go WriteSignaturesExperimentalOCI; internal/pkg/oci/remote/remote.go):
  the same manifest, pushed by digest, with top-level `artifactType` and `config.mediaType`
  both `application/vnd.dev.cosign.artifact.sig.v1+json` and `subject` = the image
  descriptor. cosign verify finds it with the referrers API filtered by that artifactType.
- Not supported here: cosign v3's default `--new-bundle-format` (a Sigstore bundle referrer
  with a DSSE in-toto statement); clients sign with `--new-bundle-format=false
  --use-signing-config=false --tlog-upload=false` (or cosign v2 `--tlog-upload=false`).

Everything read is hostile: sizes, depth and layer counts are bounded, JSON is strict (UTF-8
only, no duplicate keys, no NaN, no key that Go's case-insensitive decoding would confuse with
one we read), and `verify` never raises: every failure is a Verdict with the reason.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_pem_public_key,
)

from addons.decisions import strictjson
from addons.decisions.manifest import MAX_MANIFEST

SIMPLESIGNING_MEDIA_TYPE = "application/vnd.dev.cosign.simplesigning.v1+json"
SIGNATURE_ANNOTATION = "dev.cosignproject.cosign/signature"
SIG_ARTIFACT_TYPE = "application/vnd.dev.cosign.artifact.sig.v1+json"
PAYLOAD_TYPE = "cosign container image signature"
IMAGE_MANIFEST_TYPES = frozenset(
    {
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    }
)

MAX_PAYLOAD = 64 * 1024  # cosign's payloads are ~250 bytes (plus -a annotations)
MAX_LAYERS = 32  # layers examined per signature manifest
MAX_REFERRERS = 32  # referrer manifests examined per subject
MAX_SIGNATURE_B64 = 1024  # a P-256 DER signature is at most 72 bytes (96 in base64)
MAX_PEM = 16 * 1024

SHA256_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")  # what cosign signs and names its tags by
SIGNATURE_TAG = re.compile(r"sha256-([0-9a-f]{64})\.sig")


class UnsupportedKey(ValueError):
    """A public key we refuse to trust (wrong type, curve or encoding)."""


class Refused(ValueError):
    """Input that fails a check; its message becomes a Verdict reason."""


@dataclass(frozen=True)
class Verdict:
    signed: bool
    reason: str
    # A verdict that depends on a backend failure (a blob that could not be fetched) must not
    # be cached: the next request should try again.
    transient: bool = False


# --- tags and keys -----------------------------------------------------------------------------


def signature_tag(digest: str) -> str:
    """`sha256:<hex>` → `sha256-<hex>.sig`, the tag cosign stores its signatures under."""
    if not SHA256_DIGEST.fullmatch(digest):
        raise ValueError(f"not a sha256 digest: {digest!r:.80}")
    return digest.replace(":", "-", 1) + ".sig"


def signature_tag_subject(tag: str) -> str | None:
    """The digest a `sha256-<hex>.sig` tag names, or None for any other tag."""
    m = SIGNATURE_TAG.fullmatch(tag)
    return f"sha256:{m.group(1)}" if m else None


TrustedKey = ec.EllipticCurvePublicKey


def load_public_key(key: Any) -> TrustedKey:
    """A `cosign.pub` (PKIX `-----BEGIN PUBLIC KEY-----` PEM, str or bytes) or a key object.

    Only ECDSA P-256: see the module docstring for why other algorithms are refused.
    """
    if isinstance(key, str):
        key = key.encode("utf-8")
    if isinstance(key, bytes):
        if len(key) > MAX_PEM:
            raise UnsupportedKey("public key PEM is larger than 16 KiB")
        if b"-----BEGIN PUBLIC KEY-----" not in key:
            raise UnsupportedKey("expected a PEM public key (-----BEGIN PUBLIC KEY-----)")
        try:
            key = load_pem_public_key(key)
        except (ValueError, TypeError) as e:
            raise UnsupportedKey(f"unreadable PEM public key: {e}") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise UnsupportedKey(
            f"{type(key).__name__} keys are not supported: only ECDSA P-256 public keys "
            "(cosign generate-key-pair) can be verified exactly as cosign does"
        )
    if not isinstance(key.curve, ec.SECP256R1):
        raise UnsupportedKey(
            f"ECDSA curve {key.curve.name} is not supported: only P-256 (secp256r1)"
        )
    return key


def load_keys(keys: Iterable[Any]) -> tuple[TrustedKey, ...]:
    """Every key loaded, or UnsupportedKey naming the first refused one (by position)."""
    loaded = []
    for i, key in enumerate(keys):
        try:
            loaded.append(load_public_key(key))
        except UnsupportedKey as e:
            raise UnsupportedKey(f"key #{i + 1}: {e}") from None
    return tuple(loaded)


def strict_json(raw: bytes, limit: int, what: str) -> Any:
    """Parse `raw` as Go's encoding/json would accept it, or raise Refused (strictjson.py)."""
    return strictjson.loads(raw, what, limit=limit, error=Refused)


def _field(obj: Any, key: str, what: str) -> Any:
    """obj[key] from a JSON object, refusing keys Go would also match case-insensitively.

    cosign decodes with Go's encoding/json, which matches field names case-insensitively
    (Unicode simple folding): {"Type": x} or two spellings of one key would be read
    differently by cosign and by us. Such a payload is refused instead of guessed.
    """
    if not isinstance(obj, dict):
        raise Refused(f"{what} is not a JSON object")
    folded = key.casefold()
    for k in obj:
        if k != key and k.casefold() == folded:
            raise Refused(f"{what} has an ambiguous key {k!r:.40}")
    return obj.get(key)


# --- verification ------------------------------------------------------------------------------


def _signature_bytes(layer: dict[str, Any]) -> bytes:
    annotations = layer.get("annotations")
    if not isinstance(annotations, dict):
        raise Refused("no signature annotation")
    b64 = annotations.get(SIGNATURE_ANNOTATION)
    if not isinstance(b64, str) or not b64:
        raise Refused("no signature annotation")
    if len(b64) > MAX_SIGNATURE_B64:
        raise Refused("signature annotation is too long")
    try:
        return base64.b64decode(b64.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error):
        raise Refused("signature annotation is not standard base64") from None


def _payload_descriptor(layer: Any) -> tuple[str, int]:
    if not isinstance(layer, dict):
        raise Refused("layer is not a descriptor")
    if layer.get("mediaType") != SIMPLESIGNING_MEDIA_TYPE:
        raise Refused("layer is not a cosign simple-signing payload")
    digest, size = layer.get("digest"), layer.get("size")
    if not isinstance(digest, str) or not SHA256_DIGEST.fullmatch(digest):
        raise Refused("payload digest is not a sha256 digest")
    if type(size) is not int or not 0 < size <= MAX_PAYLOAD:
        raise Refused(f"payload size is not an integer in 1..{MAX_PAYLOAD}")
    return digest, size


def _check_payload(payload: bytes, subject_digest: str) -> None:
    doc = strict_json(payload, MAX_PAYLOAD, "payload")
    critical = _field(doc, "critical", "payload")
    if _field(critical, "type", "critical") != PAYLOAD_TYPE:
        raise Refused("payload is not a cosign container image signature")
    image = _field(critical, "image", "critical")
    claimed = _field(image, "docker-manifest-digest", "critical.image")
    if claimed != subject_digest:
        raise Refused("signature is for another digest")


def _verifies(keys: tuple[TrustedKey, ...], signature: bytes, payload: bytes) -> bool:
    for key in keys:
        try:
            key.verify(signature, payload, ec.ECDSA(hashes.SHA256()))
            return True
        except InvalidSignature:
            continue
    return False


class _Unavailable(Exception):
    """fetch_blob failed: the verdict is transient."""


def _fetch_payload(
    digest: str, size: int, fetch_blob: Callable[[str], bytes], cache: dict[str, bytes]
) -> bytes:
    if digest not in cache:
        try:
            data = fetch_blob(digest)
        except Exception as e:
            raise _Unavailable(f"payload {digest[:19]}… unavailable: {type(e).__name__}") from None
        if not isinstance(data, bytes | bytearray) or len(data) > MAX_PAYLOAD:
            raise Refused("payload blob is not bytes within the size limit")
        cache[digest] = bytes(data)
    data = cache[digest]
    if len(data) != size or "sha256:" + hashlib.sha256(data).hexdigest() != digest:
        raise Refused("payload blob does not match its descriptor")
    return data


def _check_layer(
    layer: Any,
    subject_digest: str,
    keys: tuple[TrustedKey, ...],
    fetch_blob: Callable[[str], bytes],
    blobs: dict[str, bytes],
) -> None:
    """Return if this layer is a valid signature of subject_digest, else raise Refused."""
    digest, size = _payload_descriptor(layer)
    signature = _signature_bytes(layer)
    payload = _fetch_payload(digest, size, fetch_blob, blobs)
    # The signature first: only a payload a trusted key signed reaches the JSON parser.
    if not _verifies(keys, signature, payload):
        raise Refused("not signed by a trusted key")
    _check_payload(payload, subject_digest)


def _check_manifest_shape(doc: Any, subject_digest: str) -> list[Any]:
    """The layers of a cosign signature manifest (tag or referrers form), or Refused."""
    if not isinstance(doc, dict):
        raise Refused("signature manifest is not a JSON object")
    if doc.get("schemaVersion") != 2 or type(doc.get("schemaVersion")) is not int:
        raise Refused("signature manifest is not schemaVersion 2")
    media_type = doc.get("mediaType")
    if "manifests" in doc or (media_type is not None and media_type not in IMAGE_MANIFEST_TYPES):
        raise Refused("signature manifest is not an image manifest")
    artifact_type = doc.get("artifactType")
    if artifact_type is not None and artifact_type != SIG_ARTIFACT_TYPE:
        raise Refused("artifact is not a cosign signature")
    subject = doc.get("subject")
    if subject is not None:
        # Referrers form: the subject must be this image, and the artifact a cosign signature
        # (artifactType, or config.mediaType where a registry dropped artifactType).
        if not isinstance(subject, dict) or subject.get("digest") != subject_digest:
            raise Refused("signature manifest's subject is another digest")
        config = doc.get("config")
        config_type = config.get("mediaType") if isinstance(config, dict) else None
        if artifact_type is None and config_type != SIG_ARTIFACT_TYPE:
            raise Refused("referrer is not a cosign signature")
    layers = doc.get("layers")
    if not isinstance(layers, list) or not layers:
        raise Refused("signature manifest has no layers")
    return layers


def _verify(
    subject_digest: str,
    signature_manifest: bytes,
    fetch_blob: Callable[[str], bytes],
    keys: Iterable[Any],
) -> Verdict:
    if not isinstance(subject_digest, str) or not SHA256_DIGEST.fullmatch(subject_digest):
        return Verdict(False, "subject is not a sha256 digest")
    trusted = load_keys(keys)
    if not trusted:
        return Verdict(False, "no trusted keys")
    doc = strict_json(signature_manifest, MAX_MANIFEST, "signature manifest")
    layers = _check_manifest_shape(doc, subject_digest)
    reasons: list[str] = []
    unavailable = False
    blobs: dict[str, bytes] = {}
    for layer in layers[:MAX_LAYERS]:
        try:
            _check_layer(layer, subject_digest, trusted, fetch_blob, blobs)
            return Verdict(True, "signed by a trusted key")
        except Refused as e:
            reasons.append(str(e))
        except _Unavailable as e:
            unavailable = True
            reasons.append(str(e))
    if len(layers) > MAX_LAYERS:
        reasons.append(f"only the first {MAX_LAYERS} layers were examined")
    reason = "; ".join(dict.fromkeys(reasons))
    return Verdict(False, reason[:500], transient=unavailable)


def verify(
    subject_digest: str,
    signature_manifest: bytes,
    fetch_blob: Callable[[str], bytes],
    keys: Iterable[Any],
) -> Verdict:
    """Is one layer of this cosign signature manifest a valid signature of subject_digest?

    `fetch_blob(digest) -> bytes` reads a payload blob from the same repository (it may raise;
    that makes a transient verdict). `keys`: loaded keys or PEM strings. Never raises.
    """
    try:
        return _verify(subject_digest, signature_manifest, fetch_blob, keys)
    except (Refused, UnsupportedKey) as e:
        return Verdict(False, str(e)[:500])
    except Exception as e:  # hostile input must never escape as an exception
        return Verdict(False, f"signature check failed: {type(e).__name__}")


def cosign_referrers(referrers_index: bytes) -> list[str]:
    """Digests of cosign signature referrers in a referrers API answer (an OCI index).

    Hostile input: a malformed answer yields no candidates rather than an exception.
    """
    try:
        doc = strict_json(referrers_index, MAX_MANIFEST, "referrers index")
    except Refused:
        return []
    manifests = doc.get("manifests") if isinstance(doc, dict) else None
    if not isinstance(manifests, list):
        return []
    found = []
    for d in manifests:
        if (
            isinstance(d, dict)
            and d.get("artifactType") == SIG_ARTIFACT_TYPE
            and isinstance(d.get("digest"), str)
            and SHA256_DIGEST.fullmatch(d["digest"])
        ):
            found.append(d["digest"])
    # cosign itself reads the last one; we try the most recent MAX_REFERRERS.
    return list(dict.fromkeys(reversed(found)))[:MAX_REFERRERS]


def verify_subject(
    subject_digest: str,
    get_manifest: Callable[[str], bytes | None],
    get_referrers: Callable[[str], bytes | None] | None,
    fetch_blob: Callable[[str], bytes],
    keys: Iterable[Any],
) -> Verdict:
    """Find and check the signatures of subject_digest in one repository. Never raises.

    `get_manifest(reference)` returns a manifest by tag or digest, None when absent;
    `get_referrers(digest)` returns the referrers API answer, None where the backend has no
    referrers API (Distribution 2.8) or nothing refers to the digest. Either may raise for a
    backend failure, which gives a transient verdict.
    """
    if not isinstance(subject_digest, str) or not SHA256_DIGEST.fullmatch(subject_digest):
        return Verdict(False, "subject is not a sha256 digest")
    try:
        trusted = load_keys(keys)
    except UnsupportedKey as e:
        return Verdict(False, str(e))
    candidates = [signature_tag(subject_digest)]
    reasons: list[str] = []
    transient = False
    try:
        if get_referrers is not None:
            answer = get_referrers(subject_digest)
            if answer is not None:
                candidates += cosign_referrers(answer)
    except Exception as e:
        transient = True
        reasons.append(f"referrers unavailable: {type(e).__name__}")
    for reference in candidates:
        try:
            body = get_manifest(reference)
        except Exception as e:
            transient = True
            reasons.append(f"signature manifest unavailable: {type(e).__name__}")
            continue
        if body is None:
            continue
        verdict = verify(subject_digest, body, fetch_blob, trusted)
        if verdict.signed:
            return verdict
        transient = transient or verdict.transient
        reasons.append(verdict.reason)
    if not reasons:
        return Verdict(False, "no cosign signature found")
    return Verdict(False, "; ".join(dict.fromkeys(reasons))[:500], transient=transient)


# Layer media types of what is attached to an image rather than run: cosign signatures and
# attachments, Sigstore bundles, DSSE/in-toto attestations, SPDX and CycloneDX SBOMs. An
# allow-list: anything else (a filesystem layer, a Wasm component, a type nobody knows yet)
# is content a `[[require_signature]]` rule must cover, not an exempt attachment. A label
# only narrows the candidates: podman 4.3 unpacks every layer of an OCI manifest with the
# image config type whatever the layer's type (a tar+gzip labelled a cosign signature, or
# `application/x-anything`; tested), and cosign's own tag-form signatures carry that config
# type, so neither the config nor the layer types can tell: the bytes do
# (attachment_document). containerd and moby refuse or skip these layer types.
ATTACHMENT_LAYER = re.compile(
    r"application/vnd\.dev\.cosign\.[a-z0-9.+-]+"
    r"|application/vnd\.dev\.sigstore\.bundle(?:\.v[0-9.]+)?\+json(?:;version=[0-9.]+)?"
    r"|application/vnd\.dsse\.envelope\.v1\+json"
    r"|application/vnd\.in-toto\+json"
    r"|application/spdx\+json|text/spdx"
    r"|application/vnd\.cyclonedx(?:\+json|\+xml)?"
)
MAX_ATTACHMENT = 1024 * 1024  # one attachment layer read to decide an exemption
MAX_ATTACHMENTS = 4 * 1024 * 1024  # all the layers of one manifest
# The keys of an attachment manifest (OCI image manifest, Docker v2 schema 2) and of its layer
# descriptors. Anything else is refused rather than interpreted: `manifests` (an index: its
# children are what a client runs), `fsLayers` (a schema 1 reading of the same bytes),
# `urls` (a layer fetched from elsewhere), `data` (a layer embedded in the descriptor).
_MANIFEST_KEYS = frozenset(
    {"schemaVersion", "mediaType", "artifactType", "config", "layers", "subject", "annotations"}
)
_LAYER_KEYS = frozenset({"mediaType", "digest", "size", "annotations", "artifactType"})
# What containers/storage, containerd and moby detect and decompress before untarring, by
# magic number (containers/image pkg/compression): gzip, bzip2, xz, zstd (and its skippable
# frames). A document starting with one of these is taken for a compressed layer.
_COMPRESSED = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00", b"\x28\xb5\x2f\xfd")
_TAR_BLOCK = 512


def _go_octal(field: bytes) -> int | None:
    """Go's archive/tar parseOctal: trimmed of spaces and NULs, cut at a NUL, octal or ""."""
    text = field.strip(b" \x00").split(b"\x00", 1)[0]
    if not text:
        return 0
    return int(text, 8) if re.fullmatch(rb"[0-7]{1,22}", text) else None


def _python_octal(field: bytes) -> int | None:
    """Python's tarfile nti (more lenient: any whitespace, `+`, `_`): a second opinion."""
    try:
        return int(field.split(b"\x00", 1)[0].decode("ascii").strip() or "0", 8)
    except (UnicodeDecodeError, ValueError):
        return None


def tar_header(block: bytes) -> bool:
    """Could a tar reader take the first 512 bytes of `block` for a header? Go's archive/tar
    (podman, containerd and moby all unpack with it) does when the checksum field holds the
    unsigned or signed byte sum of the block, that field counted as spaces. Read as Go and as
    Python read it, and a base-256 field is taken for a match: when in doubt, it is a tar.
    Fewer than 512 bytes are no header (Go reads a whole block first; a short one is an
    error; zero bytes are an empty archive, see unpackable)."""
    if len(block) < _TAR_BLOCK:
        return False
    b = block[:_TAR_BLOCK]
    field = b[148:156]
    if field[0] in (0x80, 0xFF):
        return True
    rest = b[:148] + b" " * 8 + b[156:]
    sums = {sum(rest), sum(x - 256 if x > 127 else x for x in rest)}
    return bool({_go_octal(field), _python_octal(field)} & sums)


def unpackable(data: bytes) -> bool:
    """Could a container runtime unpack these bytes as a layer? Empty (an empty archive),
    compressed (by magic number, whatever the label) or a tar header: yes."""
    if not data or data.startswith(_COMPRESSED):
        return True
    if data[0] & 0xF0 == 0x50 and data[1:4] == b"\x2a\x4d\x18":  # zstd skippable frame
        return True
    return tar_header(data)


def _json_type(media_type: str) -> bool:
    base = media_type.split(";", 1)[0]
    return base.endswith("+json") or base.startswith("application/vnd.dev.cosign.")


def _simple_signing(payload: bytes) -> None:
    """A cosign simple-signing payload, or Refused (checked before any signature is)."""
    doc = strict_json(payload, MAX_PAYLOAD, "payload")
    critical = _field(doc, "critical", "payload")
    if _field(critical, "type", "critical") != PAYLOAD_TYPE:
        raise Refused("payload is not a cosign container image signature")
    image = _field(critical, "image", "critical")
    claimed = _field(image, "docker-manifest-digest", "critical.image")
    if not isinstance(claimed, str) or not SHA256_DIGEST.fullmatch(claimed):
        raise Refused("payload names no sha256 digest")


def attachment_document(media_type: str, data: bytes) -> bool:
    """Are these bytes the document their attachment label claims, and nothing a runtime can
    unpack? A cosign simple-signing payload (small, the simple-signing JSON), another JSON
    attachment (a JSON object), or text (SPDX tag-value, CycloneDX XML: UTF-8, no control
    characters but tab and newlines); never empty, compressed or a tar archive."""
    if unpackable(data):
        return False
    try:
        if media_type == SIMPLESIGNING_MEDIA_TYPE:
            if data[:1] != b"{":
                return False
            _simple_signing(data)
        elif _json_type(media_type):
            if data[:1] != b"{" or not isinstance(
                strict_json(data, MAX_ATTACHMENT, "attachment"), dict
            ):
                return False
        else:
            text = data.decode("utf-8")
            if re.search(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]", text):
                return False
    except (Refused, UnicodeDecodeError):
        return False
    return True


def attachment_layers(manifest: bytes) -> list[tuple[str, str, int]] | None:
    """(mediaType, digest, size) of each layer of a manifest shaped like an attachment (a
    signature, attestation or SBOM), or None: the manifest needs a signature.

    Only labels and shape, which the bytes must then confirm (exempt_from_signature): an image
    manifest (OCI or Docker v2 schema 2, `mediaType` present: no guessing) with known keys
    only, 1..MAX_LAYERS layers, each of an ATTACHMENT_LAYER type, a sha256 digest and a size
    the payloads' limits allow. Indexes and manifest lists are never exempt: their children
    are what a client runs."""
    try:
        doc = strict_json(manifest, MAX_MANIFEST, "manifest")
    except Refused:
        return None
    if not isinstance(doc, dict) or not doc.keys() <= _MANIFEST_KEYS:
        return None
    if type(doc.get("schemaVersion")) is not int or doc["schemaVersion"] != 2:
        return None
    if doc.get("mediaType") not in IMAGE_MANIFEST_TYPES:
        return None
    config, layers = doc.get("config"), doc.get("layers")
    if not isinstance(config, dict) or not isinstance(layers, list):
        return None
    if not 1 <= len(layers) <= MAX_LAYERS:
        return None
    found, total = [], 0
    for layer in layers:
        if not isinstance(layer, dict) or not layer.keys() <= _LAYER_KEYS:
            return None
        media_type, digest, size = layer.get("mediaType"), layer.get("digest"), layer.get("size")
        if not isinstance(media_type, str) or not ATTACHMENT_LAYER.fullmatch(media_type):
            return None
        if not isinstance(digest, str) or not SHA256_DIGEST.fullmatch(digest):
            return None
        limit = MAX_PAYLOAD if media_type == SIMPLESIGNING_MEDIA_TYPE else MAX_ATTACHMENT
        if type(size) is not int or not 0 < size <= limit:
            return None
        total += size
        found.append((media_type, digest, size))
    return found if total <= MAX_ATTACHMENTS else None


def exempt_from_signature(manifest: bytes, fetch_blob: Callable[[str, int], bytes | None]) -> bool:
    """May this manifest be served without a signature, as a signature or other attachment?

    Decided on content, never on a label alone: not the tag name, not `subject`, not
    `artifactType`, not the config's or the layers' media types (a runtime unpacks any layer
    it can, whatever it is called). Exempt only when attachment_layers accepts the shape and
    every layer's bytes, read through `fetch_blob(digest, size)` (None: absent or larger than
    `size`), match their digest and are the document their type claims and nothing a
    runtime can unpack (attachment_document). Where the bytes cannot be had, the answer is
    no: the manifest needs a signature. `fetch_blob` may raise for a backend failure; that
    propagates (the caller answers 503 rather than guess).
    """
    layers = attachment_layers(manifest)
    if layers is None:
        return False
    seen: dict[str, bytes | None] = {}
    for media_type, digest, size in layers:
        if digest not in seen:
            seen[digest] = fetch_blob(digest, size)
        data = seen[digest]
        if data is None or len(data) != size:
            return False
        if "sha256:" + hashlib.sha256(data).hexdigest() != digest:
            return False
        if not attachment_document(media_type, data):
            return False
    return True


def affected_subjects(reference: str, manifest: bytes | None) -> set[str]:
    """Digests whose verdict a push or delete of this manifest can change (for invalidation).

    A `sha256-<hex>.sig` tag names its subject; a referrer names it in `subject`. A delete by
    digest has no body at hand: callers without it should clear the cache instead.
    """
    found = set()
    tag_subject = signature_tag_subject(reference) if isinstance(reference, str) else None
    if tag_subject:
        found.add(tag_subject)
    if manifest is not None:
        try:
            doc = strict_json(manifest, MAX_MANIFEST, "manifest")
        except Refused:
            return found
        subject = doc.get("subject") if isinstance(doc, dict) else None
        digest = subject.get("digest") if isinstance(subject, dict) else None
        if isinstance(digest, str) and SHA256_DIGEST.fullmatch(digest):
            found.add(digest)
    return found


# --- the verdict cache -------------------------------------------------------------------------


class VerdictCache:
    """Verdicts per (digest, scope), bounded (LRU) and expiring.

    `scope` separates verdicts that differ for one digest: the repository the signature was
    looked up in and the rule's key set (e.g. a hash of the key PEMs). Entries expire after
    `ttl` seconds (`negative_ttl` for "not signed"), so a key rotation in the policy, or a
    signature pushed through another gateway worker, takes effect without invalidation.
    Transient verdicts are never stored. Thread-safe; `clock` is injectable for tests.
    """

    def __init__(
        self,
        max_entries: int = 10_000,
        ttl: float = 300.0,
        negative_ttl: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_entries < 1 or ttl < 0 or negative_ttl < 0:
            raise ValueError("max_entries must be >= 1 and the TTLs >= 0")
        self.max_entries, self.ttl, self.negative_ttl = max_entries, ttl, negative_ttl
        self._clock = clock
        self._entries: OrderedDict[tuple[str, Hashable], tuple[float, Verdict]] = OrderedDict()
        self._by_digest: dict[str, set[Hashable]] = {}
        self._lock = threading.Lock()

    def get(self, digest: str, scope: Hashable = "") -> Verdict | None:
        key = (digest, scope)
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            expires, verdict = entry
            if self._clock() >= expires:
                self._drop(key)
                return None
            self._entries.move_to_end(key)
            return verdict

    def put(self, digest: str, verdict: Verdict, scope: Hashable = "") -> None:
        if verdict.transient:
            return
        ttl = self.ttl if verdict.signed else self.negative_ttl
        key = (digest, scope)
        with self._lock:
            self._entries[key] = (self._clock() + ttl, verdict)
            self._entries.move_to_end(key)
            self._by_digest.setdefault(digest, set()).add(scope)
            while len(self._entries) > self.max_entries:
                self._drop(next(iter(self._entries)))

    def invalidate(self, digest: str) -> None:
        """Forget every verdict about `digest` (a signature of it was pushed or deleted)."""
        with self._lock:
            for scope in list(self._by_digest.get(digest, ())):
                self._drop((digest, scope))

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._by_digest.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def _drop(self, key: tuple[str, Hashable]) -> None:
        self._entries.pop(key, None)
        scopes = self._by_digest.get(key[0])
        if scopes is not None:
            scopes.discard(key[1])
            if not scopes:
                del self._by_digest[key[0]]


def key_scope(keys: Iterable[TrustedKey], repository: str = "") -> Hashable:
    """A cache scope for one repository and key set (DER of the keys, order-independent)."""
    ders = sorted(k.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo) for k in keys)
    return (repository, hashlib.sha256(b"".join(ders)).hexdigest())
