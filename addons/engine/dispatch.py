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
  guard its own construction of messages, and vanish with `python -O`),
- a hook's reply goes back to the layers in the same step (`server_event`). mitmproxy starts
  every hook a layer yields as an asyncio task (eager: its first step runs at once) whose
  reply then waits for server_event's lock, and is fed on a later turn of the loop through a
  second server_event. Here a hook whose every callable is a plain function runs without a
  task, and the reply of any hook done when it is yielded (plain, or a task whose eager
  step finished it) is fed under the same lock, once the layers' commands for the event are
  out. What cannot finish at once keeps a task that feeds its own reply, as mitmproxy's
  does: a coroutine that really waits, an awaitable a plain function returned, an
  intercepted flow (`flow.intercept()` until `resume`), an OptionsError (raised in the task).

The order in which addons see a hook, and what each receives, are unchanged.
"""

from __future__ import annotations

import collections
import dataclasses
import inspect
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from mitmproxy import addonmanager, exceptions, flow, hooks, http
from mitmproxy.proxy import commands, events, mode_servers, server
from mitmproxy.utils import asyncio_utils

from addons.engine import readgate, splice

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


async def _call_all(funcs: list[Callable[..., Any]], args: Sequence[Any]) -> None:
    """Call each in order, awaiting what they return, as mitmproxy's `safecall` does: an
    AddonHalt ends the hook, an OptionsError is raised on, any other error is logged."""
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


async def trigger_event(self: Any, event: hooks.Hook) -> None:
    funcs = callables(self, event.name)
    if funcs:
        await _call_all(funcs, event.args())


def _forget(manager: Any) -> None:
    manager.__dict__.pop("_tbf_hooks", None)
    manager.__dict__.pop("_tbf_plain", None)


def plain(manager: Any, name: str) -> bool:
    """Whether hook `name` (and `update`, which mitmproxy triggers after every flow hook) has
    only plain functions, no coroutine function: then it can run inline."""
    cache: dict[str, bool] = manager.__dict__.setdefault("_tbf_plain", {})
    found = cache.get(name)
    if found is None:
        found = cache[name] = not any(
            inspect.iscoroutinefunction(func)
            for func in (*callables(manager, name), *callables(manager, "update"))
        )
    return found


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


# ------------------------------------------------------------- hooks inline (server_event)
#
# A copy of mitmproxy 12.3.1's ConnectionHandler.server_event (proxy/server.py), whose only
# change is what happens to a StartHook command: see the module docstring.

Stage = tuple[list[Callable[..., Any]], Sequence[Any]]  # callables, and their arguments


def _call(stages: list[Stage]) -> Awaitable[Any] | None:
    """Run the stages' callables in order, with trigger_event's error handling (AddonHalt ends
    a stage). None when all are done, else an awaitable that finishes them (in a task)."""
    for i, (funcs, args) in enumerate(stages):
        for j, func in enumerate(funcs):
            try:
                result = func(*args)
                if result is not None and inspect.isawaitable(result):
                    return _finish(result, [(funcs[j + 1 :], args), *stages[i + 1 :]])
            except exceptions.AddonHalt:
                break
            except exceptions.OptionsError as e:
                return _raise(e)  # raised in the hook's task, as mitmproxy's own path does
            except Exception as e:
                logger.error(f"Addon error: {e}", exc_info=True)
    return None


async def _raise(error: BaseException) -> None:
    raise error


async def _finish(pending: Awaitable[Any], stages: list[Stage]) -> None:
    """What remains of a hook after one of its plain functions returned an awaitable."""
    try:
        await pending
    except exceptions.AddonHalt:
        stages[0] = ([], ())
    except exceptions.OptionsError:
        raise
    except Exception as e:
        logger.error(f"Addon error: {e}", exc_info=True)
    for funcs, args in stages:
        await _call_all(funcs, args)


class _Reply:
    """Whether a hook's task is still in its first, eager step (mitmproxy runs the loop with
    asyncio's eager task factory), and whether that step finished the hook."""

    __slots__ = ("done", "eager")

    def __init__(self) -> None:
        self.eager, self.done = True, False


async def _hook_task(self: Any, hook: commands.StartHook, reply: _Reply) -> None:
    """mitmproxy's hook_task, but a hook done within its eager step leaves its reply to the
    server_event that started it (`reply.done`) instead of waiting for that one's lock."""
    await self.handle_hook(hook)
    if hook.blocking:
        if reply.eager:
            reply.done = True
            return
        await self.server_event(events.HookCompleted(hook))


