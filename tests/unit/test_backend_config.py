"""Backend configs rendered by zot/config.py.

Zot rejects unknown keys, so every key path we emit must be in the project's own schema of
Zot's configuration (zot/schema.py: key names and JSON types from Zot's documentation and
example configs, v2.1.20), with that type. Where Zot's example configs themselves are at hand
(`$ZOT_EXAMPLES`, else `../shared/zot-examples` next to the checkout: optional, outside this
repository), a further test checks the schema against them key by key, and skips with the
reason when they are absent.

regionendpoint is also the documented "endpoint for S3 compatible storage services" of the
Distribution S3 driver Zot embeds (its FromParameters also reads forcepathstyle, secure,
skipverify and takes empty access keys as "use the SDK credential chain").

The Distribution config is checked against the 2.8 configuration reference
(/usr/share/doc/docker-registry/configuration.md.gz: log.accesslog.disabled, storage.delete,
storage.cache.blobdescriptor, storage.redirect.disable, http.relativeurls, storage.s3.*) and,
for local storage, by starting Debian's docker-registry on it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urljoin

import pytest

from addons.clients import backend_credential
from addons.config.settings import Settings, load
from addons.decisions.policy import parse as parse_policy
from zot import schema
from zot.config import SECRET_PLACEHOLDER, render, render_distribution, render_zot
from zot.schema import json_type, key_paths

GOLDEN = Path(__file__).resolve().parents[1] / "support" / "golden"
ZOT_EXAMPLES = Path(
    os.environ.get("ZOT_EXAMPLES")
    or Path(__file__).resolve().parents[3] / "shared" / "zot-examples"
)
DATA_DIR = "/var/lib/tabbify-registry"

LOCAL = {"REGISTRY_DATA_DIR": DATA_DIR}
S3 = {
    **LOCAL,
    "REGISTRY_STORAGE": "s3",
    "REGISTRY_S3_BUCKET": "tbf-registry",
    "REGISTRY_S3_REGION": "eu-central-1",
}
S3_ENDPOINT = {**S3, "REGISTRY_S3_ENDPOINT": "http://127.0.0.1:8333"}
MODES = {"local": LOCAL, "s3": S3, "s3-endpoint": S3_ENDPOINT}
# Several nodes (README "Running several nodes"): node 1 of two on one bucket.
CLUSTER = {
    **S3,
    "REGISTRY_BACKEND_ADDR": "[fd5a:1f02::1]:5001",
    "REGISTRY_CLUSTER_MEMBERS": "[fd5a:1f02::1]:5001,[fd5a:1f02::2]:5001",
    "REGISTRY_CLUSTER_HASH_KEY": "0123456789abcdef",
    "REGISTRY_CACHE_URL": "redis://redis.mesh:6379/0",
    "REGISTRY_LEDGER_URL": "s3://tbf-registry/ledger",
    "REGISTRY_AUTH_URL": "http://auth.mesh:8080",
    "REGISTRY_LISTEN": "[fd5a:1f02::1]:5000",
    "REGISTRY_BACKEND_CREDENTIAL_FILE": "/run/secrets/backend-credential",
}
ALL_MODES = {**MODES, "cluster": CLUSTER}


def settings(env: dict[str, str], backend: str = "zot") -> Settings:
    return load({**env, "REGISTRY_BACKEND": backend})


def example_paths(folder: Path) -> set[tuple[str, str]]:
    """(key path, JSON type) of everything in Zot's example configs."""
    paths = set()
    for file in sorted(folder.glob("*.json")):
        for path, value in key_paths(json.loads(file.read_text())):
            # storage.subPaths./b.storageDriver.x is the same key as storage.storageDriver.x
            paths.add((re.sub(r"^storage\.subPaths\.[^.]+\.", "storage.", path), json_type(value)))
    return paths


def go_duration_seconds(text: str) -> float:
    units = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)", text)
    assert parts and "".join(n + u for n, u in parts) == text, f"not a Go duration: {text!r}"
    return sum(float(n) * units[u] for n, u in parts)


@pytest.mark.parametrize("name", ["local", "s3", "s3-endpoint", "cluster"])
def test_zot_matches_golden(name: str) -> None:
    expected = json.loads((GOLDEN / f"zot-{name}.json").read_text())
    assert render_zot(settings(ALL_MODES[name])) == expected


@pytest.mark.parametrize("name", ALL_MODES)
def test_every_zot_config_fits_the_schema(name: str) -> None:
    config = render_zot(settings(ALL_MODES[name]))
    assert schema.violations(config) == []


