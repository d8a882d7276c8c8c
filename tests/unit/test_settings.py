"""settings.load (contract §2): defaults, derived values, and every refusal naming its variable.

Pure parsing: nothing here binds or connects, whatever address it names.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from addons.config import settings
from addons.config.settings import Address, ConfigError, distribution_env, load, parse_address

AUTH = {"REGISTRY_AUTH_URL": "http://auth.internal:8080"}
ULA = "fd5a:1f02:3c4d::1"


def refused(env: dict[str, str], variable: str, ula: str | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load(env, ula=ula)
    message = str(info.value)
    assert variable in message, message
    assert "\n" not in message  # one line on stderr
    return info.value


# --- defaults ---------------------------------------------------------------------------------


def test_defaults():
    s = load({})
    assert s.listen == Address("127.0.0.1", 5000)
    assert s.backend_addr == Address("127.0.0.1", 5001)
    assert s.admin_addr == Address("127.0.0.1", 5002)
    assert s.data_dir == Path("/var/lib/tabbify-registry")
    assert s.runtime_dir == Path("/var/lib/tabbify-registry/run")
    assert s.storage == "local"
    assert (s.s3_bucket, s.s3_region, s.s3_endpoint) == (None, None, None)
    assert s.auth_url is None
    assert s.anonymous
    assert s.external_url == "http://127.0.0.1:5000"
    assert s.realm == "http://127.0.0.1:5000/auth/token"
    assert s.mesh_coordinator_url is None
    assert s.mesh_interface == "tbf0"
    assert s.mesh_poll_seconds == 30
    assert s.backend in ("zot", "distribution")


def test_empty_values_mean_default():
    s = load({"REGISTRY_STORAGE": "", "REGISTRY_AUTH_URL": "  ", "REGISTRY_LISTEN": ""})
    assert s.storage == "local"
    assert s.anonymous
    assert s.listen == Address("127.0.0.1", 5000)


def test_default_backend_follows_the_zot_binary(monkeypatch):
    monkeypatch.setattr(settings.shutil, "which", lambda name: "/usr/bin/zot")
    assert load({}).backend == "zot"
    monkeypatch.setattr(settings.shutil, "which", lambda name: None)
    assert load({}).backend == "distribution"
    assert load({"REGISTRY_BACKEND": "external"}).backend == "external"


def test_auth_url_turns_anonymous_mode_off():
    s = load({"REGISTRY_AUTH_URL": "https://auth.example/"})
    assert not s.anonymous
    assert s.auth_url == "https://auth.example"


def test_realm_follows_the_listen_address():
    s = load({"REGISTRY_LISTEN": "127.0.0.2:6000"})
    assert s.realm == "http://127.0.0.2:6000/auth/token"
    s = load({"REGISTRY_LISTEN": "[::1]:5000"})
    assert s.listen == Address("::1", 5000)
    assert s.realm == "http://[::1]:5000/auth/token"


def test_ula_gives_listen_and_realm():
    s = load(AUTH, ula=ULA)
    assert s.listen == Address(ULA, 5000)
    assert s.listen.hostport == f"[{ULA}]:5000"
    assert s.realm == f"http://[{ULA}]:5000/auth/token"


def test_explicit_listen_overrides_the_ula():
    s = load({**AUTH, "REGISTRY_LISTEN": "10.1.2.3:5000"}, ula=ULA)
    assert s.listen == Address("10.1.2.3", 5000)
    assert s.realm == "http://10.1.2.3:5000/auth/token"


def test_external_url_overrides_the_realm_base():
    s = load({**AUTH, "REGISTRY_EXTERNAL_URL": "https://registry.example.com/"}, ula=ULA)
    assert s.listen == Address(ULA, 5000)
    assert s.realm == "https://registry.example.com/auth/token"


def test_s3_settings():
    s = load(
        {
            "REGISTRY_STORAGE": "s3",
            "REGISTRY_S3_BUCKET": "images",
            "REGISTRY_S3_REGION": "eu-west-1",
            "REGISTRY_S3_ENDPOINT": "http://127.0.0.1:8333/",
        }
    )
    assert (s.storage, s.s3_bucket, s.s3_region) == ("s3", "images", "eu-west-1")
    assert s.s3_endpoint == "http://127.0.0.1:8333"


def test_mesh_settings():
    s = load(
        {
            **AUTH,
            "MESH_COORDINATOR_URL": "https://mesh.example/",
            "MESH_AUTH_KEY": "key",
            "MESH_INTERFACE": "wg-test0",
            "MESH_POLL_SECONDS": "5",
        }
    )
    assert s.mesh_coordinator_url == "https://mesh.example"
    assert s.mesh_auth_key == "key"
    assert s.mesh_interface == "wg-test0"
    assert s.mesh_poll_seconds == 5


def test_ipv6_loopback_is_fine_for_anonymous_mode():
    assert load({"REGISTRY_LISTEN": "[::1]:5000"}).anonymous


# --- refusals ---------------------------------------------------------------------------------


@pytest.mark.parametrize("storage", ["gcs", "LOCAL", "s3 ", "azure"])
def test_unknown_storage(storage):
    refused({"REGISTRY_STORAGE": storage}, "REGISTRY_STORAGE")


def test_s3_without_bucket():
    refused({"REGISTRY_STORAGE": "s3", "REGISTRY_S3_REGION": "eu-west-1"}, "REGISTRY_S3_BUCKET")


def test_s3_without_region():
    refused({"REGISTRY_STORAGE": "s3", "REGISTRY_S3_BUCKET": "images"}, "REGISTRY_S3_REGION")


S3_ENV = {"REGISTRY_STORAGE": "s3", "REGISTRY_S3_BUCKET": "images", "REGISTRY_S3_REGION": "x"}


def test_aws_ca_bundle_goes_to_distribution_as_ssl_cert_file():
    """Distribution 2.8's S3 driver panics at every start when AWS_CA_BUNDLE is set (checked
    against SeaweedFS over HTTPS): it gets the same file as Go's SSL_CERT_FILE instead."""
    env = {"AWS_CA_BUNDLE": "/etc/ca.pem", "REGISTRY_S3_BUCKET": "b", "AWS_REGION": "x"}
    child = distribution_env(env)
    assert child == {"SSL_CERT_FILE": "/etc/ca.pem", "AWS_REGION": "x"}
    assert distribution_env({"AWS_CA_BUNDLE": " "}) == {}


