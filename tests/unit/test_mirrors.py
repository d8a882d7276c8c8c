"""The mirrors file, the reserved `mirror/` namespace in routes, policy and auth (pure)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from addons.clients.authservice import judge
from addons.config import mirrors
from addons.decisions import routes
from addons.decisions.policy import EMPTY, PolicyError, parse

GOOD = """\
[[mirror]]
name = "docker.io"
url = "https://registry-1.docker.io"
tag_ttl = "10m"

[[mirror]]
name = "ghcr.io"
url = "http://127.0.0.1:5999"
"""


def test_a_good_file_gives_each_mirror():
    got = mirrors.parse(GOOD, "m.toml")
    assert [(m.name, m.url, m.tag_ttl, m.line) for m in got] == [
        ("docker.io", "https://registry-1.docker.io", 600, 1),
        ("ghcr.io", "http://127.0.0.1:5999", 600, 6),
    ]


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ('[[mirror]]\nname = "Docker"\nurl = "https://x"\n', "m.toml:2:"),
        ('[[mirror]]\nname = "d"\nurl = "ftp://x"\n', "m.toml:3:"),
        ('[[mirror]]\nname = "d"\nurl = "https://u:p@x"\n', "m.toml:3:"),
        ('[[mirror]]\nname = "d"\nurl = "https://x/v2"\n', "m.toml:3:"),
        ('[[mirror]]\nname = "d"\nurl = "https://x"\ntag_ttl = "soon"\n', "m.toml:4:"),
        ('[[mirror]]\nname = "d"\nurl = "https://x"\ncolour = 1\n', "m.toml:4:"),
        ('[[mirror]]\nname = "d"\nurl = "https://x"\ncredentials_file = "rel"\n', "m.toml:4:"),
        (
            '\n[[mirror]]\nname = "d"\nurl = "https://x"\n[[mirror]]\nname = "d"\nurl="http://y"\n',
            "m.toml:6:",
        ),
        ('[[mirror]]\nname = "d"\nurl = \n', "m.toml:3:"),
        ("mirrors = 1\n", "m.toml:1:"),
    ],
)
def test_a_bad_file_names_the_file_and_the_line(text, where):
    with pytest.raises(mirrors.MirrorError) as e:
        mirrors.parse(text, "m.toml")
    assert str(e.value).startswith(where), str(e.value)
    assert "\n" not in str(e.value)


def test_credentials_are_one_line_and_never_quoted(tmp_path: Path):
    good = tmp_path / "hub"
    good.write_text("robot:s3cr3t-token\n")
    assert mirrors.read_credentials(good) == ("robot", "s3cr3t-token")
    bad = tmp_path / "bad"
    bad.write_text("s3cr3t-token-alone\n")
    with pytest.raises(mirrors.MirrorError) as e:
        mirrors.read_credentials(bad)
    assert "s3cr3t" not in str(e.value)
    f = tmp_path / "m.toml"
    f.write_text(f'[[mirror]]\nname = "d"\nurl = "https://x"\ncredentials_file = "{bad}"\n')
    with pytest.raises(mirrors.MirrorError, match=rf"^{f}:4: "):
        mirrors.load(f)


def test_split_names_the_mirror_and_the_upstream_repository():
    assert mirrors.split("mirror/docker.io/library/alpine") == ("docker.io", "library/alpine")
    assert mirrors.split("mirror/docker.io") is None
    assert mirrors.split("acme/mirror/x") is None


@pytest.mark.parametrize("tenant", [None, "acme"])
@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("PUT", "/v2/mirror/docker.io/library/alpine/manifests/3.20"),
        ("DELETE", "/v2/mirror/docker.io/library/alpine/manifests/3.20"),
        ("POST", "/v2/mirror/docker.io/library/alpine/blobs/uploads/"),
        ("DELETE", "/v2/mirror/docker.io/library/alpine/blobs/sha256:" + "a" * 64),
    ],
)
def test_nobody_writes_under_mirror_whatever_the_rights(tenant, method, path):
    everything = lambda _n, _a: routes.Decision(True, reason="grant")  # noqa: E731
    d = routes.check(tenant, path, method, everything)
    assert (d.allowed, d.status, d.code) == (False, 403, "DENIED")
    assert "read-only" in d.reason


def test_every_authenticated_caller_pulls_mirrors_by_default_and_never_writes():
    assert EMPTY.decide("acme", None, "mirror/docker.io/library/alpine", "pull").allowed
    assert not EMPTY.decide("acme", None, "mirror/docker.io/library/alpine", "push").allowed
    p = parse('[[grant]]\nrepositories = ["**"]\ntenants = ["*"]\nactions = ["push"]\n', "p.toml")
    assert not p.decide("acme", None, "mirror/docker.io/x", "push").allowed


def test_a_grant_naming_mirror_replaces_the_default_and_restricts_narrow_it():
    p = parse(
        '[[grant]]\nrepositories = ["mirror/**"]\ntenants = ["acme"]\nactions = ["pull"]\n',
        "p.toml",
    )
    assert p.decide("acme", None, "mirror/docker.io/x", "pull").allowed
    assert not p.decide("globex", None, "mirror/docker.io/x", "pull").allowed
    r = parse(
        '[[restrict]]\ntenants = ["globex"]\nrepositories = ["globex/**"]\nactions = ["pull"]\n',
        "p.toml",
    )
    assert not r.decide("globex", None, "mirror/docker.io/x", "pull").allowed
    assert r.decide("acme", None, "mirror/docker.io/x", "pull").allowed


def test_no_tenant_is_named_mirror():
    assert not EMPTY.decide("mirror", None, "mirror/docker.io/x", "push").allowed
    assert not EMPTY.decide("mirror", None, "mirror/x", "pull").allowed  # not an owner
    with pytest.raises(PolicyError, match=r"p\.toml:3:"):
        parse(
            '[[grant]]\nrepositories = ["acme/**"]\ntenants = ["mirror"]\nactions = ["pull"]\n',
            "p.toml",
        )
    v = judge(200, {"network": "mirror", "sub": "x"})
    assert v.outcome == "refused" and "reserved" in (v.reason or "")


def test_a_mount_from_a_mirror_starts_a_plain_upload():
    route = routes.Route("upload", "acme/app")
    got = routes.decide_params(
        None, route, "POST", (("mount", "sha256:" + "a" * 64), ("from", "mirror/d/x"))
    )
    assert got.values == {} and got.note == "mount dropped"


def test_zot_gets_the_upstream_credentials_in_its_own_format_0600(tmp_path: Path):
    from addons.cli.programs import load_mirrors, write_zot_credentials
    from addons.config.settings import load

    creds = tmp_path / "hub"
    creds.write_text("robot:tok-123\n")
    f = tmp_path / "m.toml"
    f.write_text(
        f'[[mirror]]\nname = "docker.io"\nurl = "https://registry-1.docker.io"\n'
        f'credentials_file = "{creds}"\n[[mirror]]\nname = "q"\nurl = "http://127.0.0.1:5999"\n'
    )
    s = load(
        {
            "REGISTRY_DATA_DIR": str(tmp_path / "data"),
            "REGISTRY_BACKEND": "zot",
            "REGISTRY_MIRRORS_FILE": str(f),
        }
    )
    s.runtime_dir.mkdir(parents=True)
    path = write_zot_credentials(s, load_mirrors(s))
    assert path is not None and path.stat().st_mode & 0o777 == 0o600
    assert json.loads(path.read_text()) == {
        "registry-1.docker.io": {"username": "robot", "password": "tok-123"}
    }


def _check(digest: str, chunks: list[bytes], limit: int | None = None):
    from addons.gateway.mirror import DigestCheck
    from addons.gateway.record import FlowRecord

    check = DigestCheck(FlowRecord(), digest, limit)
    out = b"".join(check(c) for c in [*chunks, b""])
    return out, check.failed


def test_a_body_with_the_named_digest_passes_whole():
    import hashlib

    body = [b"a" * 70000, b"b" * 5, b"c" * 65536]
    digest = "sha256:" + hashlib.sha256(b"".join(body)).hexdigest()
    assert _check(digest, body) == (b"".join(body), False)


def test_a_body_with_another_digest_never_passes_its_last_chunk():
    body = [b"a" * 70000, b"b" * 5, b"c" * 65536]
    out, failed = _check("sha256:" + "0" * 64, body)
    assert failed and out == b"a" * 70000 + b"b" * 5  # the client never has it all


def test_a_manifest_over_its_limit_is_cut():
    import hashlib

    body = [b"{" * 100, b"}" * 100]
    digest = "sha256:" + hashlib.sha256(b"".join(body)).hexdigest()
    out, failed = _check(digest, body, limit=150)
    assert failed and len(out) < 200


def test_the_default_names_itself_and_routes_follow_the_backend():
    from addons.decisions.policy import MIRROR_DEFAULT

    assert EMPTY.decide("acme", None, "mirror/docker.io/x", "pull").rule == MIRROR_DEFAULT
    mirrors.ROUTES.clear()
    mirrors.ROUTES.update({"docker.io": "127.0.0.1:5101", "ghcr.io": ""})
    try:
        path = "/v2/mirror/docker.io/library/alpine/manifests/3.20"
        assert mirrors.forward_target("mirror/docker.io/library/alpine", path) == (
            "127.0.0.1:5101",
            "/v2/library/alpine/manifests/3.20",
        )
        zot = "/v2/mirror/ghcr.io/acme/tool/blobs/sha256:" + "a" * 64
        assert mirrors.forward_target("mirror/ghcr.io/acme/tool", zot) == (None, zot)
        assert mirrors.resolve("mirror/quay.io/x") is None
        with pytest.raises(ValueError):
            mirrors.forward_target("mirror/quay.io/x", "/v2/mirror/quay.io/x/tags/list")
    finally:
        mirrors.ROUTES.clear()


def test_the_gateway_option_round_trips_and_refuses_garbage():
    option = mirrors.routes_option({"docker.io": ("127.0.0.1:5101", 600), "ghcr.io": ("", 60)})
    assert mirrors.parse_routes_option(option) == {
        "docker.io": ("127.0.0.1:5101", 600),
        "ghcr.io": ("", 60),
    }
    for bad in ('{"Docker": ["", 1]}', "[1]", '{"d": "x"}'):
        with pytest.raises(ValueError):
            mirrors.parse_routes_option(bad)
