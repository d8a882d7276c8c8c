"""Registry tokens (contract §3): HS256, 300 s, carrying the tenant, verified locally.

Every way a bearer value can be wrong ends in InvalidToken and nothing else: any other
exception escaping `verify` would escape the gateway's hook too.
"""

from __future__ import annotations

import base64
import json
import time

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from addons.decisions.tokens import AUDIENCE, ISSUER, LIFETIME, InvalidToken, TokenSigner

SECRET = b"k" * 32


@pytest.fixture
def signer() -> TokenSigner:
    return TokenSigner(SECRET)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def segment(obj: object) -> str:
    return b64url(json.dumps(obj).encode())


def claims(**overrides: object) -> dict[str, object]:
    now = int(time.time())
    base: dict[str, object] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "acme",
        "iat": now,
        "nbf": now,
        "exp": now + LIFETIME,
    }
    for key, value in overrides.items():
        if value is None:
            base.pop(key, None)
        else:
            base[key] = value
    return base


def signed(payload: dict[str, object], key: bytes = SECRET, algorithm: str = "HS256") -> str:
    return jwt.encode(payload, key, algorithm=algorithm)


# --- the good path ----------------------------------------------------------------------------


def test_mint_then_verify_gives_the_tenant(signer):
    token, issued = signer.mint("acme")
    assert signer.verify(token).tenant == "acme"
    assert abs(issued - time.time()) < 5


def test_token_is_hs256_with_a_300s_lifetime(signer):
    token, issued = signer.mint("acme")
    assert jwt.get_unverified_header(token)["alg"] == "HS256"
    body = jwt.decode(token, options={"verify_signature": False})
    assert body["exp"] - body["iat"] == LIFETIME == 300
    assert body["iat"] == issued
    assert body["sub"] == "acme"


def test_each_token_is_unique(signer):
    assert signer.mint("acme", now=1000)[0] != signer.mint("acme", now=1000)[0]


def test_hand_signed_token_with_all_claims_verifies(signer):
    """Control for the refusals below: the crafted claims are right when nothing is removed."""
    assert signer.verify(signed(claims())).tenant == "acme"


def test_token_just_before_expiry_is_valid(signer):
    token, _ = signer.mint("acme", now=time.time() - LIFETIME + 30)
    assert signer.verify(token).tenant == "acme"


def test_default_signers_have_different_secrets():
    """A restart (new signer) invalidates every issued token."""
    token, _ = TokenSigner().mint("acme")
    with pytest.raises(InvalidToken):
        TokenSigner().verify(token)


# --- refusals ---------------------------------------------------------------------------------


def test_expired_token_is_refused(signer):
    token, _ = signer.mint("acme", now=time.time() - LIFETIME - 30)
    with pytest.raises(InvalidToken):
        signer.verify(token)


def test_token_from_another_secret_is_refused(signer):
    token, _ = TokenSigner(b"x" * 32).mint("acme")
    with pytest.raises(InvalidToken):
        signer.verify(token)


def test_not_yet_valid_token_is_refused(signer):
    token, _ = signer.mint("acme", now=time.time() + 3600)
    with pytest.raises(InvalidToken):
        signer.verify(token)


def test_alg_none_is_refused(signer):
    token = segment({"alg": "none", "typ": "JWT"}) + "." + segment(claims()) + "."
    with pytest.raises(InvalidToken):
        signer.verify(token)


@pytest.mark.parametrize("alg", ["none", "None", "NONE"])
def test_alg_none_spellings_with_a_signature_are_refused(signer, alg):
    token = segment({"alg": alg}) + "." + segment(claims()) + "." + b64url(b"sig")
    with pytest.raises(InvalidToken):
        signer.verify(token)


@pytest.mark.filterwarnings("ignore:The HMAC key is 32 bytes long")
@pytest.mark.parametrize("algorithm", ["HS384", "HS512"])
def test_other_hmac_algorithms_are_refused_even_with_our_secret(signer, algorithm):
    with pytest.raises(InvalidToken):
        signer.verify(signed(claims(), SECRET, algorithm))


def test_rs256_token_is_refused(signer):
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with pytest.raises(InvalidToken):
        signer.verify(signed(claims(), key, "RS256"))  # type: ignore[arg-type]


