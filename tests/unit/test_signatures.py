"""decisions/signatures.py: cosign signatures built as cosign builds them (support/cosign.py)."""

from __future__ import annotations

import base64
import io
import json
import os
import tarfile

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from addons.decisions import signatures as sig
from addons.decisions.signatures import Verdict, VerdictCache
from tests.support import cosign, images
from tests.support.images import digest

SUBJECT = digest(b"an image manifest")
OTHER = digest(b"another image manifest")
SUBJECT_DESC = {"mediaType": cosign.OCI_MANIFEST, "size": 17, "digest": SUBJECT}


@pytest.fixture(scope="module")
def signer() -> cosign.Signer:
    return cosign.Signer()


def fetcher(*signatures: cosign.Signature, extra: dict[str, bytes] | None = None):
    blobs: dict[str, bytes] = {}
    for s in signatures:
        blobs |= s.blobs
    blobs |= extra or {}

    def fetch(d: str) -> bytes:
        return blobs[d]

    return fetch


def check(signer, s: cosign.Signature, subject: str = SUBJECT, keys=None, fetch=None) -> Verdict:
    return sig.verify(subject, s.manifest, fetch or fetcher(s), keys or [signer.public_pem])


# --- tags and keys -----------------------------------------------------------------------------


def test_signature_tag_round_trip():
    assert sig.signature_tag(SUBJECT) == SUBJECT.replace("sha256:", "sha256-") + ".sig"
    assert sig.signature_tag_subject(sig.signature_tag(SUBJECT)) == SUBJECT
    for tag in ("latest", "sha256-abc.sig", SUBJECT.replace(":", "-") + ".att", "x.sig"):
        assert sig.signature_tag_subject(tag) is None
    with pytest.raises(ValueError):
        sig.signature_tag("sha256:XYZ")


def test_cosign_pub_loads(signer):
    key = sig.load_public_key(signer.public_pem)
    assert isinstance(key.curve, ec.SECP256R1)
    assert sig.load_public_key(signer.public_pem.encode()) is not None
    assert sig.load_public_key(signer.key.public_key()) is not None


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: ec.generate_private_key(ec.SECP384R1()).public_key(), "secp384r1"),
        (lambda: ed25519.Ed25519PrivateKey.generate().public_key(), "Ed25519"),
        (lambda: rsa.generate_private_key(65537, 2048).public_key(), "RSA"),
    ],
)
def test_other_key_types_refused_at_load(make, message):
    pem = make().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo).decode()
    with pytest.raises(sig.UnsupportedKey, match=message):
        sig.load_public_key(pem)
    with pytest.raises(sig.UnsupportedKey, match="key #2"):
        sig.load_keys([cosign.Signer().public_pem, pem])


@pytest.mark.parametrize(
    "pem",
    [
        "",
        "not a key",
        "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n",
        "-----BEGIN PUBLIC KEY-----\n" + "A" * 20_000 + "\n-----END PUBLIC KEY-----\n",
    ],
)
def test_garbage_keys_refused(pem):
    with pytest.raises(sig.UnsupportedKey):
        sig.load_public_key(pem)


