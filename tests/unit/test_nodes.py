"""Several nodes on one bucket: the settings (addons/config/nodes.py), what `run` hands the
gateway, the shared upload secret, and shared registry-token keys (addons/config/token_keys.py).

Pure: nothing here connects anywhere."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from addons.cli import main as cli
from addons.cli import programs
from addons.config.settings import ConfigError, load
from addons.config.token_keys import KeyFileError, TokenKeyFile, read_keys
from addons.decisions.tokens import InvalidToken, TokenSigner

S3 = {
    "REGISTRY_DATA_DIR": "/d",
    "REGISTRY_AUTH_URL": "http://auth.mesh:8080",
    "REGISTRY_STORAGE": "s3",
    "REGISTRY_S3_BUCKET": "tbf-registry",
    "REGISTRY_S3_REGION": "eu-central-1",
}
MEMBERS = "[fd5a::1]:5001,[fd5a::2]:5001"
DISTRIBUTION = {
    **S3,
    "REGISTRY_BACKEND": "distribution",
    "REGISTRY_CLUSTER_MEMBERS": MEMBERS,
    "REGISTRY_LEDGER_URL": "s3://tbf-registry/ledger",
    "REGISTRY_HTTP_SECRET_FILE": "/run/secrets/http-secret",
}
ZOT = {
    **S3,
    "REGISTRY_BACKEND": "zot",
    "REGISTRY_CLUSTER_MEMBERS": MEMBERS,
    "REGISTRY_BACKEND_ADDR": "[fd5a::1]:5001",
    "REGISTRY_LEDGER_URL": "s3://tbf-registry/ledger",
    "REGISTRY_CACHE_URL": "redis://redis.mesh:6379",
    "REGISTRY_CLUSTER_HASH_KEY": "0123456789abcdef",
    "REGISTRY_BACKEND_CREDENTIAL_FILE": "/run/secrets/backend-credential",
}


def refused(env: dict[str, str], *words: str) -> str:
    with pytest.raises(ConfigError) as info:
        load(env)
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message
    return message


def without(env: dict[str, str], *names: str) -> dict[str, str]:
    return {k: v for k, v in env.items() if k not in names}


# --- what several nodes need, and what would split state ------------------------------------


def test_complete_several_node_settings_are_taken() -> None:
    d = load(DISTRIBUTION).nodes
    assert d.several and d.ledger_url == "s3://tbf-registry/ledger"
    assert d.http_secret_file == Path("/run/secrets/http-secret")
    z = load(ZOT)
    assert z.nodes.cluster_members == ("[fd5a::1]:5001", "[fd5a::2]:5001")
    assert z.backend_addr.host == "fd5a::1"  # Zot listens where the other members reach it


def test_one_node_is_the_default() -> None:
    n = load(S3).nodes
    assert not n.several and n.ledger_url is None and n.token_key_file is None
    # A shared ledger on a single node is fine (e.g. before a second node joins).
    assert load({**S3, "REGISTRY_LEDGER_URL": "s3://other-bucket/l"}).nodes.ledger_url


@pytest.mark.parametrize("env", [DISTRIBUTION, ZOT], ids=["distribution", "zot"])
def test_several_nodes_on_local_storage_are_refused(env: dict[str, str]) -> None:
    refused({**env, "REGISTRY_STORAGE": "local"}, "REGISTRY_CLUSTER_MEMBERS", "s3")


@pytest.mark.parametrize("env", [DISTRIBUTION, ZOT], ids=["distribution", "zot"])
def test_several_nodes_with_a_node_local_ledger_are_refused(env: dict[str, str]) -> None:
    refused(without(env, "REGISTRY_LEDGER_URL"), "REGISTRY_LEDGER_URL", "shared ledger")


def test_a_zot_cluster_with_node_local_caches_is_refused() -> None:
    refused(without(ZOT, "REGISTRY_CACHE_URL"), "REGISTRY_CACHE_URL", "boltdb")


def test_a_zot_cluster_needs_its_hash_key() -> None:
    refused(without(ZOT, "REGISTRY_CLUSTER_HASH_KEY"), "REGISTRY_CLUSTER_HASH_KEY")
    refused({**ZOT, "REGISTRY_CLUSTER_HASH_KEY": "short"}, "REGISTRY_CLUSTER_HASH_KEY", "16")


def test_a_zot_cluster_needs_one_backend_credential() -> None:
    """Members forward each other's requests with the credential they got: a per-run one,
    different on each node, would be refused by the member that owns the repository."""
    refused(without(ZOT, "REGISTRY_BACKEND_CREDENTIAL_FILE"), "REGISTRY_BACKEND_CREDENTIAL_FILE")
    refused({**ZOT, "REGISTRY_BACKEND_CREDENTIAL_FILE": "relative"}, "absolute path")
    assert load(ZOT).nodes.backend_credential_file == Path("/run/secrets/backend-credential")
    # Distribution nodes never talk to each other's backend: each run's own is enough.
    assert load(DISTRIBUTION).nodes.backend_credential_file is None


def test_a_zot_member_listens_on_its_own_member_address() -> None:
    refused({**ZOT, "REGISTRY_BACKEND_ADDR": "127.0.0.1:5001"}, "REGISTRY_BACKEND_ADDR")
    refused({**ZOT, "REGISTRY_BACKEND_ADDR": "[fd5a::3]:5001"}, "REGISTRY_BACKEND_ADDR")
    # Anywhere else, the backend stays on loopback.
    refused({**DISTRIBUTION, "REGISTRY_BACKEND_ADDR": "[fd5a::1]:5001"}, "loopback")


def test_distribution_on_several_nodes_needs_one_upload_secret() -> None:
    refused(without(DISTRIBUTION, "REGISTRY_HTTP_SECRET_FILE"), "REGISTRY_HTTP_SECRET_FILE")


@pytest.mark.parametrize(
    ("members", "why"),
    [
        ("[fd5a::1]:5001", "one member"),
        ("[fd5a::1]:5001,[fd5a::1]:5001", "twice"),
        ("fd5a::1:5001,fd5a::2:5001", "host:port"),
        ("[fd5a::1]:0,[fd5a::2]:0", "host:port"),
    ],
)
def test_bad_member_lists(members: str, why: str) -> None:
    refused({**DISTRIBUTION, "REGISTRY_CLUSTER_MEMBERS": members}, "REGISTRY_CLUSTER_MEMBERS", why)


def test_zot_members_share_one_port() -> None:
    env = {**ZOT, "REGISTRY_CLUSTER_MEMBERS": "[fd5a::1]:5001,[fd5a::2]:5002"}
    refused(env, "REGISTRY_CLUSTER_MEMBERS", "same port")
    # Distribution has no cluster of its own: its nodes' backends may use any ports.
    assert load({**DISTRIBUTION, "REGISTRY_CLUSTER_MEMBERS": "127.0.0.1:1,127.0.0.1:2"}).nodes


def test_host_names_are_members_too() -> None:
    env = {**DISTRIBUTION, "REGISTRY_CLUSTER_MEMBERS": "reg-a.mesh:5001,reg-b.mesh:5001"}
    assert load(env).nodes.several


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("postgresql://:hunter2@db.mesh/ledger", "[user[:password]@]"),
        ("postgresql://db.mesh/", "database name"),
        ("postgresql://db.mesh/a/b", "database name"),
        ("postgresql:///ledger", "one host"),
        ("postgresql://db1.mesh,db2.mesh/ledger", "one host"),
        ("postgresql://u:hunter2@db.mesh:99999/ledger", "host[:port]"),
        ("postgresql://db.mesh/ledger?options=-c%20x=1", "'options' is not taken"),
        ("postgresql://db.mesh/ledger?password=x", "'password' is not taken"),
        ("postgresql://db.mesh/ledger?sslmode", "malformed"),
        ("sqlite:///d/l.db", "expected s3://"),
        ("s3://tbf-registry", "prefix of its own"),
        ("s3://tbf-registry/", "prefix of its own"),
        ("s3://tbf-registry/zot", "backend's storage"),
        ("s3://tbf-registry/zot/ledger", "backend's storage"),
        ("s3://tbf-registry/a/../b", "prefix"),
        ("s3://Bad_Bucket/l", "bucket name"),
        ("s3://key:secret@tbf-registry/l", "no credentials"),
        ("s3://tbf-registry/l?region=us-east-1", "no query"),
    ],
)
def test_bad_ledger_urls(url: str, why: str) -> None:
    message = refused({**S3, "REGISTRY_LEDGER_URL": url}, "REGISTRY_LEDGER_URL", why)
    assert "hunter2" not in message and "secret" not in message  # never echoed


def test_a_password_in_a_postgresql_url_travels_apart_from_every_command_line() -> None:
    url = "postgresql://registry:hunter%2F2@db.mesh/ledger?sslmode=require"
    env = {**S3, "REGISTRY_LEDGER_URL": url, "REGISTRY_GC_INTERVAL": "1h"}
    s = load(env)
    assert s.nodes.ledger_url == "postgresql://registry@db.mesh/ledger?sslmode=require"
    assert s.nodes.ledger_password == "hunter/2" and "hunter" not in repr(s)
    child = programs.supervisor_env(env, s, Path("/d/backend.yml"))
    assert child["PGPASSWORD"] == "hunter/2"
    commands = [programs.gateway_command(s), programs.gc_command(env, s), programs.admin_command(s)]
    assert all("hunter" not in " ".join(c) for c in commands)
    assert all("hunter" not in v for k, v in child.items() if k != "PGPASSWORD")
    assert f"REGISTRY_LEDGER_URL={s.nodes.ledger_url}" in programs.gc_command(env, s)
    assert "PGPASSWORD" not in programs.supervisor_env(S3, load(S3), Path("/d/backend.yml"))


def test_a_postgresql_ledger_is_shared_and_handed_to_the_gateway_as_given() -> None:
    url = "postgresql://registry@db.mesh:5433/ledger?sslmode=verify-full"
    env = {**without(DISTRIBUTION, "REGISTRY_S3_REGION"), "REGISTRY_LEDGER_URL": url}
    env["REGISTRY_STORAGE"], env["REGISTRY_S3_REGION"] = "s3", "eu-central-1"
    nodes = load(env).nodes
    assert nodes.several and nodes.ledger_url == url and not nodes.ledger_in_s3
    assert nodes.ledger_bucket is None
    assert options(env)[0]["registry_ledger"] == url
    # No region needed on its own (no request signing); postgres:// is the same scheme.
    alone = {"REGISTRY_DATA_DIR": "/d", "REGISTRY_LEDGER_URL": "postgres://db.mesh/ledger"}
    assert load(alone).nodes.ledger_url == "postgresql://db.mesh/ledger"


def test_the_ledger_may_live_under_zot_in_another_bucket() -> None:
    assert load({**S3, "REGISTRY_LEDGER_URL": "s3://ledgers/zot"}).nodes.ledger_prefix == "zot"


def test_an_s3_ledger_needs_a_region_even_on_local_storage() -> None:
    env = {"REGISTRY_DATA_DIR": "/d", "REGISTRY_LEDGER_URL": "s3://ledgers/l"}
    refused(env, "REGISTRY_S3_REGION")
    assert load({**env, "REGISTRY_S3_REGION": "eu-central-1"}).nodes.ledger_url


@pytest.mark.parametrize("name", ["REGISTRY_TOKEN_KEY_FILE", "REGISTRY_HTTP_SECRET_FILE"])
def test_shared_files_are_absolute_paths(name: str) -> None:
    refused({**S3, name: "relative/file"}, name, "absolute")


def test_the_cache_url_is_redis() -> None:
    refused({**ZOT, "REGISTRY_CACHE_URL": "memcached://x:1"}, "REGISTRY_CACHE_URL")


# --- what `run` hands the gateway -------------------------------------------------------------


def options(env: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    argv = programs.gateway_command(load(env))
    return dict(argv[i + 1].split("=", 1) for i, a in enumerate(argv) if a == "--set"), argv


def test_the_gateway_opens_the_shared_ledger_with_the_storage_region_and_endpoint() -> None:
    opts, _ = options({**DISTRIBUTION, "REGISTRY_S3_ENDPOINT": "http://127.0.0.1:8333"})
    assert opts["registry_ledger"] == (
        "s3://tbf-registry/ledger?region=eu-central-1&endpoint=http%3A%2F%2F127.0.0.1%3A8333"
    )
    opts, _ = options(S3)
    assert opts["registry_ledger"] == "/d/ledger/ledger.db"


def test_the_gateway_gets_the_key_file_only_when_set() -> None:
    _, argv = options({**S3, "REGISTRY_TOKEN_KEY_FILE": "/run/secrets/token-keys"})
    assert argv[argv.index("--token-key-file") + 1] == "/run/secrets/token-keys"
    assert "--token-key-file" not in options(S3)[1]


def test_the_upload_secret_comes_from_the_shared_file(tmp_path: Path) -> None:
    secret = tmp_path / "http-secret"
    secret.write_text("s" * 40 + "\n")
    env = {**DISTRIBUTION, "REGISTRY_DATA_DIR": str(tmp_path / "d")}
    s = load({**env, "REGISTRY_HTTP_SECRET_FILE": str(secret)})
    assert programs.http_secret(s) == "s" * 40
    assert not (tmp_path / "d" / "secrets").exists()  # no per-data-dir secret made
    secret.write_text("short\n")
    with pytest.raises(ConfigError, match="REGISTRY_HTTP_SECRET_FILE"):
        programs.http_secret(s)
    missing = load({**env, "REGISTRY_HTTP_SECRET_FILE": str(tmp_path / "nope")})
    with pytest.raises(ConfigError, match="REGISTRY_HTTP_SECRET_FILE"):
        programs.http_secret(missing)


# --- shared registry-token keys ---------------------------------------------------------------

K1, K2, K3 = (c * 43 for c in "abc")


def test_the_key_file(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text(f"# rotated 2026-12-01\n{K1}\n\n  {K2}  \n")
    assert read_keys(path) == [K1.encode(), K2.encode()]
    for text, why in [
        ("", "no key"),
        ("# only a comment\n", "no key"),
        ("tooshort\n", "at least 32"),
        ("\n".join([K1] * 5), "at most 4"),
    ]:
        path.write_text(text)
        with pytest.raises(KeyFileError, match=why):
            read_keys(path)
    with pytest.raises(KeyFileError):
        read_keys(tmp_path / "absent")


def test_every_node_with_the_same_keys_accepts_every_nodes_tokens() -> None:
    a, b, alone = TokenSigner(), TokenSigner(), TokenSigner()
    for node in (a, b):
        node.use_keys([K1.encode()])
    token, _ = a.mint("acme")
    assert b.verify(token).tenant == "acme"
    with pytest.raises(InvalidToken):
        alone.verify(token)  # a node on its per-run key: the client logs in again


def test_rotation_first_signs_all_verify_and_a_removed_key_stops_at_once() -> None:
    signer = TokenSigner()
    signer.use_keys([K1.encode()])
    old, _ = signer.mint("acme")
    signer.use_keys([K2.encode(), K1.encode()])  # step 2: the new key signs
    new, _ = signer.mint("acme")
    assert signer.verify(old).tenant == "acme" and signer.verify(new).tenant == "acme"
    verifier = TokenSigner()
    verifier.use_keys([K2.encode()])
    assert verifier.verify(new).tenant == "acme"  # signed with the new key
    signer.use_keys([K2.encode()])  # step 3: the old key removed
    with pytest.raises(InvalidToken):
        signer.verify(old)  # even though it was verified (and cached) before
    assert signer.verify(new).tenant == "acme"
    with pytest.raises(ValueError):
        signer.use_keys([])


def test_a_gateway_follows_its_key_file(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text(K1 + "\n")
    signer = TokenSigner()
    watcher = TokenKeyFile(signer, path)
    old, _ = signer.mint("acme")
    assert not watcher.reload()  # unchanged: not even read
    path.write_text(f"{K2}\n{K1}\n")
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 1_000_000))
    assert watcher.reload()
    assert signer.verify(old).tenant == "acme"
    path.write_text("broken\n")  # a bad edit keeps the keys in use
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 2_000_000))
    assert not watcher.reload()
    assert signer.verify(old).tenant == "acme"
    path.unlink()
    assert not watcher.reload()
    assert signer.verify(old).tenant == "acme"


def test_config_prints_no_secret_of_several_nodes(tmp_path: Path) -> None:
    env = {**ZOT, "REGISTRY_CACHE_URL": "redis://zot:hunter2hunter2@redis.mesh:6379"}
    printed = str(cli.printable_config(load(env)))
    assert "hunter2" not in printed and "REGISTRY_CACHE_URL" in printed
    plain = cli.printable_config(load(ZOT))
    assert plain["storage"]["cacheDriver"]["url"] == "redis://redis.mesh:6379"  # type: ignore[index]
    shown = cli.printable_config(load({**DISTRIBUTION, "REGISTRY_DATA_DIR": str(tmp_path)}))
    assert shown["http"]["secret"] == "<from REGISTRY_HTTP_SECRET_FILE=/run/secrets/http-secret>"  # type: ignore[index]