def test_two_different_ca_files_are_refused_with_distribution():
    env = {
        **S3_ENV,
        "REGISTRY_BACKEND": "distribution",
        "AWS_CA_BUNDLE": "/etc/ca.pem",
        "SSL_CERT_FILE": "/etc/other.pem",
    }
    assert "SSL_CERT_FILE" in str(refused(env, "AWS_CA_BUNDLE"))
    load({**env, "SSL_CERT_FILE": "/etc/ca.pem"})  # the same file: fine


@pytest.mark.parametrize(
    "env",
    [
        {**S3_ENV, "REGISTRY_BACKEND": "zot"},  # distribution v3's driver loads it
        {**S3_ENV, "REGISTRY_BACKEND": "external"},  # not our process
        {"REGISTRY_BACKEND": "distribution"},  # local storage: no S3 driver
        {**S3_ENV, "REGISTRY_BACKEND": "distribution", "AWS_CA_BUNDLE": ""},  # unset
        {**S3_ENV, "REGISTRY_BACKEND": "distribution"},  # handed over as SSL_CERT_FILE
    ],
)
def test_aws_ca_bundle_is_accepted_elsewhere(env):
    load({"AWS_CA_BUNDLE": "/etc/ca.pem", **env})


def test_s3_with_a_bad_endpoint():
    env = {
        "REGISTRY_STORAGE": "s3",
        "REGISTRY_S3_BUCKET": "images",
        "REGISTRY_S3_REGION": "eu-west-1",
        "REGISTRY_S3_ENDPOINT": "seaweed:8333",
    }
    refused(env, "REGISTRY_S3_ENDPOINT")


@pytest.mark.parametrize("listen", ["10.0.0.1:5000", "192.168.1.10:5000", f"[{ULA}]:5000"])
def test_anonymous_mode_on_a_non_loopback_address(listen):
    refused({"REGISTRY_LISTEN": listen}, "REGISTRY_LISTEN")


def test_anonymous_mode_on_the_mesh():
    refused({}, "REGISTRY_LISTEN", ula=ULA)


@pytest.mark.parametrize("listen", ["0.0.0.0:5000", "[::]:5000"])
def test_every_address_with_auth_on(listen):
    """A container behind a published port: allowed with auth on; the token realm is the URL
    clients use, or this machine's own name for it without one; anonymous mode stays on
    loopback."""
    external = {"REGISTRY_EXTERNAL_URL": "https://registry.example.com"}
    s = load({**AUTH, **external, "REGISTRY_LISTEN": listen})
    assert s.listen.is_wildcard and s.listen.port == 5000
    assert s.realm == "https://registry.example.com/auth/token"
    s = load({**AUTH, "REGISTRY_LISTEN": listen})
    assert s.realm == "http://localhost:5000/auth/token"
    assert "loopback" in str(refused({**external, "REGISTRY_LISTEN": listen}, "REGISTRY_LISTEN"))