def test_a_zot_cluster_shares_its_cache_and_names_its_members() -> None:
    config = render_zot(settings(CLUSTER))
    assert config["cluster"] == {
        "members": ["[fd5a:1f02::1]:5001", "[fd5a:1f02::2]:5001"],
        "hashKey": "0123456789abcdef",
    }
    storage = config["storage"]
    assert storage["remoteCache"] is True and storage["dedupe"] is True
    assert storage["cacheDriver"] == {
        "name": "redis",
        "url": "redis://redis.mesh:6379/0",
        "keyprefix": "zot",
    }
    # Zot finds itself among the members by address and port: it listens on its own entry.
    assert (config["http"]["address"], config["http"]["port"]) == ("fd5a:1f02::1", "5001")


def test_the_schema_catches_a_cluster_zot_would_refuse() -> None:
    config = render_zot(settings(CLUSTER))
    config["cluster"]["hashKey"] = "short"
    assert any("hashKey" in v for v in schema.violations(config))


def test_the_schema_catches_what_zot_would_refuse() -> None:
    config = render_zot(settings(S3))
    config["storage"]["cacheDriver"] = {"name": "dynamodb"}  # a key we do not emit
    config["http"]["port"] = 5001  # a number where Zot wants a string
    config["http"]["readTimeout"] = "1 day"
    del config["storage"]["rootDirectory"]
    found = "\n".join(schema.violations(config))
    for path in ("storage.cacheDriver", "http.port", "http.readTimeout", "storage.rootDirectory"):
        assert path in found, found


def test_the_schema_matches_zots_own_examples() -> None:
    """Every key of the schema appears with the same type in one of Zot's example configs."""
    if not list(ZOT_EXAMPLES.glob("*.json")):
        pytest.skip(
            f"Zot's example configs are not in {ZOT_EXAMPLES} (optional reference, outside "
            "this repository; set ZOT_EXAMPLES to a copy of project-zot/zot examples/)"
        )
    known = example_paths(ZOT_EXAMPLES)
    # A key taken from an example file that this copy lacks is checked where that file is.
    at_hand = {
        p: t
        for p, t in schema.KEYS.items()
        if p not in schema.SOURCES or (ZOT_EXAMPLES / schema.SOURCES[p]).exists()
    }
    missing = [(p, t) for p, t in at_hand.items() if (p, t) not in known]
    assert not missing, f"schema keys absent from {ZOT_EXAMPLES} (or with another type): {missing}"


@pytest.mark.parametrize("name", ALL_MODES)
@pytest.mark.parametrize("backend", ["zot", "distribution"])
def test_no_static_credentials(name: str, backend: str) -> None:
    env = ALL_MODES[name]
    if backend == "distribution" and name == "cluster":
        env = {**env, "REGISTRY_HTTP_SECRET_FILE": "/run/secrets/http-secret"}
        env["REGISTRY_BACKEND_ADDR"] = "127.0.0.1:5001"
    config = render(settings(env, backend))
    paths = [path.lower() for path, _ in key_paths(config)]
    # Distribution's http.secret signs upload state, Zot's cluster.hashKey seeds the
    # repository-to-member hash, cacheDriver.keyprefix names Redis keys: none a credential.
    not_credentials = {"http.secret", "cluster.hashkey", "storage.cachedriver.keyprefix"}
    assert not [p for p in paths if ("key" in p or "secret" in p) and p not in not_credentials]


@pytest.mark.parametrize("name", MODES)
def test_zot_storage_dedupes_into_local_boltdb(name: str) -> None:
    storage = render_zot(settings(MODES[name]))["storage"]
    assert storage["dedupe"] is True
    assert storage["remoteCache"] is False
    assert "cacheDriver" not in storage
    assert Path(storage["rootDirectory"]).is_relative_to(DATA_DIR)


def test_zot_s3_driver() -> None:
    aws = render_zot(settings(S3))["storage"]["storageDriver"]
    assert aws["bucket"] == "tbf-registry" and aws["region"] == "eu-central-1"
    assert "regionendpoint" not in aws
    assert aws["secure"] is True and aws["forcepathstyle"] is False
    custom = render_zot(settings(S3_ENDPOINT))["storage"]["storageDriver"]
    assert custom["regionendpoint"] == "http://127.0.0.1:8333"
    assert custom["secure"] is False and custom["forcepathstyle"] is True
    https = {**S3, "REGISTRY_S3_ENDPOINT": "https://s3.example.net"}
    assert render_zot(settings(https))["storage"]["storageDriver"]["secure"] is True
    assert "storageDriver" not in render_zot(settings(LOCAL))["storage"]