async def _rest(self: Any, hook: commands.StartHook, pending: Awaitable[Any]) -> None:
    """The rest of a hook of plain functions that could not finish inline, then its reply."""
    with self.timeout_watchdog.disarm():
        await pending
        data = hook.args()[0]
        if isinstance(data, flow.Flow):
            await data.wait_for_resume()
    if hook.blocking:
        await self.server_event(events.HookCompleted(hook))


def _start_hook(self: Any, hook: commands.StartHook) -> bool:
    """Run a hook. True when it is done and its reply (if blocking) is the caller's to feed."""
    manager = self.master.addons
    reply = None
    if plain(manager, hook.name):
        (data,) = hook.args()  # mitmproxy: single-argument hooks only
        stages: list[Stage] = [(callables(manager, hook.name), (data,))]
        if isinstance(data, flow.Flow):
            stages.append((callables(manager, "update"), ([data],)))
        pending = _call(stages)
        if pending is None and isinstance(data, flow.Flow) and data.intercepted:
            pending = data.wait_for_resume()
        if pending is None:
            return True
        work = _rest(self, hook, pending)
    else:
        reply = _Reply()
        work = _hook_task(self, hook, reply)
    task = asyncio_utils.create_task(
        work, name=f"handle_hook({hook.name})", keep_ref=True, client=self.client.peername
    )
    if hook.blocking and task is not None and not task.done():
        readgate.hold(self, task)  # its client is not read until it is done
    if reply is None:
        return False
    reply.eager = False
    return reply.done


def _execute(self: Any, command: commands.Command) -> None:
    """Any other command of a layer, as mitmproxy's server_event carries it out."""
    if isinstance(command, commands.OpenConnection):
        assert command.connection not in self.transports
        handler = asyncio_utils.create_task(
            self.open_connection(command),
            name=f"server connection handler {command.connection.address}",
            keep_ref=False,
            client=self.client.peername,
        )
        self.transports[command.connection] = server.ConnectionIO(handler=handler)
    elif isinstance(command, commands.RequestWakeup):
        task = asyncio_utils.create_task(
            self.wakeup(command),
            name=f"wakeup timer ({command.delay:.1f}s)",
            keep_ref=False,
            client=self.client.peername,
        )
        assert task is not None
        self.wakeup_timer.add(task)
    elif (
        isinstance(command, commands.ConnectionCommand)
        and command.connection not in self.transports
    ):
        pass  # The connection has already been closed.
    elif isinstance(command, commands.SendData):
        writer = self.transports[command.connection].writer
        assert writer
        if not writer.is_closing():
            writer.write(command.data)
    elif isinstance(command, commands.CloseTcpConnection):
        self.close_connection(command.connection, command.half_close)
    elif isinstance(command, commands.CloseConnection):
        self.close_connection(command.connection, False)
    elif isinstance(command, commands.Log):
        self.log(command.message, command.level)
    elif isinstance(command, splice.Offer):
        splice.take_offer(self, command)
    else:
        raise RuntimeError(f"Unexpected command: {command}")


def _feed(self: Any, event: events.Event, replies: collections.deque[Any]) -> None:
    """The layers' commands for one event. A hook runs when it is yielded (as mitmproxy's
    eager task does); a blocking hook done by then has its reply queued in `replies`."""
    try:
        for command in self.layer.handle_event(event):
            if isinstance(command, commands.StartHook):
                if _start_hook(self, command) and command.blocking:
                    replies.append(command)
            else:
                _execute(self, command)
    except Exception:
        self.log("mitmproxy has crashed!", logging.ERROR, exc_info=True)


async def server_event(self: Any, event: events.Event) -> None:
    """mitmproxy's server_event, except that the reply of a hook done at once goes back to
    the layers in the same step, under the same lock, instead of on a later turn of the loop
    through a second server_event."""
    async with self._server_event_lock:
        # No `await` beyond this point.
        self.timeout_watchdog.register_activity()
        replies: collections.deque[commands.StartHook] = collections.deque()
        _feed(self, event, replies)
        while replies:
            _feed(self, events.HookCompleted(replies.popleft()), replies)


def patches() -> list[tuple[Any, str, Any]]:
    """(owner, attribute, replacement): applied and reverted by hardening.apply/revert."""
    return [
        (addonmanager.AddonManager, "trigger_event", trigger_event),
        (addonmanager.AddonManager, "add", add),
        (addonmanager.AddonManager, "remove", remove),
        (addonmanager.AddonManager, "clear", clear),
        (http.MessageData, "__post_init__", no_type_checks),
        (hooks.Hook, "args", hook_args),
        (mode_servers.ProxyConnectionHandler, "server_event", server_event),
    ]
