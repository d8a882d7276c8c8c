"""The part of Zot's configuration this project may write, as the project's own schema.

Zot (v2.1.x) reads one JSON (or YAML) file, fails to start on a key it does not know, and
takes no overrides from the environment. So `zot/config.py` may only emit the keys listed here,
each with the JSON type given. The key names and types are facts from Zot's documentation and
its example configurations (project-zot/zot `examples/`, v2.1.20); the comments say what each
one is for and where it shows up. Anything else Zot offers (LDAP, OpenID, access control,
TLS, extensions, DynamoDB, sub-paths, ...) stays outside on purpose: the gateway does those
jobs, or the deployment does not use them. Of Zot's authentication, only htpasswd: the run's
own credential, so that nothing but the registry's programs reaches Zot.

A key path is dotted (`storage.storageDriver.bucket`); the items of an array are `path[]`.
`violations(config)` lists what a rendered config does wrong; tests run it on every config
`render_zot` produces.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

KEYS: dict[str, str] = {
    # The OCI distribution-spec version Zot serves; in every example ("1.1.1").
    "distSpecVersion": "string",
    "storage": "object",
    # Local image store, and on S3 still required: the local boltdb dedupe cache (cache.db)
    # lives there. Every example has it.
    "storage.rootDirectory": "string",
    # Content-addressed deduplication across repositories (examples: boltdb, s3).
    "storage.dedupe": "boolean",
    # false: dedupe cache in local boltdb; true (the default with S3 + dedupe) needs a
    # DynamoDB or Redis cacheDriver (examples: boltdb, s3 sub-path /b, cluster).
    "storage.remoteCache": "boolean",
    # Garbage collection of untagged manifests and unreferenced blobs (example: gc).
    "storage.gc": "boolean",
    # Blobs younger than gcDelay stay (a push in flight); GC runs every gcInterval (example: gc).
    "storage.gcDelay": "string",
    "storage.gcInterval": "string",
    # The S3 driver (Distribution's s3-aws driver inside Zot); lower-case keys, as that driver
    # reads them (examples: s3, cluster member).
    "storage.storageDriver": "object",
    "storage.storageDriver.name": "string",  # "s3"
    "storage.storageDriver.rootdirectory": "string",  # key prefix inside the bucket
    "storage.storageDriver.region": "string",
    "storage.storageDriver.bucket": "string",
    # S3-compatible endpoint (SeaweedFS, MinIO, LocalStack); absent = AWS (cluster example).
    "storage.storageDriver.regionendpoint": "string",
    "storage.storageDriver.forcepathstyle": "boolean",  # path-style bucket addressing
    "storage.storageDriver.secure": "boolean",  # https to the endpoint
    "storage.storageDriver.skipverify": "boolean",  # TLS verification off (we never do)
    "http": "object",
    "http.address": "string",  # listen address
    "http.port": "string",  # a string in Zot's config, not a number
    # "docker2s2": also accept Docker's v2 schema 2 manifests (example: docker-compat).
    "http.compat": "array",
    "http.compat[]": "string",
    # Whole-request time limits as Go durations; 60 s by default since v2.1.17, which cuts
    # multi-GB layers (example: bench).
    "http.readTimeout": "string",
    "http.writeTimeout": "string",
    # Basic auth of every request against an htpasswd file (bcrypt lines): only the
    # registry's own programs, which hold the run's credential, reach Zot (example: config
    # example, `http.auth.htpasswd.path`).
    "http.auth": "object",
    "http.auth.htpasswd": "object",
    "http.auth.htpasswd.path": "string",
    "log": "object",
    "log.level": "string",  # debug, info, warn, error; no "output" = stdout
    # Several nodes on one bucket (README "Running several nodes"). The shared dedupe cache:
    # Redis, by URL, with a key prefix (examples: redis, redis-cluster; cluster member shows
    # cacheDriver.name with dynamodb).
    "storage.cacheDriver": "object",
    "storage.cacheDriver.name": "string",  # "redis"
    "storage.cacheDriver.url": "string",  # redis://[user:password@]host:port[/db][?…]
    "storage.cacheDriver.keyprefix": "string",
    # Scale-out cluster: every member's host:port (same port on each) and the 16-character
    # siphash key that maps a repository to its member (example: cluster member 0).
    "cluster": "object",
    "cluster.members": "array",
    "cluster.members[]": "string",
    "cluster.hashKey": "string",
}

# The example configuration (Zot's examples/) each key was taken from, where it is not one of
# the files kept in the reference copy the schema test reads by default.
SOURCES: dict[str, str] = {
    "storage.cacheDriver.url": "config-redis.json",
    "storage.cacheDriver.keyprefix": "config-redis.json",
}

# Tag retention (§8 `[[retention]]`): from Zot v2.1.20's examples/config-retention.json and
# pkg/api/config/config.go (ImageRetention, RetentionPolicy, KeepTagsPolicy,
# KeepUntaggedPolicy). Kept apart from KEYS because the copy of Zot's examples this project
# checks KEYS against has no retention example. Semantics (pkg/retention/retention.go): the
# first policy whose `repositories` (doublestar globs) match a repository applies; a tag is
# kept by the first `keepTags` entry whose `patterns` (unanchored Go regexes) match it, when
# that entry has no rule or one of its rules keeps it; a tag no entry matches is deleted once
# a policy has any `keepTags`; `deleteUntagged` defaults to true; `delay` is the minimum age
# of an untagged manifest or orphan referrer before it goes.
RETENTION_KEYS: dict[str, str] = {
    "storage.retention": "object",
    "storage.retention.dryRun": "boolean",
    "storage.retention.delay": "string",
    "storage.retention.policies": "array",
    "storage.retention.policies[]": "object",
    "storage.retention.policies[].repositories": "array",
    "storage.retention.policies[].repositories[]": "string",
    "storage.retention.policies[].deleteReferrers": "boolean",
    "storage.retention.policies[].deleteUntagged": "boolean",
    "storage.retention.policies[].keepTags": "array",
    "storage.retention.policies[].keepTags[]": "object",
    "storage.retention.policies[].keepTags[].patterns": "array",
    "storage.retention.policies[].keepTags[].patterns[]": "string",
    "storage.retention.policies[].keepTags[].mostRecentlyPushedCount": "number",
    "storage.retention.policies[].keepTags[].pushedWithin": "string",
    "storage.retention.policies[].keepUntagged": "object",
    "storage.retention.policies[].keepUntagged.pushedWithin": "string",
}
# Mirrors of upstream registries (REGISTRY_MIRRORS_FILE): Zot's `sync` extension, on demand.
# From Zot v2.1.20's examples/config-sync.json and pkg/extensions/config/sync/config.go
# (Config, RegistryConfig, Content); the credentials file is Zot's own JSON
# {"host:port": {"username", "password"}} (examples/sync-auth-filepath.json). Kept apart
# from KEYS because the copy of Zot's examples this project checks KEYS against has no sync
# example (SYNC_SOURCE names the file that has them all).
SYNC_KEYS: dict[str, str] = {
    "extensions": "object",
    "extensions.sync": "object",
    "extensions.sync.enable": "boolean",
    "extensions.sync.credentialsFile": "string",
    "extensions.sync.registries": "array",
    "extensions.sync.registries[]": "object",
    "extensions.sync.registries[].urls": "array",
    "extensions.sync.registries[].urls[]": "string",
    "extensions.sync.registries[].onDemand": "boolean",
    "extensions.sync.registries[].tlsVerify": "boolean",
    "extensions.sync.registries[].maxRetries": "number",
    "extensions.sync.registries[].retryDelay": "string",
    "extensions.sync.registries[].content": "array",
    "extensions.sync.registries[].content[]": "object",
    "extensions.sync.registries[].content[].prefix": "string",
    "extensions.sync.registries[].content[].destination": "string",
}
SYNC_SOURCE = "config-sync.json"
ALL_KEYS = {**KEYS, **RETENTION_KEYS, **SYNC_KEYS}

# Keys without which Zot does not start the way the gateway needs it.
REQUIRED = (
    "distSpecVersion",
    "storage.rootDirectory",
    "http.address",
    "http.port",
    "http.auth.htpasswd.path",  # never an anonymous backend
)

# Values Zot gives a meaning to, where the project uses a fixed one.
ALLOWED_VALUES: dict[str, frozenset[Any]] = {
    "storage.storageDriver.name": frozenset({"s3"}),
    "storage.cacheDriver.name": frozenset({"redis"}),
    "http.compat[]": frozenset({"docker2s2"}),
    "log.level": frozenset({"debug", "info", "warn", "error"}),
}

# Go's time.ParseDuration syntax, which Zot uses for durations ("24h", "1h30m", "2m").
GO_DURATION = re.compile(r"(?:\d+(?:\.\d+)?(?:ns|us|µs|ms|s|m|h))+")
DURATIONS = (
    "http.readTimeout",
    "http.writeTimeout",
    "storage.gcDelay",
    "storage.gcInterval",
    "storage.retention.delay",
    "storage.retention.policies[].keepTags[].pushedWithin",
    "storage.retention.policies[].keepUntagged.pushedWithin",
    "extensions.sync.registries[].retryDelay",
)


def json_type(value: Any) -> str:
    if isinstance(value, bool):  # before int: a bool is an int in Python
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if value is None:
        return "null"
    return {str: "string", list: "array", dict: "object"}[type(value)]


def key_paths(node: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted path, value) of every value of a JSON document; array items are `path[]`."""
    if isinstance(node, dict):
        for key, value in node.items():
            path = f"{prefix}.{key}" if prefix else key
            yield path, value
            yield from key_paths(value, path)
    elif isinstance(node, list):
        for item in node:
            yield f"{prefix}[]", item
            yield from key_paths(item, f"{prefix}[]")


def violations(config: dict[str, Any]) -> list[str]:
    """Everything in `config` this schema does not allow; empty when Zot would take it."""
    found = []
    present = set()
    for path, value in key_paths(config):
        present.add(path)
        kind = json_type(value)
        if path not in ALL_KEYS:
            found.append(f"{path}: not a key this project may emit")
        elif ALL_KEYS[path] != kind:
            found.append(f"{path}: {kind}, Zot expects {ALL_KEYS[path]}")
        elif path in ALLOWED_VALUES and value not in ALLOWED_VALUES[path]:
            found.append(f"{path}: {value!r} is none of {sorted(ALLOWED_VALUES[path])}")
        elif path in DURATIONS and not GO_DURATION.fullmatch(value):
            found.append(f"{path}: {value!r} is not a Go duration")
    found.extend(f"{path}: missing" for path in REQUIRED if path not in present)
    # Zot refuses these at start (pkg/cli/server/root.go: validateClusterConfig).
    cluster = config.get("cluster")
    if isinstance(cluster, dict):
        if not cluster.get("members"):
            found.append("cluster.members: a cluster needs members")
        if len(str(cluster.get("hashKey", ""))) != 16:
            found.append("cluster.hashKey: exactly 16 characters")
    return found