def test_unsupported_key_in_verify_is_a_verdict(signer):
    rsa_pem = (
        rsa.generate_private_key(65537, 2048)
        .public_key()
        .public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    v = check(signer, cosign.sign(signer, SUBJECT), keys=[rsa_pem])
    assert not v.signed and "RSA" in v.reason


# --- the verdicts the contract names ------------------------------------------------------------


def test_valid_signature(signer):
    v = check(signer, cosign.sign(signer, SUBJECT))
    assert v == Verdict(True, "signed by a trusted key")


def test_docker_v2s2_signature_manifest(signer):
    assert check(signer, cosign.sign(signer, SUBJECT, docker=True)).signed


def test_payload_golden_shape():
    """The exact bytes cosign signs (Go json.Marshal of sigstore's SimpleContainerImage); the
    same shape as cosign's own expectation in pkg/cosign/obsolete_test.go (v3.1.2)."""
    assert cosign.payload(SUBJECT, "r.test/a/b") == (
        b'{"critical":{"identity":{"docker-reference":"r.test/a/b"},"image":'
        b'{"docker-manifest-digest":"' + SUBJECT.encode() + b'"},"type":'
        b'"cosign container image signature"},"optional":null}'
    )


def test_tampered_payload_blob(signer):
    s = cosign.sign(signer, SUBJECT)
    (payload_digest,) = [d for d, b in s.blobs.items() if b.startswith(b'{"critical"')]
    tampered = s.blobs[payload_digest].replace(b"acme", b"evil")
    v = check(signer, s, fetch=fetcher(s, extra={payload_digest: tampered}))
    assert not v.signed and "does not match its descriptor" in v.reason


def test_tampered_payload_with_recomputed_descriptor(signer):
    """An attacker who rewrites the payload and its descriptor still lacks the signature."""
    p = cosign.payload(SUBJECT)
    good = signer.sign(p)
    evil = cosign.payload(SUBJECT, reference="registry.test/evil")
    s = cosign.signature_manifest([(evil, cosign.layer(evil, good))])
    v = check(signer, s)
    assert not v.signed and v.reason == "not signed by a trusted key"


def test_payload_for_another_subject_swapped_in(signer):
    """A genuine signature of OTHER presented as the signature of SUBJECT."""
    s = cosign.sign(signer, OTHER)
    v = check(signer, s, subject=SUBJECT)
    assert not v.signed and v.reason == "signature is for another digest"
    assert check(signer, s, subject=OTHER).signed


def test_wrong_key(signer):
    s = cosign.sign(cosign.Signer(), SUBJECT)
    v = check(signer, s)
    assert not v.signed and v.reason == "not signed by a trusted key"


def test_any_of_several_keys(signer):
    other = cosign.Signer()
    s = cosign.sign(other, SUBJECT)
    assert check(signer, s, keys=[signer.public_pem, other.public_pem]).signed


def test_index_digest_is_what_must_be_signed(signer, tmp_path):
    from tests.support.images import oci_index_layout

    layout = oci_index_layout(tmp_path, "multi")
    index_digest = layout["digest"]
    child = json.loads(layout["blobs"][index_digest])["manifests"][0]["digest"]
    index_sig = cosign.sign(signer, index_digest)
    child_sig = cosign.sign(signer, child)
    assert check(signer, index_sig, subject=index_digest).signed
    # A child's signature does not count for the index, nor the index's for a child.
    assert not check(signer, child_sig, subject=index_digest).signed
    assert not check(signer, index_sig, subject=child).signed


def test_several_layers_only_one_valid(signer):
    stranger = cosign.Signer()
    p_ok = cosign.payload(SUBJECT)
    p_other = cosign.payload(OTHER)
    layers = [
        (p_other, cosign.layer(p_other, signer.sign(p_other))),  # another digest
        (p_ok, cosign.layer(p_ok, stranger.sign(p_ok))),  # untrusted key
        (p_ok, cosign.layer(p_ok, "!!!")),  # garbage
        (p_ok, cosign.layer(p_ok, signer.sign(p_ok))),  # the one
    ]
    assert check(signer, cosign.signature_manifest(layers)).signed
    v = check(signer, cosign.signature_manifest(layers[:3]))
    assert not v.signed
    for part in ("another digest", "not signed by a trusted key", "base64"):
        assert part in v.reason


def test_only_the_first_layers_are_examined(signer):
    p = cosign.payload(SUBJECT)
    junk = [(p, cosign.layer(p, "AAAA"))] * sig.MAX_LAYERS
    s = cosign.signature_manifest([*junk, (p, cosign.layer(p, signer.sign(p)))])
    v = check(signer, s)
    assert not v.signed and f"first {sig.MAX_LAYERS} layers" in v.reason


# --- garbage annotations and hostile manifests ---------------------------------------------------


def _one_layer(signer, mutate) -> cosign.Signature:
    p = cosign.payload(SUBJECT)
    d = cosign.layer(p, signer.sign(p))
    mutate(d, p)
    return cosign.signature_manifest([(p, d)])


def _der_with_trailing_byte(signer, p):
    return base64.b64encode(signer.key.sign(p, ec.ECDSA(hashes.SHA256())) + b"\0").decode()


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d, p: d.pop("annotations"),
        lambda d, p: d.__setitem__("annotations", ["x"]),
        lambda d, p: d["annotations"].pop(cosign.ANNOTATION),
        lambda d, p: d["annotations"].__setitem__(cosign.ANNOTATION, 12),
        lambda d, p: d["annotations"].__setitem__(cosign.ANNOTATION, ""),
        lambda d, p: d["annotations"].__setitem__(cosign.ANNOTATION, "A" * 5000),
        lambda d, p: d["annotations"].__setitem__(cosign.ANNOTATION, "é" * 8),
        # URL-safe alphabet, missing padding, embedded newline: not StdEncoding
        lambda d, p: d["annotations"].__setitem__(
            cosign.ANNOTATION, d["annotations"][cosign.ANNOTATION].replace("+", "-") + "-_"
        ),
        lambda d, p: d["annotations"].__setitem__(
            cosign.ANNOTATION, d["annotations"][cosign.ANNOTATION].rstrip("=") + "A"
        ),
        lambda d, p: d["annotations"].__setitem__(
            cosign.ANNOTATION, "\n" + d["annotations"][cosign.ANNOTATION]
        ),
        lambda d, p: d["annotations"].__setitem__(
            cosign.ANNOTATION, base64.b64encode(b"x" * 70).decode()
        ),
        lambda d, p: d.__setitem__("mediaType", "application/vnd.oci.image.layer.v1.tar"),
        lambda d, p: d.__setitem__("size", d["size"] + 1),
        lambda d, p: d.__setitem__("size", True),
        lambda d, p: d.__setitem__("size", float(d["size"])),
        lambda d, p: d.__setitem__("size", 10**9),
        lambda d, p: d.__setitem__("digest", "sha512:" + "0" * 128),
        lambda d, p: d.__setitem__("digest", d["digest"].upper()),
    ],
)
def test_garbage_layers_are_not_signed(signer, mutate):
    s = _one_layer(signer, mutate)
    v = check(signer, s)
    assert not v.signed and v.reason


def test_der_with_trailing_garbage_refused(signer):
    p = cosign.payload(SUBJECT)
    s = cosign.signature_manifest([(p, cosign.layer(p, _der_with_trailing_byte(signer, p)))])
    assert not check(signer, s).signed


def test_non_canonical_der_refused(signer):
    """A long-form length in the DER SEQUENCE: Go's VerifyASN1 refuses it; so must we."""
    p = cosign.payload(SUBJECT)
    der = signer.key.sign(p, ec.ECDSA(hashes.SHA256()))
    assert der[0] == 0x30 and der[1] < 0x80
    long_form = bytes([0x30, 0x81, der[1]]) + der[2:]
    s = cosign.signature_manifest([(p, cosign.layer(p, base64.b64encode(long_form).decode()))])
    assert not check(signer, s).signed