@pytest.mark.parametrize("name", MODES)
def test_zot_timeouts_fit_multi_gb_layers(name: str) -> None:
    http = render_zot(settings(MODES[name]))["http"]
    for key in ("readTimeout", "writeTimeout"):
        assert go_duration_seconds(http[key]) >= 3600, key


@pytest.mark.parametrize("name", ALL_MODES)
def test_zot_takes_only_the_runs_credential(name: str) -> None:
    """Zot answers only the registry's own programs: Basic auth against the htpasswd file of
    the run's credential, and no accessControl (with none, an authenticated user has every
    right, and nobody else any)."""
    config = render_zot(settings(ALL_MODES[name]))
    assert config["http"]["auth"] == {"htpasswd": {"path": f"{DATA_DIR}/run/backend-htpasswd"}}
    assert "accessControl" not in config["http"] and "accessControl" not in config
    without = json.loads(json.dumps(config))
    del without["http"]["auth"]
    assert "http.auth.htpasswd.path: missing" in schema.violations(without)


def test_zot_listens_on_backend_addr() -> None:
    http = render_zot(settings({**LOCAL, "REGISTRY_BACKEND_ADDR": "127.0.0.1:6001"}))["http"]
    assert (http["address"], http["port"]) == ("127.0.0.1", "6001")
    assert http["compat"] == ["docker2s2"]


def test_render_dispatches_on_backend() -> None:
    assert render(settings(LOCAL, "zot")) == render_zot(settings(LOCAL))
    assert render(settings(LOCAL, "distribution")) == render_distribution(settings(LOCAL))
    with pytest.raises(ValueError, match="external"):
        render(settings(LOCAL, "external"))


def test_distribution_config() -> None:
    local = render_distribution(settings(LOCAL, "distribution"))
    assert local["version"] == "0.1"
    assert local["log"] == {"level": "warn", "accesslog": {"disabled": True}}
    assert local["http"] == {
        "addr": "127.0.0.1:5001",
        "relativeurls": True,
        "secret": SECRET_PLACEHOLDER,
    }
    assert render_distribution(settings(LOCAL, "distribution"), "s3cr3t")["http"]["secret"] == (
        "s3cr3t"
    )
    # Basic auth on every request, against the htpasswd file `run` writes of its credential.
    assert local["auth"] == {
        "htpasswd": {
            "realm": "tabbify-registry-backend",
            "path": f"{DATA_DIR}/run/backend-htpasswd",
        }
    }
    assert local["storage"]["filesystem"] == {"rootdirectory": f"{DATA_DIR}/zot-cache"}
    assert local["storage"]["delete"] == {"enabled": True}
    # No blob-descriptor cache: it serves blobs garbage-collect deleted (see zot/config.py).
    assert "cache" not in local["storage"]
    assert "s3" not in local["storage"]

    s3 = render_distribution(settings(S3, "distribution"))["storage"]
    assert "filesystem" not in s3
    assert s3["s3"] == {
        "region": "eu-central-1",
        "bucket": "tbf-registry",
        "secure": True,
        "rootdirectory": "/zot",
    }
    custom = render_distribution(settings(S3_ENDPOINT, "distribution"))["storage"]["s3"]
    assert custom["regionendpoint"] == "http://127.0.0.1:8333"
    assert custom["secure"] is False