def test_rs256_header_over_an_hmac_signature_is_refused(signer):
    """Algorithm confusion: header says RS256, signature is HMAC with our secret."""
    token = signed(claims())
    _, payload, sig = token.split(".")
    confused = segment({"alg": "RS256", "typ": "JWT"}) + "." + payload + "." + sig
    with pytest.raises(InvalidToken):
        signer.verify(confused)


def test_tampered_payload_is_refused(signer):
    token, _ = signer.mint("acme")
    header, payload, sig = token.split(".")
    body = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    body["sub"] = "globex"
    with pytest.raises(InvalidToken):
        signer.verify(f"{header}.{segment(body)}.{sig}")


def test_tampered_signature_is_refused(signer):
    token, _ = signer.mint("acme")
    header, payload, sig = token.split(".")
    flipped = ("A" if sig[0] != "A" else "B") + sig[1:]
    with pytest.raises(InvalidToken):
        signer.verify(f"{header}.{payload}.{flipped}")


@pytest.mark.parametrize("missing", ["iss", "aud", "exp", "sub", "iat"])
def test_missing_required_claim_is_refused(signer, missing):
    with pytest.raises(InvalidToken):
        signer.verify(signed(claims(**{missing: None})))


@pytest.mark.parametrize(
    "override",
    [
        {"aud": "tabbify-auth"},
        {"aud": ["someone-else"]},
        {"iss": "tabbify-auth"},
        {"iss": "tabbify-registry-evil"},
        {"sub": ""},
        {"sub": 42},
        {"sub": ["acme"]},
        {"exp": "later"},
    ],
)
def test_wrong_claim_values_are_refused(signer, override):
    with pytest.raises(InvalidToken):
        signer.verify(signed(claims(**override)))


@pytest.mark.parametrize(
    "token",
    [
        "",
        "not-a-token",
        "a.b.c",
        "a.b.c.d.e",
        "....",
        "!!!.@@@.###",
        "é.é.é",
        "a\x00.b.c",
        segment([1]) + "." + segment({}) + ".",
        segment({"alg": {"x": 1}}) + "." + segment(claims()) + ".",
        segment({"alg": "HS256", "crit": ["exp"]}) + "." + segment(claims()) + ".",
        "x" * 10_000,
    ],
)
def test_garbage_is_refused(signer, token):
    with pytest.raises(InvalidToken):
        signer.verify(token)


def test_tabbify_like_jwt_signed_by_another_key_is_refused(signer):
    """What a client might wrongly send as the registry token: the Tabbify JWT itself."""
    tabbify = signed(
        {"iss": "https://auth.tabbify.example", "sub": "acme", "network": "acme", "exp": 2**31},
        b"tabbify-auth-key" * 2,
    )
    with pytest.raises(InvalidToken):
        signer.verify(tabbify)


def test_our_claims_signed_by_another_key_are_refused(signer):
    with pytest.raises(InvalidToken):
        signer.verify(signed(claims(), b"another-key-another-key-another!"))


def test_undecodable_header_bytes_are_refused(signer):
    """mitmproxy hands header bytes that are not UTF-8 to addons as surrogate escapes
    (`Authorization: Bearer \\xe9` → "\\udce9"). That must be an InvalidToken like any other
    garbage; today PyJWT's UnicodeEncodeError escapes `verify` (see test_addons for what that
    does to the gateway)."""
    with pytest.raises(InvalidToken):
        signer.verify("\udce9")


def test_subject_and_granted_scopes_travel_in_the_token():
    signer = TokenSigner(SECRET)
    token, _ = signer.mint("acme", subject="ci@acme", scopes=["repository:acme/app:pull"])
    identity = signer.verify(token)
    assert identity.tenant == "acme" and identity.subject == "ci@acme"
    assert identity.token_allows("acme/app", "pull")
    assert not identity.token_allows("acme/app", "push")
    assert not identity.token_allows("acme/other", "pull")
    unscoped = signer.verify(signer.mint("acme")[0])
    assert unscoped.access is None and unscoped.token_allows("acme/other", "delete")


@pytest.mark.parametrize(
    "access", ["repository:acme/app:pull", ["repository:acme/app:steal"], [1], ["x"] * 33]
)
def test_a_signed_token_with_a_malformed_access_claim_is_refused(access):
    with pytest.raises(InvalidToken):
        TokenSigner(SECRET).verify(signed(claims(access=access)))