def _payload_signature(signer, payload: bytes) -> cosign.Signature:
    return cosign.signature_manifest([(payload, cosign.layer(payload, signer.sign(payload)))])


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        # Signed by the trusted key, yet not a claim we accept.
        (
            cosign.go_json(
                {"critical": {"image": {"docker-manifest-digest": SUBJECT}, "type": "other"}}
            ),
            "not a cosign container image signature",
        ),
        (cosign.go_json({"critical": {"image": {"docker-manifest-digest": SUBJECT}}}), "not a"),
        (cosign.go_json({"critical": "x"}), "not a JSON object"),
        (cosign.go_json(["critical"]), "not a JSON object"),
        (b"\xff\xfe{}", "not UTF-8"),
        (b'{"critical":' * 70 + b"1" + b"}" * 70, "deeper than 64"),
        (b'{"critical": NaN}', "which is not JSON"),
        (b"not json", "not JSON"),
        (
            b'{"critical":{"type":"cosign container image signature","image":'
            b'{"docker-manifest-digest":"' + OTHER.encode() + b'"},"image":'
            b'{"docker-manifest-digest":"' + SUBJECT.encode() + b'"}}}',
            "repeats the key",
        ),
        # Keys Go would match case-insensitively (and with Unicode folding: U+212A KELVIN SIGN,
        # U+017F LONG S): refused rather than read differently from cosign.
        (cosign.payload(SUBJECT).replace(b'"type"', b'"Type"'), "ambiguous key"),
        (
            cosign.payload(SUBJECT).replace(b'"critical":{', b'"critical":{"TYPE":"x",'),
            "ambiguous key",
        ),
        (
            cosign.payload(SUBJECT).replace(
                b'"image":{', b'"image":{"docker-manifest-dige\xc5\xbft":"' + OTHER.encode() + b'",'
            ),
            "ambiguous key",
        ),
        (
            cosign.payload(SUBJECT).replace(b'"critical":{', b'"critical":{"\xe2\x84\xaaind":1,'),
            None,  # "Kind" is no field we read: accepted (signed)
        ),
    ],
)
def test_signed_but_unacceptable_payloads(signer, payload, reason):
    v = check(signer, _payload_signature(signer, payload))
    if reason is None:
        assert v.signed
    else:
        assert not v.signed and reason in v.reason, v.reason


def test_payload_size_cap(signer):
    big = cosign.payload(SUBJECT, optional={"pad": "x" * sig.MAX_PAYLOAD})
    v = check(signer, _payload_signature(signer, big))
    assert not v.signed and "size" in v.reason


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"x" * (sig.MAX_MANIFEST + 1), "larger than"),
        (b"[" * 100_000 + b"]" * 100_000, "nests deeper"),
        (b"[" * 5000 + b"]" * 5000, "nests deeper"),
        (b'{"a":' + b"[" * 70 + b"]" * 70 + b"}", "deeper than 64"),
        (b"\xc3\x28", "not UTF-8"),
        (b'{"schemaVersion": 2, "schemaVersion": 2}', "repeats the key"),
        (b'{"schemaVersion": 2.0, "layers": []}', "schemaVersion"),
        (b'{"schemaVersion": 2, "manifests": []}', "not an image manifest"),
        (
            b'{"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json"}',
            "not an image manifest",
        ),
        (b'{"schemaVersion": 2, "layers": []}', "no layers"),
        (b'{"schemaVersion": 2, "layers": {}}', "no layers"),
        (b'{"schemaVersion": 2, "layers": [1, null, "x"]}', "not a descriptor"),
        (b'{"schemaVersion": 2, "artifactType": "application/spdx+json", "layers": [{}]}', "not a"),
        (b"1" * 5000, "not JSON"),
        (b"[]", "not a JSON object"),
    ],
)
def test_hostile_signature_manifests(signer, body, reason):
    v = sig.verify(SUBJECT, body, fetcher(), [signer.public_pem])
    assert not v.signed and reason in v.reason, v.reason


def test_non_bytes_and_bad_subject(signer):
    s = cosign.sign(signer, SUBJECT)
    assert "not bytes" in sig.verify(SUBJECT, "text", fetcher(s), [signer.public_pem]).reason
    assert "not a sha256" in sig.verify("sha256:abc", s.manifest, fetcher(s), [signer]).reason
    assert sig.verify(SUBJECT, s.manifest, fetcher(s), []).reason == "no trusted keys"


def test_fetch_failure_is_transient(signer):
    s = cosign.sign(signer, SUBJECT)

    def broken(_):
        raise ConnectionError("backend down")

    v = check(signer, s, fetch=broken)
    assert not v.signed and v.transient and "unavailable" in v.reason
    oversize = check(signer, s, fetch=lambda d: b"x" * (sig.MAX_PAYLOAD + 1))
    assert not oversize.signed and not oversize.transient


# --- the OCI 1.1 referrers form ----------------------------------------------------------------


def test_referrers_form(signer):
    s = cosign.sign(signer, SUBJECT, referrer_of=SUBJECT_DESC)
    doc = json.loads(s.manifest)
    assert doc["artifactType"] == doc["config"]["mediaType"] == sig.SIG_ARTIFACT_TYPE
    assert check(signer, s).signed


def test_referrers_form_subject_must_match(signer):
    """A genuine signature of SUBJECT attached (subject) to OTHER proves nothing about OTHER,
    and a referrer whose subject is OTHER is not SUBJECT's signature even if its payload is."""
    s = cosign.sign(signer, SUBJECT, referrer_of={**SUBJECT_DESC, "digest": OTHER})
    v = check(signer, s)
    assert not v.signed and "subject is another digest" in v.reason
    assert not check(signer, s, subject=OTHER).signed


def test_referrer_without_artifact_type_uses_config_media_type(signer):
    s = cosign.sign(signer, SUBJECT, referrer_of=SUBJECT_DESC)
    doc = json.loads(s.manifest)
    del doc["artifactType"]
    assert check(signer, cosign.Signature(cosign.go_json(doc), s.blobs, s.media_type)).signed
    doc["config"]["mediaType"] = "application/vnd.oci.empty.v1+json"
    v = check(signer, cosign.Signature(cosign.go_json(doc), s.blobs, s.media_type))
    assert not v.signed and "not a cosign signature" in v.reason


