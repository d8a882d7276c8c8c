"""Real images for real clients: OCI image layouts built from bytes, no Docker needed."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def layer(files: dict[str, bytes]) -> tuple[bytes, bytes]:
    """(gzipped tar, uncompressed tar) with fixed metadata, so the digest is reproducible."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, content in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(content), 0, 0o644
            tar.addfile(info, io.BytesIO(content))
    return gzip.compress(raw.getvalue(), mtime=0), raw.getvalue()


def oci_layout(path: Path, tag: str, layer_sizes: tuple[int, ...] = (4096, 300_000)) -> dict:
    """Write an OCI image layout with random layers; return its manifest and blobs."""
    blobs_dir = path / "blobs" / "sha256"
    blobs_dir.mkdir(parents=True, exist_ok=True)
    blobs: dict[str, bytes] = {}

    def put(data: bytes) -> str:
        d = digest(data)
        (blobs_dir / d.removeprefix("sha256:")).write_bytes(data)
        blobs[d] = data
        return d

    layers, diff_ids = [], []
    for i, size in enumerate(layer_sizes):
        gz, raw = layer({f"data/file{i}.bin": os.urandom(size)})
        layers.append(
            {
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": put(gz),
                "size": len(gz),
            }
        )
        diff_ids.append(digest(raw))
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        }
    ).encode()
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": put(config),
            "size": len(config),
        },
        "layers": layers,
    }
    manifest_bytes = json.dumps(manifest).encode()
    manifest_digest = put(manifest_bytes)
    (path / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": OCI_MANIFEST,
                "digest": manifest_digest,
                "size": len(manifest_bytes),
                "annotations": {"org.opencontainers.image.ref.name": tag},
            }
        ],
    }
    (path / "index.json").write_text(json.dumps(index))
    return {"manifest": manifest, "digest": manifest_digest, "blobs": blobs}


def layout_blobs(path: Path) -> dict[str, bytes]:
    """Every blob of an OCI layout (or files of a skopeo `dir:`), by digest."""
    out = {}
    for f in (path / "blobs" / "sha256").iterdir():
        out["sha256:" + f.name] = f.read_bytes()
    return out


def oci_index_layout(path: Path, tag: str, platforms: tuple[str, ...] = ("amd64", "arm64")) -> dict:
    """An OCI layout whose tag points at an image index with one image per platform."""
    blobs: dict[str, bytes] = {}
    entries = []
    for arch in platforms:
        image = oci_layout(path, f"{tag}-{arch}", layer_sizes=(2048,))
        blobs.update(image["blobs"])
        raw = image["blobs"][image["digest"]]
        entries.append(
            {
                "mediaType": OCI_MANIFEST,
                "digest": image["digest"],
                "size": len(raw),
                "platform": {"architecture": arch, "os": "linux"},
            }
        )
    index = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": entries,
        }
    ).encode()
    index_digest = digest(index)
    (path / "blobs" / "sha256" / index_digest.removeprefix("sha256:")).write_bytes(index)
    blobs[index_digest] = index
    top = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.index.v1+json",
                "digest": index_digest,
                "size": len(index),
                "annotations": {"org.opencontainers.image.ref.name": tag},
            }
        ],
    }
    (path / "index.json").write_text(json.dumps(top))
    return {"digest": index_digest, "blobs": blobs}


def image_manifest(config: tuple[str, int], layers: list[tuple[str, int]]) -> bytes:
    """An OCI image manifest from (digest, size) pairs."""
    return json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": config[0],
                "size": config[1],
            },
            "layers": [
                {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d, "size": n}
                for d, n in layers
            ],
        }
    ).encode()