@pytest.mark.parametrize(
    "listen",
    [
        "localhost:5000",
        "fd5a::1:5000",
        "::1:5000",
        "1.2.3.4:99999",
        "1.2.3.4:65536",
        "1.2.3.4:0",
        "1.2.3.4",
        "abc",
        ":5000",
        "1.2.3.4:",
        "1.2.3.4:5000x",
        "1.2.3.4:-1",
        "256.1.1.1:5000",
        "1.2.3:5000",
        "01.2.3.4:5000",
        "[fd5a::1]",
        "[fd5a::1]5000",
        "[fe80::1%eth0]:5000",
        "[zz::1]:5000",
        "http://1.2.3.4:5000",
        " 1.2.3.4:5000 x",
    ],
)
def test_listen_that_is_not_an_address(listen):
    refused({**AUTH, "REGISTRY_LISTEN": listen}, "REGISTRY_LISTEN")


@pytest.mark.parametrize("backend", ["10.0.0.2:5001", f"[{ULA}]:5001", "0.0.0.0:5001"])
def test_non_loopback_backend(backend):
    refused({"REGISTRY_BACKEND_ADDR": backend}, "REGISTRY_BACKEND_ADDR")


@pytest.mark.parametrize("backend", ["localhost:5001", "127.0.0.1", "127.0.0.1:70000"])
def test_backend_that_is_not_an_address(backend):
    refused({"REGISTRY_BACKEND_ADDR": backend}, "REGISTRY_BACKEND_ADDR")


def test_backend_on_the_listen_address():
    refused({"REGISTRY_BACKEND_ADDR": "127.0.0.1:5000"}, "REGISTRY_BACKEND_ADDR")


def test_non_loopback_admin_address():
    refused({"REGISTRY_ADMIN_ADDR": "10.0.0.3:5002"}, "REGISTRY_ADMIN_ADDR")


@pytest.mark.parametrize("backend", ["nginx", "ZOT", "harbor"])
def test_unknown_backend(backend):
    refused({"REGISTRY_BACKEND": backend}, "REGISTRY_BACKEND")


@pytest.mark.parametrize("data_dir", ["relative/dir", "./data", "data"])
def test_relative_data_dir(data_dir):
    refused({"REGISTRY_DATA_DIR": data_dir}, "REGISTRY_DATA_DIR")


@pytest.mark.parametrize(
    "url", ["ftp://auth.example", "auth.example", "http://", "//auth.example", "file:///x"]
)
def test_bad_auth_url(url):
    refused({"REGISTRY_AUTH_URL": url}, "REGISTRY_AUTH_URL")


@pytest.mark.parametrize("url", ["registry.example.com", "ftp://registry.example.com"])
def test_bad_external_url(url):
    refused({**AUTH, "REGISTRY_EXTERNAL_URL": url}, "REGISTRY_EXTERNAL_URL")


def test_bad_coordinator_url():
    refused({**AUTH, "MESH_COORDINATOR_URL": "mesh.example"}, "MESH_COORDINATOR_URL")


@pytest.mark.parametrize("interface", ["x" * 16, "tbf 0", "tbf0/x", "tbf0\n"])
def test_bad_interface_name(interface):
    refused({"MESH_INTERFACE": interface}, "MESH_INTERFACE")


@pytest.mark.parametrize("poll", ["0", "-1", "abc", "1.5", "30s", " 30", "00"])
def test_bad_poll_seconds(poll):
    refused({"MESH_POLL_SECONDS": poll}, "MESH_POLL_SECONDS")


def test_poll_seconds_in_non_ascii_digits_is_a_config_error():
    """BUG (minor): "²".isdigit() is True but int("²") raises ValueError, so the refusal is a
    bare ValueError ("invalid literal for int()") that does not name MESH_POLL_SECONDS."""
    refused({"MESH_POLL_SECONDS": "²"}, "MESH_POLL_SECONDS")


# --- parse_address ----------------------------------------------------------------------------