def test_referrer_of_another_artifact_type(signer):
    s = cosign.sign(signer, SUBJECT, referrer_of=SUBJECT_DESC)
    doc = json.loads(s.manifest)
    doc["artifactType"] = "application/vnd.example.sbom+json"
    v = check(signer, cosign.Signature(cosign.go_json(doc), s.blobs, s.media_type))
    assert not v.signed and "not a cosign signature" in v.reason


def test_cosign_referrers_parses_hostile_indexes():
    good = {
        "mediaType": cosign.OCI_MANIFEST,
        "digest": OTHER,
        "artifactType": sig.SIG_ARTIFACT_TYPE,
    }
    sbom = {**good, "digest": SUBJECT, "artifactType": "application/spdx+json"}
    index = cosign.go_json({"schemaVersion": 2, "manifests": [good, sbom, good, {"digest": 1}, 7]})
    assert sig.cosign_referrers(index) == [OTHER]
    for junk in (b"", b"[]", b'{"manifests": {}}', b"\xff", b"[" * 10_000):
        assert sig.cosign_referrers(junk) == []
    many = [{**good, "digest": digest(str(i).encode())} for i in range(100)]
    found = sig.cosign_referrers(cosign.go_json({"manifests": many}))
    assert len(found) == sig.MAX_REFERRERS and found[0] == many[-1]["digest"]


# --- finding signatures -----------------------------------------------------------------------


class Repo:
    """A repository as verify_subject sees it: manifests by tag/digest, referrers, blobs."""

    def __init__(self, *signatures: cosign.Signature, tagged: cosign.Signature | None = None):
        self.manifests = {s.digest: s.manifest for s in signatures}
        self.blobs: dict[str, bytes] = {}
        for s in signatures:
            self.blobs |= s.blobs
        if tagged is not None:
            self.manifests[sig.signature_tag(SUBJECT)] = tagged.manifest
            self.blobs |= tagged.blobs
        self.referrers = cosign.go_json(
            {
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.index.v1+json",
                "manifests": [
                    {
                        "mediaType": cosign.OCI_MANIFEST,
                        "digest": s.digest,
                        "size": 1,
                        "artifactType": sig.SIG_ARTIFACT_TYPE,
                    }
                    for s in signatures
                ],
            }
        )

    def run(self, keys, referrers=True) -> Verdict:
        return sig.verify_subject(
            SUBJECT,
            self.manifests.get,
            (lambda d: self.referrers) if referrers else None,
            self.blobs.__getitem__,
            keys,
        )


def test_verify_subject_by_tag(signer):
    repo = Repo(tagged=cosign.sign(signer, SUBJECT))
    assert repo.run([signer.public_pem], referrers=False).signed


def test_verify_subject_by_referrer(signer):
    bad = cosign.sign(cosign.Signer(), SUBJECT, referrer_of=SUBJECT_DESC)
    good = cosign.sign(signer, SUBJECT, referrer_of=SUBJECT_DESC)
    assert Repo(good, bad).run([signer.public_pem]).signed
    assert not Repo(good, bad).run([signer.public_pem], referrers=False).signed  # Distribution


def test_verify_subject_nothing_found(signer):
    v = Repo().run([signer.public_pem])
    assert v == Verdict(False, "no cosign signature found")
    v = Repo(tagged=cosign.sign(cosign.Signer(), SUBJECT)).run([signer.public_pem])
    assert not v.signed and not v.transient and "trusted key" in v.reason


def test_verify_subject_backend_failures_are_transient(signer):
    def boom(_):
        raise TimeoutError

    v = sig.verify_subject(SUBJECT, boom, boom, boom, [signer.public_pem])
    assert not v.signed and v.transient
    assert not sig.verify_subject("latest", boom, None, boom, [signer.public_pem]).signed


def test_affected_subjects(signer):
    s = cosign.sign(signer, SUBJECT, referrer_of=SUBJECT_DESC)
    assert sig.affected_subjects(s.digest, s.manifest) == {SUBJECT}
    assert sig.affected_subjects(sig.signature_tag(OTHER), None) == {OTHER}
    assert sig.affected_subjects("latest", b"\xff garbage") == set()
    assert sig.affected_subjects("latest", b'{"subject": {"digest": "sha256:zz"}}') == set()


# --- never raises ------------------------------------------------------------------------------

FUZZ = settings(
    max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda kids: (
        st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4)
    ),
    max_leaves=30,
)


@FUZZ
@given(body=st.binary(max_size=2000))
def test_verify_never_raises_on_bytes(body):
    v = sig.verify(SUBJECT, body, lambda d: os.urandom(8), [KEY_PEM])
    assert isinstance(v, Verdict) and not v.signed


@FUZZ
@given(
    layers=st.lists(
        st.fixed_dictionaries(
            {},
            optional={
                "mediaType": st.sampled_from([sig.SIMPLESIGNING_MEDIA_TYPE, "x"]),
                "digest": st.sampled_from([SUBJECT, OTHER, "sha256:1", 5]),
                "size": st.integers(-2, 200) | st.booleans() | st.floats(),
                "annotations": st.dictionaries(
                    st.sampled_from([sig.SIGNATURE_ANNOTATION, "k"]), json_values, max_size=2
                )
                | json_values,
            },
        )
        | json_values,
        max_size=5,
    ),
    extra=st.dictionaries(
        st.sampled_from(["subject", "artifactType", "config", "mediaType"]), json_values
    ),
)
def test_verify_never_raises_on_structures(layers, extra):
    body = json.dumps({"schemaVersion": 2, "layers": layers, **extra}).encode()
    v = sig.verify(SUBJECT, body, lambda d: json.dumps(layers).encode()[:100], [KEY_PEM])
    assert isinstance(v, Verdict) and not v.signed