@pytest.mark.skipif(shutil.which("zot") is None, reason="zot binary not installed here")
@pytest.mark.parametrize("name", MODES)
def test_zot_verify_when_binary_present(name: str, tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(render_zot(settings(MODES[name]))))
    result = subprocess.run(
        ["zot", "verify", str(path)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stdout + result.stderr


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


BLOB = b"tabbify"


def upload_blob(port: int, repo: str, blob: bytes, credential: str) -> str:
    """Monolithic push (POST then PUT ?digest=); returns the Location the POST handed out."""
    base = f"http://127.0.0.1:{port}"
    auth = {"Authorization": backend_credential.authorization(credential)}
    post = urllib.request.Request(f"{base}/v2/{repo}/blobs/uploads/", method="POST", headers=auth)
    with urllib.request.urlopen(post, timeout=5) as resp:
        location = resp.headers["Location"]
    sep = "&" if "?" in location else "?"
    put = urllib.request.Request(
        urljoin(f"{base}/", location) + f"{sep}digest=sha256:{hashlib.sha256(blob).hexdigest()}",
        data=blob,
        method="PUT",
        headers={"Content-Type": "application/octet-stream", **auth},
    )
    with urllib.request.urlopen(put, timeout=5) as resp:
        assert resp.status == 201
    return location


def anonymous_status(url: str, credential: str | None = None) -> int:
    request = urllib.request.Request(url)
    if credential:
        request.add_header("Authorization", backend_credential.authorization(credential))
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:
            return resp.status
    except urllib.error.HTTPError as e:
        return e.code


def test_docker_registry_serves_rendered_local_config(tmp_path: Path) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {
        "REGISTRY_DATA_DIR": str(tmp_path),
        "REGISTRY_BACKEND": "distribution",
        "REGISTRY_BACKEND_ADDR": f"127.0.0.1:{port}",
    }
    credential = backend_credential.make()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "backend-htpasswd").write_text(backend_credential.htpasswd(credential))
    path = tmp_path / "distribution.json"
    path.write_text(json.dumps(render_distribution(load(env))))
    # Scrubbed environment: it reads REGISTRY_* variables as config overrides.
    proc = subprocess.Popen(
        ["/usr/bin/docker-registry", "serve", str(path)],
        env={"PATH": "/usr/bin:/bin"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline, status = time.monotonic() + 10, None
        while status is None and time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(
                    urllib.request.Request(
                        f"{base}/v2/",
                        headers={"Authorization": backend_credential.authorization(credential)},
                    ),
                    timeout=1,
                ) as resp:
                    status = resp.status
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.1)
        location = upload_blob(port, "probe", BLOB, credential) if status == 200 else None
        refused = [anonymous_status(f"{base}{p}") for p in ("/v2/", "/v2/_catalog")]
        wrong = anonymous_status(f"{base}/v2/_catalog", backend_credential.make())
    finally:
        proc.terminate()
        output = proc.communicate(timeout=10)[0].decode(errors="replace")
    assert status == 200, f"GET /v2/ never answered 200:\n{output}"
    # Without the run's credential, or with another one, the backend answers nobody.
    assert refused == [401, 401] and wrong == 401
    # relativeurls: the upload session handed out is a path, not an absolute URL
    assert location and location.startswith("/v2/probe/blobs/uploads/"), location
    # and the blob landed under <data_dir>/zot-cache
    assert list((tmp_path / "zot-cache").rglob(hashlib.sha256(BLOB).hexdigest())), output


RETENTION_POLICY = """
[[retention]]
repositories = ["acme/releases/**"]
keep_last = 5
protected_tags = ["v*", "latest"]

[[retention]]
repositories = ["acme/ci/*"]
keep_last = 0
untagged_after = "30m"

[[retention]]
repositories = ["**"]
untagged_after = "7d"
"""


def gc_settings() -> Settings:
    return settings({**LOCAL, "REGISTRY_GC_INTERVAL": "24h"})


def test_zot_gc_and_retention_match_golden() -> None:
    policy = parse_policy(RETENTION_POLICY, "policy.toml")
    config = render_zot(gc_settings(), policy)
    expected = json.loads((GOLDEN / "zot-gc-retention.json").read_text())
    assert config == expected
    assert schema.violations(config) == []
    # Without retention rules nor an interval, the configs stay as before.
    assert render_zot(settings(LOCAL), parse_policy("", "p.toml")) == render_zot(settings(LOCAL))


def test_zot_retention_tag_patterns_are_anchored_regexes() -> None:
    from zot.config import ATTACHMENT_TAGS, tag_regex

    assert tag_regex("v*") == "^v[A-Za-z0-9._-]*$"
    assert tag_regex("1.2*-rc") == "^1\\.2[A-Za-z0-9._-]*\\-rc$"
    assert re.fullmatch(tag_regex("v*"), "v1.2.3") and not re.search(tag_regex("v*"), "xv1")
    assert re.fullmatch(ATTACHMENT_TAGS, "sha256-" + "a" * 64 + ".sig")


def test_gc_interval_setting() -> None:
    from addons.config.settings import ConfigError

    assert gc_settings().gc_interval == 86400
    assert settings(LOCAL).gc_interval is None
    assert settings({**LOCAL, "REGISTRY_GC_INTERVAL": "90m"}).gc_interval == 5400
    for bad in ("24", "1s", "59s", "0m", "1.5h", "-1h", "1y"):
        with pytest.raises(ConfigError, match="REGISTRY_GC_INTERVAL"):
            settings({**LOCAL, "REGISTRY_GC_INTERVAL": bad})


def test_abandoned_uploads_are_purged_after_the_upload_age() -> None:
    """Unfinished uploads: Distribution's uploadpurging and Zot's GC remove them after the
    age the gateway stops counting them against the quota (REGISTRY_UPLOAD_MAX_AGE, 1h)."""
    from addons.config.settings import ConfigError

    purging = render_distribution(settings(LOCAL, "distribution"))["storage"]["maintenance"]
    assert purging == {
        "uploadpurging": {"enabled": True, "age": "1h", "interval": "1h", "dryrun": False}
    }
    short = settings({**LOCAL, "REGISTRY_UPLOAD_MAX_AGE": "90s"}, "distribution")
    assert short.upload_age == 90
    assert render_distribution(short)["storage"]["maintenance"]["uploadpurging"]["age"] == "90s"
    # Zot: GC on (it removes uploads untouched for gcDelay at each pass), gcDelay = the age;
    # left out where Zot's own default (1h) is that age.
    zot = render_zot(settings(LOCAL))["storage"]
    assert zot["gc"] is True and "gcDelay" not in zot
    six = render_zot(settings({**LOCAL, "REGISTRY_UPLOAD_MAX_AGE": "6h"}))["storage"]
    assert six["gc"] is True and six["gcDelay"] == "6h"
    assert schema.violations(render_zot(settings({**LOCAL, "REGISTRY_UPLOAD_MAX_AGE": "6h"}))) == []
    assert (
        gc_settings().upload_age == 3600 and render_zot(gc_settings())["storage"]["gcDelay"] == "1h"
    )
    for bad in ("9s", "0m", "1y", "1.5h", "-1h"):
        with pytest.raises(ConfigError, match="REGISTRY_UPLOAD_MAX_AGE"):
            settings({**LOCAL, "REGISTRY_UPLOAD_MAX_AGE": bad})


# --- mirrors of upstream registries (REGISTRY_MIRRORS_FILE) ----------------------------------

MIRRORS_TOML = """\
[[mirror]]
name = "docker.io"
url = "https://registry-1.docker.io"
credentials_file = "/run/secrets/dockerhub"
tag_ttl = "10m"

[[mirror]]
name = "ghcr.io"
url = "https://ghcr.io"
"""


def test_zot_mirrors_are_its_sync_extension_on_demand() -> None:
    from addons.config.mirrors import parse as parse_mirrors

    found = parse_mirrors(MIRRORS_TOML, "mirrors.toml")
    creds = Path(DATA_DIR) / "run" / "zot-sync-credentials.json"
    config = render_zot(settings(LOCAL), None, found, creds)
    assert schema.violations(config) == []
    assert config["extensions"] == json.loads((GOLDEN / "zot-sync.json").read_text())
    # Without mirrors, no extension at all (Zot's defaults stay as they were).
    assert "extensions" not in render_zot(settings(LOCAL))


def test_the_sync_keys_match_zots_own_sync_example() -> None:
    """Every sync key the renderer may emit appears, with the same type, in Zot's
    examples/config-sync.json (v2.1.20), where a copy of it is at hand."""
    example = ZOT_EXAMPLES / schema.SYNC_SOURCE
    if not example.exists():
        pytest.skip(f"{example} is not at hand (optional reference, outside this repository)")
    known = set((p, json_type(v)) for p, v in key_paths(json.loads(example.read_text())))
    missing = [(p, t) for p, t in schema.SYNC_KEYS.items() if (p, t) not in known]
    assert not missing


def test_distribution_mirror_is_a_proxy_instance_of_its_own() -> None:
    from addons.config.mirrors import parse as parse_mirrors
    from zot.config import render_distribution_mirror

    hub = parse_mirrors(MIRRORS_TOML, "mirrors.toml")[0]
    s = settings(LOCAL, "distribution")
    config = render_distribution_mirror(s, hub, 40001, "secret", ("robot", "tok"))
    assert config["proxy"] == {
        "remoteurl": "https://registry-1.docker.io",
        "username": "robot",
        "password": "tok",
    }
    assert config["http"]["addr"] == "127.0.0.1:40001"
    assert config["storage"]["filesystem"] == {"rootdirectory": f"{DATA_DIR}/mirror/docker.io"}
    assert config["auth"] == render_distribution(s)["auth"]  # only the gateway reaches it
    s3 = render_distribution_mirror(settings(S3, "distribution"), hub, 40001)
    assert s3["storage"]["s3"]["rootdirectory"] == "/mirror/docker.io"
    assert "username" not in s3["proxy"]