def test_parse_address():
    assert parse_address("X", "127.0.0.1:5000") == Address("127.0.0.1", 5000)
    assert parse_address("X", "[::1]:5000") == Address("::1", 5000)
    assert parse_address("X", "[FD5A::1]:1") == Address("fd5a::1", 1)
    assert parse_address("X", "[fd5a::1]:65535").hostport == "[fd5a::1]:65535"
    assert parse_address("X", "10.0.0.1:80").hostport == "10.0.0.1:80"
    assert parse_address("X", "127.0.0.1:5000").is_loopback
    assert not parse_address("X", "10.0.0.1:5000").is_loopback


# --- what follows a ULA move (addons/gateway/meshaddress.py) --------------------------------------


def _options(s: settings.Settings) -> dict[str, str]:
    from addons.cli.programs import gateway_command

    argv = gateway_command(s)
    return dict(argv[i + 1].split("=", 1) for i, a in enumerate(argv) if a == "--set")


def _admin(s: settings.Settings) -> dict[str, str]:
    from addons.cli.programs import admin_command

    argv = admin_command(s)
    return {a: argv[i + 1] for i, a in enumerate(argv) if a.startswith("--")}


MESH = {**AUTH, "MESH_COORDINATOR_URL": "https://mesh.example", "REGISTRY_DATA_DIR": "/d"}


def test_a_mesh_derived_listen_address_and_realm_follow_the_ula():
    s = load(MESH, ula=ULA)
    assert s.listen_from_mesh and s.external_url_derived
    opts = _options(s)
    assert opts["registry_mesh_state"] == "/d/mesh/state.json"
    assert opts["registry_mesh_realm"] == "true"
    assert _admin(s)["--mesh-status"] == "/d/mesh/status.json"


def test_an_explicit_external_url_keeps_its_realm_while_the_listen_address_follows():
    s = load({**MESH, "REGISTRY_EXTERNAL_URL": "https://registry.example"}, ula=ULA)
    assert s.listen_from_mesh and not s.external_url_derived
    opts = _options(s)
    assert opts["registry_mesh_state"] and opts["registry_mesh_realm"] == "false"


def test_an_explicit_listen_address_follows_nothing():
    s = load({**MESH, "REGISTRY_LISTEN": "[fd5a:1f02::7]:5000"}, ula=ULA)
    assert not s.listen_from_mesh
    opts = _options(s)
    assert opts["registry_mesh_state"] == "" and opts["registry_mesh_realm"] == "false"
    assert _admin(s)["--mesh-status"] == "/d/mesh/status.json"  # health still reported


def test_without_a_mesh_there_is_nothing_to_follow():
    s = load({"REGISTRY_DATA_DIR": "/d"})
    assert _options(s)["registry_mesh_state"] == _admin(s)["--mesh-status"] == ""


def test_the_connection_caps_reach_each_worker_as_its_share():
    s = load(
        {
            **AUTH,
            "REGISTRY_WORKERS": "2",
            "REGISTRY_MAX_CLIENT_CONNECTIONS": "256",
            "REGISTRY_MAX_CLIENT_PENDING": "32",
        }
    )
    opts = _options(s)
    assert opts["registry_max_connections"] == "0"  # not set: each worker's own default
    assert opts["registry_max_client_connections"] == "152"  # 128 and room for the spread
    assert opts["registry_max_client_pending"] == "25"
    with pytest.raises(ConfigError, match="REGISTRY_MAX_CLIENT_PENDING"):
        load({**AUTH, "REGISTRY_MAX_CLIENT_PENDING": "0"})


def test_log_level():
    assert load({}).log_level == "info"
    for level in ("debug", "info", "warning", "error"):
        assert load({"REGISTRY_LOG_LEVEL": level}).log_level == level
    for bad in ("verbose", "INFO", "warn", "0"):
        refused({"REGISTRY_LOG_LEVEL": bad}, "REGISTRY_LOG_LEVEL")


def test_the_backend_command_hands_distribution_the_ca_bundle_as_ssl_cert_file(tmp_path):
    """supervisord gives every program its environment: the backend's own command line
    drops AWS_CA_BUNDLE and sets SSL_CERT_FILE (the gateway keeps AWS_CA_BUNDLE for boto3)."""
    from addons.cli.programs import backend_command

    env = {**S3_ENV, "REGISTRY_BACKEND": "distribution", "REGISTRY_DATA_DIR": str(tmp_path)}
    s = load(env)
    config = tmp_path / "c.json"
    command = backend_command(s, config, {"AWS_CA_BUNDLE": "/etc/ca.pem"})
    assert command[:4] == ["env", "-u", "AWS_CA_BUNDLE", "SSL_CERT_FILE=/etc/ca.pem"]
    assert command[4:] == backend_command(s, config, {})