KEY_PEM = cosign.Signer().public_pem


# --- the verdict cache -------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


YES, NO = Verdict(True, "signed"), Verdict(False, "not signed")


def test_cache_hit_and_ttl():
    clock = Clock()
    cache = VerdictCache(ttl=60, negative_ttl=5, clock=clock)
    cache.put(SUBJECT, YES)
    cache.put(OTHER, NO)
    assert cache.get(SUBJECT) == YES and cache.get(OTHER) == NO
    clock.now += 5
    assert cache.get(OTHER) is None and cache.get(SUBJECT) == YES
    clock.now += 55
    assert cache.get(SUBJECT) is None and len(cache) == 0


def test_cache_scopes_and_invalidation():
    cache = VerdictCache(clock=Clock())
    cache.put(SUBJECT, YES, scope=("acme/app", "k1"))
    cache.put(SUBJECT, NO, scope=("acme/other", "k1"))
    cache.put(OTHER, YES, scope=("acme/app", "k1"))
    assert cache.get(SUBJECT, ("acme/app", "k1")) == YES
    assert cache.get(SUBJECT, ("acme/other", "k1")) == NO
    assert cache.get(SUBJECT) is None
    cache.invalidate(SUBJECT)
    assert cache.get(SUBJECT, ("acme/app", "k1")) is None
    assert cache.get(SUBJECT, ("acme/other", "k1")) is None
    assert cache.get(OTHER, ("acme/app", "k1")) == YES
    cache.invalidate("sha256:unknown")
    cache.clear()
    assert len(cache) == 0 and cache.get(OTHER, ("acme/app", "k1")) is None


def test_cache_is_bounded_lru():
    cache = VerdictCache(max_entries=3, clock=Clock())
    digests = [digest(bytes([i])) for i in range(5)]
    for d in digests[:3]:
        cache.put(d, YES)
    assert cache.get(digests[0]) == YES  # now most recent
    cache.put(digests[3], YES)
    cache.put(digests[4], YES)
    assert len(cache) == 3
    assert cache.get(digests[1]) is None and cache.get(digests[2]) is None
    assert cache.get(digests[0]) == YES
    cache.invalidate(digests[0])
    assert len(cache) == 2 and cache._by_digest.keys() == {digests[3], digests[4]}


def test_cache_never_stores_transient_verdicts():
    cache = VerdictCache(clock=Clock())
    cache.put(SUBJECT, Verdict(False, "backend down", transient=True))
    assert cache.get(SUBJECT) is None


def test_cache_rejects_bad_parameters():
    with pytest.raises(ValueError):
        VerdictCache(max_entries=0)
    with pytest.raises(ValueError):
        VerdictCache(ttl=-1)


def test_key_scope_is_order_independent(signer):
    a, b = sig.load_public_key(signer.public_pem), sig.load_public_key(KEY_PEM)
    assert sig.key_scope([a, b], "r") == sig.key_scope([b, a], "r")
    assert sig.key_scope([a], "r") != sig.key_scope([b], "r")
    assert sig.key_scope([a], "r") != sig.key_scope([a], "s")


# --- which manifests stay readable without a signature -----------------------------------------


def blob_store(*signatures: cosign.Signature, extra: dict[str, bytes] | None = None):
    """fetch(digest, size) as the backend answers: None when absent or larger than `size`."""
    blobs: dict[str, bytes] = {}
    for s in signatures:
        blobs |= s.blobs
    blobs |= extra or {}

    def fetch(d: str, size: int) -> bytes | None:
        data = blobs.get(d)
        return None if data is None or len(data) > size else data

    return fetch


def exempt(s: cosign.Signature) -> bool:
    return sig.exempt_from_signature(s.manifest, blob_store(s))


def artifact(layers: list[tuple[str, bytes]], *, config_type="application/vnd.oci.empty.v1+json",
             docker=False, **extra) -> cosign.Signature:  # fmt: skip
    """An attachment manifest (e.g. what `oras attach` or `cosign attach sbom` push)."""
    config = b"{}"
    doc = {
        "schemaVersion": 2,
        "mediaType": cosign.DOCKER_MANIFEST if docker else cosign.OCI_MANIFEST,
        "config": {"mediaType": config_type, "digest": digest(config), "size": len(config)},
        "layers": [{"mediaType": t, "digest": digest(b), "size": len(b)} for t, b in layers],
        **extra,
    }
    blobs = {digest(config): config} | {digest(b): b for _, b in layers}
    return cosign.Signature(cosign.go_json(doc), blobs, doc["mediaType"])


SPDX_JSON = cosign.go_json({"spdxVersion": "SPDX-2.3", "SPDXID": "SPDXRef-DOCUMENT"})
DSSE = cosign.go_json({"payloadType": "application/vnd.in-toto+json", "payload": "e30=",
                       "signatures": [{"sig": "MEUCIQ=="}]})  # fmt: skip
SPDX_TEXT = b"SPDXVersion: SPDX-2.3\nDataLicense: CC0-1.0\nSPDXID: SPDXRef-DOCUMENT\n"
CYCLONEDX_XML = b'<?xml version="1.0"?>\n<bom xmlns="http://cyclonedx.org/schema/bom/1.5"/>\n'


