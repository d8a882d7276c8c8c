"""Hook dispatch without mitmproxy's per-call overhead (one of the engine patches: hardening.py).

Profiled under load (py-spy, small authenticated GETs), mitmproxy spent about as much time
finding and calling hooks as our addons spent in them: for every hook of every request it walks
every addon (`traverse` + `getattr`), rebuilds the hook's arguments from its dataclass fields
once per addon, enters a `contextlib` context manager per call, then does all of it once more
for an `update` hook nobody here handles; and every Request/Response it builds type-checks each
field at run time. Here:

- the callables of each hook are looked up once and kept (per AddonManager; the list is
  dropped whenever an addon is added or removed),
- a hook's arguments are built once per event, from field names looked up once per hook type,
- errors are handled as `safecall` does ("Addon error" logged, AddonHalt and OptionsError
  raised on), with a plain try/except,
- message field type checks are skipped: mitmproxy runs them only under `__debug__` (they
  guard its own construction of messages, and vanish with `python -O`).

The order in which addons see a hook, and what each receives, are unchanged.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
from collections.abc import Callable
from typing import Any

from mitmproxy import addonmanager, exceptions, hooks, http

logger = logging.getLogger(addonmanager.__name__)

_add = addonmanager.AddonManager.add
_remove = addonmanager.AddonManager.remove
_clear = addonmanager.AddonManager.clear


def callables(manager: Any, name: str) -> list[Callable[..., Any]]:
    """Every callable for hook `name`, in chain order (children after their addon)."""
    cache: dict[str, list[Callable[..., Any]]] = manager.__dict__.setdefault("_tbf_hooks", {})
    found = cache.get(name)
    if found is None:
        found = []
        for addon in addonmanager.traverse(manager.chain):
            func = getattr(addon, name, None)
            if callable(func):
                found.append(func)
        cache[name] = found
    return found


async def trigger_event(self: Any, event: hooks.Hook) -> None:
    funcs = callables(self, event.name)
    if not funcs:
        return
    args = event.args()
    for func in funcs:
        try:
            result = func(*args)
            if result is not None and inspect.isawaitable(result):
                await result
        except exceptions.AddonHalt:
            return
        except exceptions.OptionsError:
            raise
        except Exception as e:
            logger.error(f"Addon error: {e}", exc_info=True)


def _forget(manager: Any) -> None:
    manager.__dict__.pop("_tbf_hooks", None)


def add(self: Any, *addons: Any) -> None:
    _forget(self)
    _add(self, *addons)
    _forget(self)


def remove(self: Any, addon: Any) -> None:
    _forget(self)
    _remove(self, addon)


def clear(self: Any) -> None:
    _forget(self)
    _clear(self)


_FIELDS: dict[type, tuple[str, ...]] = {}


def hook_args(self: hooks.Hook) -> list[Any]:
    """Hook.args without `dataclasses.fields` on every call: the names, once per hook type."""
    names = _FIELDS.get(type(self))
    if names is None:
        names = _FIELDS[type(self)] = tuple(f.name for f in dataclasses.fields(self))  # type: ignore[arg-type]
    return [getattr(self, name) for name in names]


def no_type_checks(self: Any) -> None:
    """Replaces MessageData.__post_init__ (run-time type checks of every field)."""


def patches() -> list[tuple[Any, str, Any]]:
    """(owner, attribute, replacement): applied and reverted by hardening.apply/revert."""
    return [
        (addonmanager.AddonManager, "trigger_event", trigger_event),
        (addonmanager.AddonManager, "add", add),
        (addonmanager.AddonManager, "remove", remove),
        (addonmanager.AddonManager, "clear", clear),
        (http.MessageData, "__post_init__", no_type_checks),
        (hooks.Hook, "args", hook_args),
    ]
