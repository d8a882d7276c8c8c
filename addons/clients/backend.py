"""The one client of the registry backend: every program of the registry asks it this way.

The gateway's hooks (async), its start-up walk and `gc` (blocking threads), and the admin
endpoint's health probe all read the backend through `Client` / `AsyncClient` below, which
share one HTTP library (httpx: the same API blocking and async) and one set of rules:

- **The run's credential on every request** (addons/clients/backend_credential.py): by default the
  process's own (`backend_credential.header()`, set by the gateway's first addon); `gc` and the
  admin endpoint pass the one they read from the run's credential file.
- **Timeouts**: each wait (connect, a read, a write) at most `timeout` seconds, and a whole
  request, body included, at most `deadline` seconds: a backend that trickles an answer
  byte by byte cannot hold a caller longer than that.
- **Bounded answers**: a body is read up to the caller's `limit` and refused past it (a
  manifest is at most MAX_MANIFEST); nothing is ever read unbounded.
- **No redirects, no proxy from the environment**: a 3xx is an answer like any other status,
  and the backend is asked directly.
- **One outcome for "the backend cannot answer"**: `Unavailable` (unreachable, too slow, an
  answer over its bound, or a status the caller did not expect). Callers fail closed on it:
  the gateway answers 503, `gc` abandons its run, the probe says "down".
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx

from addons.clients import backend_credential
from addons.decisions.manifest import MAX_MANIFEST

TIMEOUT = 10.0  # seconds for one wait, in the gateway's hooks (a client is waiting)
WALK_TIMEOUT = 30.0  # seconds for one wait, in background walks (start-up walk, gc)
DEADLINE = 60.0  # seconds for one whole request, body included
MAX_LIST = 32 * 1024 * 1024  # bytes of one page of a listing (catalog, tags, referrers)
__all__ = ["MAX_LIST", "MAX_MANIFEST", "Answer", "AsyncClient", "Client", "TooLarge", "Unavailable"]

_DEFAULT: Any = object()  # "the process's own credential"


class Unavailable(Exception):
    """The backend cannot answer this question now: fail closed (503). `status` is the
    backend's unexpected status, None when no status came (unreachable, timeout, too large)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class TooLarge(Unavailable):
    """An answer over the caller's bound."""


@dataclass(frozen=True)
class Answer:
    """A backend's answer, its body read (within its bound) and the connection released."""

    status: int
    headers: httpx.Headers
    body: bytes

    @property
    def links(self) -> dict[Any, dict[str, str]]:
        """The `Link` header's links by rel (a listing's `next` page)."""
        return httpx.Response(self.status, headers=self.headers).links

    def expect(self, *statuses: int) -> Answer:
        """This answer when its status is one of `statuses`, else Unavailable."""
        if self.status not in statuses:
            raise Unavailable(f"the backend answered {self.status}", self.status)
        return self


def _options(base: str, authorization: Any, timeout: float) -> dict[str, Any]:
    if authorization is _DEFAULT:
        authorization = backend_credential.header()
    return {
        "base_url": base.rstrip("/"),
        # Bodies as stored: a compressed answer could unpack past any bound.
        "headers": {"Accept-Encoding": "identity"}
        | ({"Authorization": authorization} if authorization else {}),
        "timeout": timeout,
        "follow_redirects": False,
        "trust_env": False,
    }


def _headers(accept: str | None, headers: dict[str, str] | None) -> dict[str, str]:
    out = dict(headers or {})
    if accept:
        out["Accept"] = accept
    return out


def _add(body: bytearray, chunk: bytes, limit: int, path: str) -> None:
    body += chunk
    if len(body) > limit:
        raise TooLarge(f"the backend's answer to {_what(path)} is over {limit} bytes")


def _what(path: str) -> str:
    """What a path asks, without its repository's name (logs stay tenant-neutral)."""
    parts = path.split("?")[0].split("/")
    return next((p for p in reversed(parts[:-1]) if p in _KINDS), parts[-1] or "/v2/")


_KINDS = {"manifests", "blobs", "tags", "referrers", "_catalog", "uploads"}