def test_signatures_and_attachments_are_exempt(signer):
    assert exempt(cosign.sign(signer, SUBJECT))
    assert exempt(cosign.sign(signer, SUBJECT, referrer_of=SUBJECT_DESC))
    assert exempt(cosign.sign(signer, SUBJECT, docker=True))
    # Several signatures in one manifest (cosign appends a layer per signature).
    p1, p2 = cosign.payload(SUBJECT), cosign.payload(SUBJECT, optional={"by": "ci"})
    two = cosign.signature_manifest([(p, cosign.layer(p, signer.sign(p))) for p in (p1, p2)])
    assert exempt(two)
    # An unsigned signature manifest is still readable: cosign verify tells it apart.
    assert exempt(cosign.signature_manifest([(p1, cosign.layer(p1, "AAAA"))]))
    sbom = artifact([("application/spdx+json", SPDX_JSON)], artifactType="application/spdx+json",
                    subject=SUBJECT_DESC)  # fmt: skip
    assert exempt(sbom)
    assert exempt(artifact([("application/vnd.dsse.envelope.v1+json", DSSE)],
                           config_type="application/vnd.oci.image.config.v1+json"))  # fmt: skip
    assert exempt(artifact([("text/spdx", SPDX_TEXT)]))
    assert exempt(artifact([("application/vnd.cyclonedx+xml", CYCLONEDX_XML)]))


RUNTIME_LAYERS = [
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
    "APPLICATION/VND.OCI.IMAGE.LAYER.V1.TAR",
    "application/octet-stream",
    "application/json",
    "",
]


@pytest.mark.parametrize("layer_type", RUNTIME_LAYERS)
def test_a_runnable_image_is_never_exempt(signer, layer_type):
    """Not even tagged `sha256-<hex>.sig`, mixed with a signature layer, or with a subject."""
    s = cosign.sign(signer, SUBJECT, referrer_of=SUBJECT_DESC)
    gz, _ = images.layer({"bin/sh": b"#!/bin/sh"})
    doc = json.loads(s.manifest)
    doc["layers"].append({"mediaType": layer_type, "digest": digest(gz), "size": len(gz)})
    s = cosign.Signature(cosign.go_json(doc), s.blobs | {digest(gz): gz}, s.media_type)
    assert not exempt(s)


def _zstd_frame(data: bytes) -> bytes:
    return b"\x28\xb5\x2f\xfd" + data  # the magic is what runtimes look at


ATTACHMENT_LABELS = [
    cosign.SIMPLESIGNING,
    "application/vnd.dev.cosign.attestation.v1+json",
    "application/vnd.dsse.envelope.v1+json",
    "application/vnd.in-toto+json",
    "application/vnd.dev.sigstore.bundle.v0.3+json",
    "application/spdx+json",
    "text/spdx",
    "application/vnd.cyclonedx+xml",
]


@pytest.mark.parametrize("label", ATTACHMENT_LABELS)
@pytest.mark.parametrize("content", ["tar+gzip", "tar", "zstd", "bzip2", "xz", "polyglot"])
def test_a_layer_labelled_an_attachment_is_read_not_believed(label, content):
    """What podman pulled and ran: a filesystem layer labelled a signature. The label says
    attachment; the bytes say layer, and the bytes decide."""
    gz, tar = images.layer({"hello": b"unsigned and runnable"})
    data = {
        "tar+gzip": gz,
        "tar": tar,
        "zstd": _zstd_frame(tar),
        "bzip2": b"BZh91AY&SY" + tar,
        "xz": b"\xfd7zXZ\x00" + tar,
        "polyglot": cosign.tar_polyglot(SUBJECT),
    }[content]
    s = artifact([(label, data)], config_type="application/vnd.oci.image.config.v1+json")
    assert not exempt(s)
    s = artifact([(label, data)], subject=SUBJECT_DESC)
    assert not exempt(s)


def test_a_polyglot_signature_is_valid_json_and_a_tar():
    """The test above is not vacuous: the polyglot passes every check but the tar one."""
    p = cosign.tar_polyglot(SUBJECT)
    assert json.loads(p)["critical"]["image"]["docker-manifest-digest"] == SUBJECT
    with tarfile.open(fileobj=io.BytesIO(p), mode="r:") as tar:
        assert [m.size for m in tar.getmembers()] == [len(p) - 512]
    assert sig.tar_header(p) and not sig.tar_header(cosign.payload(SUBJECT) + b" " * 600)


def test_payloads_that_are_not_what_they_claim_are_not_exempt(signer):
    p = cosign.payload(SUBJECT)
    for bad in (
        b"",
        b" " + p,  # JSON, but not starting where a signature payload starts
        p.replace(b"cosign container image signature", b"something else"),
        p.replace(SUBJECT.encode(), b"latest"),
        b'{"critical": 1}',
        b"[]",
        b"\xff" * 40,
        b"x" * (sig.MAX_PAYLOAD + 1),
    ):
        assert not exempt(cosign.signature_manifest([(bad, cosign.layer(bad, "AAAA"))])), bad
    for label, bad in (
        ("application/spdx+json", b"[1, 2]"),
        ("application/spdx+json", b"not json"),
        ("text/spdx", b"SPDX\x00\x01binary"),
        ("text/spdx", b"\xff\xfe"),
    ):
        assert not exempt(artifact([(label, bad)])), (label, bad)


def test_what_cannot_be_read_needs_a_signature(signer):
    s = cosign.sign(signer, SUBJECT)
    assert not sig.exempt_from_signature(s.manifest, lambda d, n: None)  # absent
    payload = next(b for d, b in s.blobs.items() if b.startswith(b'{"critical"'))
    swapped = {d: (b"X" * len(b) if b == payload else b) for d, b in s.blobs.items()}
    assert not sig.exempt_from_signature(s.manifest, blob_store(extra=swapped))
    big = b'{"k":"' + b"a" * sig.MAX_ATTACHMENT + b'"}'
    assert not exempt(artifact([("application/spdx+json", big)]))  # larger than we read
    many = [("application/spdx+json", cosign.go_json({"n": i})) for i in range(sig.MAX_LAYERS + 1)]
    assert not exempt(artifact(many))

    def down(d: str, n: int) -> bytes:
        raise OSError("backend down")

    with pytest.raises(OSError):  # the caller answers 503: neither exempt nor refused
        sig.exempt_from_signature(s.manifest, down)


