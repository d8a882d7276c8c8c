"""Cosign signatures made the way cosign makes them, with keys the tests generate.

Formats (sigstore/cosign specs/SIGNATURE_SPEC.md, pkg/oci/remote/write.go; sigstore
pkg/signature/payload/payload.go): the payload is Go's compact json.Marshal of the simple
signing struct; the signature is ECDSA P-256 over SHA-256 of the payload, ASN.1 DER, base64
(standard alphabet) in the layer annotation `dev.cosignproject.cosign/signature`. The public
key is what `cosign generate-key-pair` writes to cosign.pub: a PKIX `PUBLIC KEY` PEM.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from tests.support.images import digest

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
SIMPLESIGNING = "application/vnd.dev.cosign.simplesigning.v1+json"
SIG_ARTIFACT = "application/vnd.dev.cosign.artifact.sig.v1+json"
ANNOTATION = "dev.cosignproject.cosign/signature"


def go_json(value: object) -> bytes:
    """Go's json.Marshal: compact, UTF-8, with <, > and & escaped."""
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026").encode()


def payload(subject: str, reference: str = "registry.test/acme/app", optional=None) -> bytes:
    """The simple signing payload cosign signs (field order of the Go structs)."""
    return go_json(
        {
            "critical": {
                "identity": {"docker-reference": reference},
                "image": {"docker-manifest-digest": subject},
                "type": "cosign container image signature",
            },
            "optional": optional,
        }
    )


@dataclass
class Signer:
    key: ec.EllipticCurvePrivateKey = field(
        default_factory=lambda: ec.generate_private_key(ec.SECP256R1())
    )

    @property
    def public_pem(self) -> str:
        """cosign.pub"""
        return (
            self.key.public_key()
            .public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
            .decode()
        )

    def sign(self, data: bytes) -> str:
        return base64.b64encode(self.key.sign(data, ec.ECDSA(hashes.SHA256()))).decode()


@dataclass
class Signature:
    """A signature manifest and the blobs it references (payloads and config)."""

    manifest: bytes
    blobs: dict[str, bytes]
    media_type: str

    @property
    def digest(self) -> str:
        return digest(self.manifest)


def layer(payload_bytes: bytes, b64sig: str, **extra_annotations: str) -> dict:
    return {
        "mediaType": SIMPLESIGNING,
        "size": len(payload_bytes),
        "digest": digest(payload_bytes),
        "annotations": {ANNOTATION: b64sig, **extra_annotations},
    }


def signature_manifest(
    layers: list[tuple[bytes, dict]],
    *,
    subject: dict | None = None,
    docker: bool = False,
) -> Signature:
    """Tag form (`sha256-<hex>.sig`), or with `subject` the OCI 1.1 referrers form.

    `layers` = [(payload bytes, layer descriptor)]. The config is shaped like the one
    go-containerregistry writes for cosign's empty image (contents are not verified).
    """
    diff_ids = [d["digest"] for _, d in layers]
    config = go_json(
        {
            "architecture": "",
            "created": "0001-01-01T00:00:00Z",
            "history": [{"created": "0001-01-01T00:00:00Z"}],
            "os": "",
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "config": {},
        }
    )
    media_type = DOCKER_MANIFEST if docker else OCI_MANIFEST
    config_type = (
        "application/vnd.docker.container.image.v1+json"
        if docker
        else "application/vnd.oci.image.config.v1+json"
    )
    doc: dict = {"schemaVersion": 2, "mediaType": media_type}
    if subject is not None:
        config_type = SIG_ARTIFACT
    doc["config"] = {"mediaType": config_type, "size": len(config), "digest": digest(config)}
    doc["layers"] = [d for _, d in layers]
    if subject is not None:
        doc["subject"] = subject
        doc["artifactType"] = SIG_ARTIFACT
    blobs = {digest(config): config} | {d["digest"]: p for p, d in layers}
    return Signature(go_json(doc), blobs, media_type)


def sign(
    signer: Signer,
    subject: str,
    *,
    referrer_of: dict | None = None,
    docker: bool = False,
) -> Signature:
    """What `cosign sign --key` pushes for `subject` (with referrer_of: the OCI 1.1 form,
    whose value is the subject's descriptor {mediaType, size, digest})."""
    p = payload(subject)
    return signature_manifest([(p, layer(p, signer.sign(p)))], subject=referrer_of, docker=docker)


def tar_polyglot(subject: str) -> bytes:
    """A hostile simple-signing payload that is also a tar archive: its first 512 bytes are a
    v7 tar header (the name is the JSON's start, the numeric fields sit inside the
    docker-reference string) for one file holding the rest of the JSON. Valid JSON, valid
    claim, and a layer Go's archive/tar (and Python's tarfile) unpacks."""
    head = b'{"critical":{"identity":{"docker-reference":"'
    block = bytearray(head + b"a" * (512 - len(head)))
    block[100:156] = b"0000755 0000000 0000000 SIZE_HERE__ 00000000000         "
    block[156:157] = b"0"
    block[329:345] = b"0000000 0000000 "  # devmajor, devminor: Python's tarfile parses them
    tail = payload(subject).split(b'"},', 1)[1]  # "image": … to the end
    doc = bytes(block) + b'"},' + tail
    doc += b" " * (-len(doc) % 512)
    block[124:136] = b"%011o " % (len(doc) - 512)
    block[148:156] = b"%06o\x20\x20" % sum(bytes(block[:148]) + b" " * 8 + bytes(block[156:]))
    return bytes(block) + doc[512:]