class Client:
    """Blocking requests to the backend (threads: the gateway's checks, the walk, gc)."""

    def __init__(
        self,
        base: str,
        *,
        authorization: str | None = _DEFAULT,
        timeout: float = TIMEOUT,
        deadline: float = DEADLINE,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.deadline = deadline
        self.http = httpx.Client(**_options(base, authorization, timeout), transport=transport)

    def request(
        self,
        method: str,
        path: str,
        *,
        limit: int | None = None,
        accept: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> Answer:
        """`method path`, its body read up to `limit` bytes (None: not read). Raises Unavailable
        when no answer comes within the timeouts, or when the body is over `limit`."""
        end = time.monotonic() + self.deadline
        try:
            with self.http.stream(method, path, headers=_headers(accept, headers)) as r:
                body = bytearray()
                if limit is not None and method != "HEAD":
                    for chunk in r.iter_bytes():
                        _add(body, chunk, limit, path)
                        if time.monotonic() > end:
                            raise Unavailable(f"the backend's answer to {_what(path)} is too slow")
                return Answer(r.status_code, r.headers, bytes(body))
        except (httpx.HTTPError, httpx.InvalidURL) as e:
            raise Unavailable(f"the backend did not answer {_what(path)}: {e!r}") from None

    def get(self, path: str, limit: int, accept: str | None = None) -> Answer:
        return self.request("GET", path, limit=limit, accept=accept)

    def pages(self, path: str, key: str, limit: int = MAX_LIST) -> Iterator[Any]:
        """The items under `key` of every page of a listing (_catalog, tags/list), following
        `Link: <…>; rel="next"` on the backend only (a link elsewhere ends the walk). A 404
        is an empty listing; another status, or a page that is no JSON object, Unavailable
        (ValueError for the page)."""
        url: httpx.URL | None = self.http.base_url.join(path.lstrip("/"))
        origin = (url.scheme, url.netloc)
        while url is not None:
            answer = self.get(str(url), limit)
            if answer.status == 404:
                return
            answer.expect(200)
            yield from _json_object(answer.body).get(key) or []
            nxt = answer.links.get("next", {}).get("url", "")
            url = url.join(nxt) if nxt else None
            if url is not None and (url.scheme, url.netloc) != origin:
                url = None

    def close(self) -> None:
        self.http.close()


class AsyncClient:
    """Requests to the backend from the gateway's event loop (its async hooks)."""

    def __init__(
        self,
        base: str,
        *,
        authorization: str | None = _DEFAULT,
        timeout: float = TIMEOUT,
        deadline: float = DEADLINE,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.deadline = deadline
        self.http = httpx.AsyncClient(**_options(base, authorization, timeout), transport=transport)

    async def request(
        self,
        method: str,
        path: str,
        *,
        limit: int | None = None,
        accept: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> Answer:
        """As Client.request."""
        try:
            async with asyncio.timeout(self.deadline):
                return await self._request(method, path, limit, _headers(accept, headers))
        except TimeoutError:
            raise Unavailable(f"the backend's answer to {_what(path)} is too slow") from None
        except (httpx.HTTPError, httpx.InvalidURL) as e:
            raise Unavailable(f"the backend did not answer {_what(path)}: {e!r}") from None

    async def _request(
        self, method: str, path: str, limit: int | None, headers: dict[str, str]
    ) -> Answer:
        async with self.http.stream(method, path, headers=headers) as r:
            body = bytearray()
            if limit is not None and method != "HEAD":
                async for chunk in r.aiter_bytes():
                    _add(body, chunk, limit, path)
            return Answer(r.status_code, r.headers, bytes(body))

    async def get(self, path: str, limit: int, accept: str | None = None) -> Answer:
        return await self.request("GET", path, limit=limit, accept=accept)

    async def close(self) -> None:
        await self.http.aclose()


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(body)
    except RecursionError:
        raise ValueError("too deeply nested") from None
    if not isinstance(doc, dict):
        raise ValueError("not a JSON object")
    return doc