def test_indexes_and_manifests_read_two_ways_are_not_exempt(signer, tmp_path):
    from tests.support.images import oci_index_layout, oci_layout

    image = oci_layout(tmp_path / "a", "v1")
    index = oci_index_layout(tmp_path / "i", "multi")
    assert not sig.exempt_from_signature(image["blobs"][image["digest"]], blob_store())
    assert not sig.exempt_from_signature(index["blobs"][index["digest"]], blob_store())
    s = cosign.sign(signer, SUBJECT)
    doc = json.loads(s.manifest)
    for change in (
        {"manifests": []},  # also an index: its children are what a client runs
        {"fsLayers": [{"blobSum": OTHER}]},  # also schema 1
        {"mediaType": "application/vnd.oci.image.index.v1+json"},
        {"mediaType": "application/vnd.docker.distribution.manifest.list.v2+json"},
        {"mediaType": "application/vnd.docker.distribution.manifest.v1+json"},
        {"schemaVersion": 1},
        {"schemaVersion": True},
        {"config": None},
        {"layers": []},
    ):
        changed = cosign.Signature(cosign.go_json(doc | change), s.blobs, s.media_type)
        assert not exempt(changed), change
    no_type = {k: v for k, v in doc.items() if k != "mediaType"}
    assert not exempt(cosign.Signature(cosign.go_json(no_type), s.blobs, s.media_type))
    for key, value in (("urls", ["http://elsewhere/layer"]), ("data", "e30=")):
        layers = [doc["layers"][0] | {key: value}]
        changed = cosign.Signature(cosign.go_json(doc | {"layers": layers}), s.blobs, s.media_type)
        assert not exempt(changed), key
    for body in (
        b"",
        b"\xff",
        b"[]",
        b'{"layers": []}',
        b'{"layers": [{"mediaType": 5}]}',
        b'{"layers": [1]}',
        b'{"layers": [{"mediaType": "x"}], "layers": [{"mediaType": "x"}]}',
    ):
        assert not sig.exempt_from_signature(body, blob_store()), body


# --- property: nothing a runtime would run is exempt ---------------------------------------------
#
# The oracle is written from the runtimes, not imported from addons.decisions.signatures:
# - containerd unpacks layers whose type is an OCI layer or a Docker rootfs type
#   (images.IsLayerType); moby pulls layers whose type starts `application/vnd.oci.image` or
#   `application/vnd.docker`, or is application/octet-stream, application/json, text/html or
#   empty (distribution/pull_v2.go supportedMediaTypes, case-insensitive);
# - containers/image (podman, CRI-O) unpacks every layer of an image whatever its type
#   (tested end to end), so there the bytes decide: empty (an empty archive), compressed by
#   the magic numbers runtimes detect, or readable as a tar archive.


def runtime_layer_type(media_type: str) -> bool:
    mt = media_type.lower()
    return (
        mt.startswith(("application/vnd.oci.image", "application/vnd.docker"))
        or mt in ("application/octet-stream", "application/json", "text/html", "")
        or "tar" in mt
        or "erofs" in mt  # containerd 2 (images.MediaTypeErofsLayer)
    )


def runtime_unpacks(data: bytes) -> bool:
    if not data or data[:2] == b"\x1f\x8b" or data[:3] == b"BZh" or data[:6] == b"\xfd7zXZ\x00":
        return True
    if data[:4] == b"\x28\xb5\x2f\xfd" or (
        data[:1] and 0x50 <= data[0] <= 0x5F and data[1:4] == b"\x2a\x4d\x18"
    ):
        return True
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            tar.getmembers()
        return True
    except (tarfile.TarError, EOFError, ValueError):
        return False


def _contents() -> st.SearchStrategy[bytes]:
    gz, tar = images.layer({"bin/app": b"\x7fELF run me"})
    fixed = [
        cosign.payload(SUBJECT),
        cosign.payload(OTHER, optional={"k": "v" * 600}),
        cosign.tar_polyglot(SUBJECT),
        SPDX_JSON,
        DSSE,
        SPDX_TEXT,
        CYCLONEDX_XML,
        gz,
        tar,
        _zstd_frame(tar),
        b"BZh91AY&SY",
        b"",
        b"{}",
    ]
    return st.sampled_from(fixed) | st.binary(max_size=700) | st.text(max_size=700).map(str.encode)


CONFIG_TYPES = [
    "application/vnd.oci.image.config.v1+json",
    "application/vnd.docker.container.image.v1+json",
    "application/vnd.oci.empty.v1+json",
    cosign.SIG_ARTIFACT,
]
MANIFEST_TYPES = [
    cosign.OCI_MANIFEST,
    cosign.DOCKER_MANIFEST,
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v1+json",
]
EXTRA_KEYS = {
    "subject": st.just(SUBJECT_DESC),
    "artifactType": st.sampled_from([cosign.SIG_ARTIFACT, "application/spdx+json"]),
    "annotations": st.just({"k": "v"}),
    "manifests": st.just([SUBJECT_DESC]),
    "fsLayers": st.just([{"blobSum": SUBJECT}]),
}


COHERENT = [  # (label, bytes) an attachment really is
    (cosign.SIMPLESIGNING, cosign.payload(SUBJECT)),
    (cosign.SIMPLESIGNING, cosign.payload(OTHER, optional={"k": "v" * 600})),
    ("application/vnd.dsse.envelope.v1+json", DSSE),
    ("application/spdx+json", SPDX_JSON),
    ("text/spdx", SPDX_TEXT),
    ("application/vnd.cyclonedx+xml", CYCLONEDX_XML),
]
LABELS = ATTACHMENT_LABELS + RUNTIME_LAYERS + ["application/wasm"]


