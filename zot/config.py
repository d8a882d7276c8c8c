"""Backend registry configs rendered from Settings: pure functions returning JSON-ready dicts.

Zot rejects unknown keys, so every Zot key here is in the project's schema of Zot's
configuration, zot/schema.py (tests/unit/test_backend_config.py checks each rendered config against
it). Neither renderer ever emits S3 access keys: credentials come from the AWS SDK default
chain (instance/task role, env, profile).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from addons.clients import backend_credential
from addons.config.mirrors import Mirror
from addons.config.settings import Settings
from addons.decisions.policy import Policy

# Zot's default read/write timeout (since v2.1.17) is 60 s for the *whole* request, which cuts
# multi-GB layer uploads and pulls. "0s" would disable it, but a generous explicit bound keeps a
# wedged connection from living forever while still fitting a large layer on a slow link.
HTTP_TIMEOUT = "24h"

# Same S3 prefix for both backends, as local mode shares <data_dir>/zot-cache: their layouts do
# not collide (Distribution nests everything under docker/registry/v2, Zot writes
# <repo>/{index.json,oci-layout,blobs}), and neither reads the other's data.
S3_PREFIX = "/zot"


def storage_root(settings: Settings) -> str:
    """Local storage (and, on S3, Zot's boltdb dedupe cache) lives here (contract §2)."""
    return str(settings.data_dir / "zot-cache")


def htpasswd_path(settings: Settings) -> str:
    """The backend's htpasswd file, written by `run` with the run's credential
    (addons/clients/backend_credential.py): no anonymous request reaches either backend."""
    return str(settings.runtime_dir / backend_credential.HTPASSWD_NAME)


def _endpoint_is_plain_http(settings: Settings) -> bool:
    return bool(settings.s3_endpoint and settings.s3_endpoint.startswith("http://"))


# GC (contract §8) with Zot is Zot's own: blobs younger than this stay (a push in flight),
# and so do untagged manifests where no [[retention]] rule says otherwise (as
# addons/decisions/gc_plan.py's DEFAULT_GRACE does with Distribution).
GC_GRACE_SECONDS = 3600
# Zot's own default gcDelay. Its GC also removes blob uploads untouched for gcDelay, at each
# pass (pkg/storage/gc: removeBlobUploads; gcInterval, 1h by default): the age after which
# the gateway stops counting an unfinished upload against its tenant's quota.
ZOT_GC_DELAY = 3600
# cosign's attachment tags never count for keep_last and stay while their subject does
# (Zot's GC removes orphaned ones with deleteReferrers).
ATTACHMENT_TAGS = r"^sha256-[0-9a-f]{64}\.(sig|att|sbom)$"


def go_duration(seconds: int) -> str:
    for unit, size in (("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def tag_regex(pattern: str) -> str:
    """A policy tag pattern (`*` = any run of tag characters) as an anchored Go regex."""
    return "^" + "[A-Za-z0-9._-]*".join(re.escape(part) for part in pattern.split("*")) + "$"


def render_retention(policy: Policy) -> dict[str, Any]:
    """[[retention]] rules as Zot's `storage.retention` (schema.RETENTION_KEYS says how Zot
    reads it). One Zot policy per rule, in file order, then a default for every other
    repository (tags kept, untagged manifests after GC_GRACE_SECONDS). Zot applies the first
    policy that matches a repository, where the policy file combines every matching rule:
    with overlapping rules, put the one that should decide first (README, GC)."""
    policies = []
    graces = [GC_GRACE_SECONDS]
    for rule in policy.retentions:
        protected = [ATTACHMENT_TAGS, *(tag_regex(p) for p in rule.protected_tags)]
        keep_tags: list[dict[str, Any]] = [{"patterns": protected}]
        if rule.keep_last is None:
            keep_tags.append({"patterns": [".*"]})  # every tag stays
        elif rule.keep_last > 0:
            keep_tags.append({"patterns": [".*"], "mostRecentlyPushedCount": rule.keep_last})
        entry: dict[str, Any] = {
            "repositories": list(rule.repositories),
            "deleteReferrers": True,
            "deleteUntagged": True,
            "keepTags": keep_tags,
        }
        grace = int(rule.untagged_after.total_seconds()) if rule.untagged_after else None
        entry["keepUntagged"] = {"pushedWithin": go_duration(grace or GC_GRACE_SECONDS)}
        graces.append(grace or GC_GRACE_SECONDS)
        policies.append(entry)
    policies.append(
        {
            "repositories": ["**"],
            "deleteReferrers": True,
            "deleteUntagged": True,
            "keepTags": [{"patterns": [".*"]}],
            "keepUntagged": {"pushedWithin": go_duration(GC_GRACE_SECONDS)},
        }
    )
    # `delay` is global: the shortest grace, so that each policy's own keepUntagged decides.
    return {"dryRun": False, "delay": go_duration(min(graces)), "policies": policies}


# Zot's sync credentials file (its own JSON, by upstream host), rendered by `run` from the
# users' `credentials_file`s into the runtime dir (0600).
ZOT_SYNC_CREDENTIALS = "zot-sync-credentials.json"


def render_sync(mirrors: list[Mirror], credentials: Path | None) -> dict[str, Any]:
    """Zot's `sync` extension for REGISTRY_MIRRORS_FILE: each upstream on demand, everything
    it has (`**`) stored under /mirror/<name> (keys: Zot's examples/config-sync.json and
    pkg/extensions/config/sync/config.go, v2.1.20). Zot 2.1.20 has no per-registry tag TTL
    (`manifestCheckInterval` came later): tags are re-checked as its on-demand sync does."""
    sync: dict[str, Any] = {"enable": True}
    if credentials is not None:
        sync["credentialsFile"] = str(credentials)
    sync["registries"] = [
        {
            "urls": [m.url],
            "onDemand": True,
            "tlsVerify": True,
            "maxRetries": 2,
            "retryDelay": "5s",
            "content": [{"prefix": "**", "destination": f"/mirror/{m.name}"}],
        }
        for m in mirrors
    ]
    return sync


def render_zot(
    settings: Settings,
    policy: Policy | None = None,
    mirrors: list[Mirror] | None = None,
    credentials: Path | None = None,
) -> dict[str, Any]:
    """Zot v2.1.20 config. `policy`: its [[retention]] rules become Zot's retention;
    `mirrors`: Zot's sync extension (`credentials`: the sync credentials file)."""
    storage: dict[str, Any] = {
        "rootDirectory": storage_root(settings),  # on S3 it still holds cache.db
        "dedupe": True,
        # Local boltdb cache. With S3 + dedupe Zot defaults remoteCache to true and then refuses
        # a config without a DynamoDB/Redis cacheDriver.
        "remoteCache": False,
        "gc": True,
    }
    nodes = settings.nodes
    if nodes.cache_url:
        # One dedupe cache for every node on the bucket: with each node's own boltdb, a blob
        # deduplicated by one node would be unknown to the others' caches (Zot's docs: no
        # local caching in scale-out replicas). Keys from Zot's examples/config-redis.json.
        storage["remoteCache"] = True
        storage["cacheDriver"] = {"name": "redis", "url": nodes.cache_url, "keyprefix": "zot"}
    if settings.storage == "s3":
        driver: dict[str, Any] = {
            "name": "s3",
            "rootdirectory": S3_PREFIX,
            "region": settings.s3_region,
            "bucket": settings.s3_bucket,
            # Zot's (Distribution v3) S3 driver defaults to virtual-hosted style; S3-compatible
            # servers (SeaweedFS, MinIO) on a bare host:port need path style.
            "forcepathstyle": settings.s3_endpoint is not None,
            "secure": not _endpoint_is_plain_http(settings),
            "skipverify": False,
        }
        if settings.s3_endpoint:
            driver["regionendpoint"] = settings.s3_endpoint
        storage["storageDriver"] = driver
    if settings.gc_interval is not None or settings.upload_age != ZOT_GC_DELAY:
        # Unfinished uploads untouched for this long are removed by Zot's GC, and the
        # gateway stops counting them (REGISTRY_UPLOAD_MAX_AGE, default = Zot's default).
        storage["gcDelay"] = go_duration(settings.upload_age)
    if settings.gc_interval is not None:
        storage["gcInterval"] = go_duration(settings.gc_interval)
    if policy is not None and policy.retentions:
        storage["retention"] = render_retention(policy)
    config: dict[str, Any] = {
        "distSpecVersion": "1.1.1",
        "storage": storage,
        "http": {
            "address": settings.backend_addr.host,
            "port": str(settings.backend_addr.port),  # a string in Zot's schema
            "compat": ["docker2s2"],  # accept Docker v2 schema 2 manifests, not only OCI
            "readTimeout": HTTP_TIMEOUT,
            "writeTimeout": HTTP_TIMEOUT,
            # Basic auth against the run's credential. Without `accessControl` an
            # authenticated user has every right (Zot's routes.go installs no authz handler).
            "auth": {"htpasswd": {"path": htpasswd_path(settings)}},
        },
        # Per-request lines are the gateway's job (the access log); Zot's own at info would
        # flood the operator's log. No "output": stdout, collected by supervisord.
        "log": {"level": "warn"},
    }
    if mirrors:
        config["extensions"] = {"sync": render_sync(mirrors, credentials)}
    if nodes.several:
        # Scale-out (Zot >= 2.1): each repository is served by one member, chosen by siphash
        # of its name; the others proxy its requests there, so a repository has one writer.
        # Zot finds itself among the members by its own addresses and http.port, which is
        # why the backend listens on this node's member address (settings.py).
        config["cluster"] = {
            "members": list(nodes.cluster_members),
            "hashKey": nodes.cluster_hash_key,
        }
    return config


# What `tabbify-registry config` prints in place of the real upload-state secret.
SECRET_PLACEHOLDER = "<persisted in $REGISTRY_DATA_DIR/secrets/http-secret>"


def render_distribution(
    settings: Settings, http_secret: str = SECRET_PLACEHOLDER
) -> dict[str, Any]:
    """CNCF Distribution 2.8 config (Debian's docker-registry), written as JSON (valid YAML).

    `http_secret` signs the upload state clients carry between the chunks of an upload: a
    fixed one (persisted per data dir) lets an upload resume after the backend restarts,
    where Distribution's random default would answer BLOB_UPLOAD_INVALID."""
    if settings.storage == "s3":
        # 2.8 has no forcepathstyle parameter: a regionendpoint implies path style there.
        s3: dict[str, Any] = {
            "region": settings.s3_region,
            "bucket": settings.s3_bucket,
            "secure": not _endpoint_is_plain_http(settings),
            "rootdirectory": S3_PREFIX,
        }
        if settings.s3_endpoint:
            s3["regionendpoint"] = settings.s3_endpoint
        backend: dict[str, Any] = {"s3": s3}
    else:
        backend = {"filesystem": {"rootdirectory": storage_root(settings)}}
    return {
        "version": "0.1",
        # The gateway logs requests; Distribution's own access log would duplicate them, and
        # its info lines ("response completed" per request) would flood the operator's log.
        "log": {"level": "warn", "accesslog": {"disabled": True}},
        "storage": {
            **backend,
            "delete": {"enabled": True},  # deleting manifests/blobs by digest is part of the API
            # No blob-descriptor cache: after `garbage-collect` the in-memory one keeps
            # answering HEAD 200 for deleted blobs and accepts manifests that reference them,
            # i.e. broken images (tests/e2e/test_distribution_gc.py pins that); with several
            # nodes it would keep describing a blob another node deleted. Without it every
            # check reads storage, and such a push is refused (MANIFEST_BLOB_UNKNOWN).
            # Serve blobs through the registry (as Zot does) instead of redirecting clients to
            # presigned bucket URLs they may not be able to reach; a no-op on filesystem.
            "redirect": {"disable": True},
            # Abandoned uploads (`_uploads`, which garbage-collect never reaches) are removed
            # once `age` old (from their start), checked every `age` (the first check up to an
            # hour after start: Distribution's jitter). The gateway stops counting them
            # against their tenant's quota `age` after their last request.
            "maintenance": {
                "uploadpurging": {
                    "enabled": True,
                    "age": go_duration(settings.upload_age),
                    "interval": go_duration(settings.upload_age),
                    "dryrun": False,
                }
            },
        },
        # The health section is left out: its storagedriver check is then off, so a slow bucket
        # never turns every request into 503. 2.8 sets no server read/write timeouts.
        "http": {
            "addr": settings.backend_addr.hostport,
            "relativeurls": True,  # upload Location headers relative, as with Zot
            "secret": http_secret,
        },
        # Basic auth against the run's credential on every request (the realm is never seen
        # by clients: the gateway answers a backend 401 itself, addons/gateway/access.py).
        "auth": {
            "htpasswd": {"realm": "tabbify-registry-backend", "path": htpasswd_path(settings)}
        },
    }


def render_distribution_mirror(
    settings: Settings,
    mirror: Mirror,
    port: int,
    http_secret: str = SECRET_PLACEHOLDER,
    credentials: tuple[str, str] | None = None,
) -> dict[str, Any]:
    """A proxy-mode Distribution instance for one mirror: a read-only pull-through cache of
    its upstream (`proxy.remoteurl`, + `username`/`password`), on its own loopback port, with
    its own storage root (`$REGISTRY_DATA_DIR/mirror/<name>`, or `/mirror/<name>` in the
    bucket), behind the same htpasswd credential as the backend: only the gateway reaches it."""
    config = render_distribution(settings, http_secret)
    storage = config["storage"]
    if "s3" in storage:
        storage["s3"]["rootdirectory"] = f"/mirror/{mirror.name}"
    else:
        storage["filesystem"] = {"rootdirectory": str(settings.data_dir / "mirror" / mirror.name)}
    storage.pop("delete", None)  # a proxy refuses deletes anyway; its scheduler expires content
    config["http"]["addr"] = f"127.0.0.1:{port}"
    proxy: dict[str, Any] = {"remoteurl": mirror.url}
    if credentials is not None:
        proxy["username"], proxy["password"] = credentials
    config["proxy"] = proxy
    return config


def render(
    settings: Settings,
    http_secret: str = SECRET_PLACEHOLDER,
    policy: Policy | None = None,
    mirrors: list[Mirror] | None = None,
    credentials: Path | None = None,
) -> dict[str, Any]:
    """The config of the backend settings.backend selects (`policy`: for Zot's retention;
    `mirrors`: Zot's sync extension; with Distribution each mirror is an instance of its own,
    render_distribution_mirror)."""
    if settings.backend == "zot":
        return render_zot(settings, policy, mirrors, credentials)
    if settings.backend == "distribution":
        return render_distribution(settings, http_secret)
    raise ValueError(
        f"REGISTRY_BACKEND={settings.backend!r}: an external registry has no config to render"
    )