@st.composite
def manifests(draw) -> tuple[dict, dict[str, bytes]]:
    """Mostly attachment-shaped (so that many are exempt), each part mutated now and then:
    a label over other bytes, a wrong size, extra keys, another manifest type."""
    blobs: dict[str, bytes] = {}
    layers = []
    for _ in range(draw(st.integers(1, 3) | st.just(0))):
        label, data = draw(
            st.sampled_from(COHERENT)
            if draw(st.integers(0, 4))
            else st.tuples(st.sampled_from(LABELS) | st.text(max_size=30), _contents())
            | st.tuples(st.sampled_from(ATTACHMENT_LABELS), _contents())
        )
        blobs[digest(data)] = data
        layer = {"mediaType": label, "digest": digest(data), "size": len(data)}
        if draw(st.integers(0, 9)) == 0:
            layer["size"] += draw(st.sampled_from([-1, 1]))
        if draw(st.booleans()):
            layer["annotations"] = {cosign.ANNOTATION: "AAAA"}
        if draw(st.integers(0, 9)) == 0:
            layer[draw(st.sampled_from(["urls", "data"]))] = ["x"]
        layers.append(layer)
    doc: dict = {"schemaVersion": 2 if draw(st.integers(0, 9)) else 1}
    media_type = draw(
        st.sampled_from([cosign.OCI_MANIFEST, cosign.DOCKER_MANIFEST])
        | st.sampled_from([*MANIFEST_TYPES, None])
        | st.text(max_size=20)
    )
    if media_type is not None:
        doc["mediaType"] = media_type
    config_type = draw(st.sampled_from(CONFIG_TYPES) | st.text(max_size=20))
    doc["config"] = {"mediaType": config_type, "digest": OTHER, "size": 2}
    doc["layers"] = layers
    if draw(st.integers(0, 2)) == 0:
        for key in draw(st.lists(st.sampled_from(sorted(EXTRA_KEYS)), max_size=2, unique=True)):
            doc[key] = draw(EXTRA_KEYS[key])
    return doc, blobs


@settings(FUZZ, max_examples=400)
@given(case=manifests())
def test_no_manifest_a_runtime_would_run_is_exempt(case):
    doc, blobs = case
    body = cosign.go_json(doc)
    fetch = blob_store(extra=blobs)
    if not sig.exempt_from_signature(body, fetch):
        return
    event("exempt")  # the statistics show the property is not vacuous
    # Exempt: an image manifest read one way only, with layers, none of which a runtime
    # would take (by its type for containerd and moby, by its bytes for containers/image).
    assert doc.get("mediaType") in (cosign.OCI_MANIFEST, cosign.DOCKER_MANIFEST)
    assert doc["schemaVersion"] == 2 and "manifests" not in doc and "fsLayers" not in doc
    assert doc["layers"]
    for layer in doc["layers"]:
        assert not runtime_layer_type(layer["mediaType"]), layer
        assert "urls" not in layer and "data" not in layer
        data = blobs[layer["digest"]]
        assert len(data) == layer["size"] and not runtime_unpacks(data), data[:80]


@settings(FUZZ, max_examples=100)
@given(case=manifests(), runnable=st.sampled_from(["gz", "tar", "polyglot"]))
def test_an_exempt_manifest_with_any_layer_made_runnable_is_not(case, runnable):
    """The label is kept, only the bytes change: the verdict must follow the bytes."""
    doc, blobs = case
    if not sig.exempt_from_signature(cosign.go_json(doc), blob_store(extra=blobs)):
        return
    gz, tar = images.layer({"bin/app": b"\x7fELF run me"})
    data = {"gz": gz, "tar": tar, "polyglot": cosign.tar_polyglot(SUBJECT)}[runnable]
    doc["layers"][-1] |= {"digest": digest(data), "size": len(data)}
    event("exempt, then made runnable")
    blobs[digest(data)] = data
    assert not sig.exempt_from_signature(cosign.go_json(doc), blob_store(extra=blobs))


# --- a manifest the backend does not have -----------------------------------------------------


@pytest.mark.parametrize(
    ("backend_says", "answered"),
    [
        ("NAME_UNKNOWN", "NAME_UNKNOWN"),  # Zot: no such repository
        ("MANIFEST_UNKNOWN", "MANIFEST_UNKNOWN"),  # Zot: no such tag; Distribution: either
        ("SOMETHING_ELSE", "MANIFEST_UNKNOWN"),
    ],
)
def test_a_missing_manifest_keeps_the_backends_distinction(backend_says, answered):
    """The signed-only check answers a missing manifest itself: with the backend's code, so
    that a repository that does not exist is told from a tag that does not."""
    import httpx

    from addons.decisions.policy import parse
    from addons.gateway.policy_store import PolicyFile
    from addons.gateway.require_signature import SignedOnly

    def backend(request: httpx.Request) -> httpx.Response:
        return httpx.Response(404, json={"errors": [{"code": backend_says, "message": "x"}]})

    key = cosign.Signer().public_pem
    rule = f'[[require_signature]]\nrepositories = ["acme/**"]\nkeys = ["""{key}"""]\n'
    policy = parse(rule, "p")
    from addons.clients.backend import Client

    addon = SignedOnly(PolicyFile())
    addon.client = Client("http://backend", transport=httpx.MockTransport(backend))
    digest, missing = addon.decide(policy, policy.signatures, "acme/nothing", "v1")
    assert digest is None and missing.code == answered
