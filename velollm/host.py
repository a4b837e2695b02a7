"""The plugin host: finds plugins, isolates their failures, and offers a typed facade over hooks.

Built-in plugins (llama.cpp, native, model sources) are ordinary plugin modules registered by
module name, exactly like third-party ones found through the ``velollm`` entry-point group.
A plugin that fails to import, fails validation, or raises inside a hook is recorded as a
:class:`PluginFailure` and skipped; the host keeps working with the rest.

A plugin module may declare the plugin API it was written for, ``VELOLLM_PLUGIN_API = "2"``; one
that targets another version than :data:`velollm.engine.PLUGIN_API_VERSION` is recorded as a
failure (stage ``"api"``) and skipped, instead of failing later in a confusing way.

Environment:
  ``VELOLLM_LOAD_PLUGINS``    comma list of third-party plugins to load (entry-point or
                              distribution names); set but empty loads none of them.
  ``VELOLLM_DISABLE_PLUGINS`` comma list of plugins (built-in or not) never to register.
"""

from __future__ import annotations

import importlib
import os
import threading
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import metadata
from types import ModuleType
from typing import TYPE_CHECKING, Any

import pluggy

from velollm import hookspecs
from velollm.engine import PLUGIN_API_VERSION
from velollm.errors import BackendNotFound, PluginError

if TYPE_CHECKING:
    from velollm.engine import Backend
    from velollm.models import ModelSource

ENTRY_POINT_GROUP = "velollm"
#: The module attribute a plugin sets to the plugin API version it targets.
API_ATTRIBUTE = "VELOLLM_PLUGIN_API"

#: Built-in plugins: name -> module. Registered like any other plugin, and can be disabled.
DEFAULT_PLUGINS: dict[str, str] = {
    "model_sources": "velollm.plugins.sources",
    "llamacpp": "velollm.plugins.llamacpp",
    "native": "velollm.plugins.native",
    "remote": "velollm.plugins.remote",
    "server": "velollm.server.plugin",
}


@dataclass
class PluginFailure:
    """Why a plugin (or one of its hooks) was skipped."""

    plugin: str
    stage: str  # "import", "api", "register", "validate", or the hook name
    error: str
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.plugin} ({self.stage}): {self.error}"


@dataclass
class PluginRecord:
    """What ``velollm plugins`` shows for one plugin."""

    name: str
    module: str
    builtin: bool
    distribution: str | None = None
    version: str | None = None
    api: str | None = None  # the plugin API version it targets (declared; built-ins: the current one)
    hooks: list[str] = field(default_factory=list)
    backends: list[str] = field(default_factory=list)
    model_sources: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _names(value: str | None) -> set[str] | None:
    if value is None:
        return None
    return {part.strip() for part in value.split(",") if part.strip()}


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def api_mismatch(plugin: str, declared: object) -> PluginError | None:
    """Why a plugin declaring ``VELOLLM_PLUGIN_API = declared`` cannot be loaded, or None when it can."""
    if str(declared) == PLUGIN_API_VERSION:
        return None
    from velollm import __version__

    return PluginError(
        f"plugin {plugin!r} targets velollm plugin API {declared!r}, but velollm {__version__} provides plugin API "
        f"{PLUGIN_API_VERSION!r}; install a release of the plugin made for API {PLUGIN_API_VERSION!r} "
        f"(or a velollm that provides API {declared!r})")


class Host:
    """A plugin manager with velollm's loading rules and failure isolation.

    Most code uses the process-wide :func:`get_host`; tests build their own with ``env`` and
    ``plugins`` to control exactly what is loaded.
    """

    def __init__(
        self,
        *,
        env: Mapping[str, str] | None = None,
        builtins: Mapping[str, str] | None = None,
        entry_points: bool = True,
    ) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.failures: list[PluginFailure] = []
        self._records: dict[str, PluginRecord] = {}
        self._mutex = threading.RLock()
        self._backends: dict[str, Backend] | None = None
        self._sources: list[ModelSource] | None = None
        env = os.environ if env is None else env
        self._load = _names(env.get("VELOLLM_LOAD_PLUGINS"))
        self._disabled = _names(env.get("VELOLLM_DISABLE_PLUGINS")) or set()
        for name, module in (DEFAULT_PLUGINS if builtins is None else builtins).items():
            self._register_module(name, module, builtin=True)
        if entry_points:
            self._load_entry_points()

    # --- registration ---------------------------------------------------------------------
    def _register_module(self, name: str, module: str, *, builtin: bool) -> None:
        if name in self._disabled:
            return
        try:
            mod = importlib.import_module(module)
        except Exception as exc:  # a broken plugin must never break the host
            self._fail(name, "import", exc, record=self._builtin_record(name, module, builtin))
            return
        self.register(mod, name=name, builtin=builtin, record=self._builtin_record(name, module, builtin))

    @staticmethod
    def _builtin_record(name: str, module: str, builtin: bool) -> PluginRecord:
        from velollm import __version__

        return PluginRecord(name, module, builtin, distribution="velollm" if builtin else None,
                            version=__version__ if builtin else None)

    def _load_entry_points(self) -> None:
        for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
            dist = ep.dist.name if ep.dist is not None else None
            if ep.name in self._disabled or (dist and dist in self._disabled):
                continue
            if self._load is not None and ep.name not in self._load and dist not in self._load:
                continue
            record = PluginRecord(ep.name, ep.value, builtin=False, distribution=dist,
                                  version=ep.dist.version if ep.dist is not None else None)
            try:
                obj = ep.load()
            except Exception as exc:
                self._fail(ep.name, "import", exc, record=record)
                continue
            self.register(obj, name=ep.name, builtin=False, record=record)

    def register(self, plugin: object, *, name: str | None = None, builtin: bool = False,
                 record: PluginRecord | None = None) -> bool:
        """Register a plugin object (usually a module); returns False if it was rejected."""
        name = name or getattr(plugin, "__name__", None) or repr(plugin)
        module = plugin.__name__ if isinstance(plugin, ModuleType) else type(plugin).__qualname__
        record = record or PluginRecord(name, module, builtin)
        declared = getattr(plugin, API_ATTRIBUTE, None)
        record.api = str(declared) if declared is not None else (PLUGIN_API_VERSION if builtin else None)
        with self._mutex:
            if name in self._disabled:
                return False
            mismatch = api_mismatch(name, declared) if declared is not None else None
            if mismatch is not None:
                self._fail(name, "api", mismatch, record=record)
                return False
            try:
                self.pm.register(plugin, name=name)
            except Exception as exc:
                self._fail(name, "register", exc, record=record)
                return False
            try:
                self.pm.check_pending()
            except pluggy.PluginValidationError as exc:
                self.pm.unregister(name=name)
                self._fail(name, "validate", exc, record=record)
                return False
            record.hooks = sorted(impl.name for impl in self.pm.get_hookcallers(plugin) or [])
            self._records[name] = record
            self._backends = None
            self._sources = None
            return True

    def unregister(self, name: str) -> None:
        with self._mutex:
            self.pm.unregister(name=name)
            self._records.pop(name, None)
            self._backends = None
            self._sources = None

    def _fail(self, plugin: str, stage: str, exc: BaseException, *, record: PluginRecord | None = None) -> None:
        failure = PluginFailure(plugin, stage, _describe(exc), "".join(traceback.format_exception(exc)))
        self.failures.append(failure)
        if record is not None:
            record.failures.append(str(failure))
            self._records.setdefault(plugin, record)

    # --- calling hooks, one implementation at a time --------------------------------------
    def call_each(self, hook_name: str, **kwargs: Any) -> list[tuple[str, Any]]:
        """Call every implementation of a hook separately; a raising one is recorded and skipped.

        Returns ``(plugin_name, result)`` pairs, in pluggy's call order.
        """
        caller = getattr(self.pm.hook, hook_name)
        results: list[tuple[str, Any]] = []
        for impl in caller.get_hookimpls():  # registration order: built-ins first
            args = {arg: kwargs[arg] for arg in impl.argnames}
            try:
                results.append((impl.plugin_name, impl.function(**args)))
            except Exception as exc:
                self._fail(impl.plugin_name, hook_name, exc, record=self._records.get(impl.plugin_name))
        return results

    def _collect(self, hook_name: str, key: Callable[[Any], str], kind: str) -> dict[str, tuple[str, Any]]:
        """Run a register-style hook; returns ``{key(item): (plugin, item)}``.

        A duplicate name is reported and skipped; a hook that raises loses everything it
        registered in that call, so a half-initialised plugin never leaks into the host.
        """
        found: dict[str, tuple[str, Any]] = {}
        current = ""

        def register(item: Any) -> None:
            name = key(item)
            if name in found:
                owner = found[name][0]
                error = ValueError(f"{kind} {name!r} is already registered by plugin {owner!r}; skipped")
                self._fail(current, hook_name, error, record=self._records.get(current))
                return
            found[name] = (current, item)

        for impl in getattr(self.pm.hook, hook_name).get_hookimpls():  # built-ins first, so they keep their names
            current = impl.plugin_name
            before = dict(found)
            try:
                impl.function(register=register)
            except Exception as exc:
                found = before
                self._fail(impl.plugin_name, hook_name, exc, record=self._records.get(impl.plugin_name))
        return found

    # --- typed facade -----------------------------------------------------------------------
    def backends(self) -> dict[str, Backend]:
        """All registered backends by name."""
        with self._mutex:
            if self._backends is None:
                found = self._collect("register_backends", lambda b: str(b.name), "backend")
                for plugin, backend in found.values():
                    if plugin in self._records:
                        self._records[plugin].backends.append(backend.name)
                self._backends = {name: backend for name, (_, backend) in found.items()}
            return dict(self._backends)

    def backend(self, name: str) -> Backend:
        backends = self.backends()
        try:
            return backends[name]
        except KeyError:
            known = ", ".join(sorted(backends)) or "none"
            raise BackendNotFound(f"no backend named {name!r} (registered: {known})") from None

    def model_sources(self) -> list[ModelSource]:
        """All registered model sources, most specific first (lower ``priority`` first)."""
        with self._mutex:
            if self._sources is None:
                found = self._collect("register_model_sources", lambda s: str(s.name), "model source")
                for plugin, source in found.values():
                    if plugin in self._records:
                        self._records[plugin].model_sources.append(source.name)
                self._sources = sorted((s for _, s in found.values()), key=lambda s: getattr(s, "priority", 100))
            return list(self._sources)

    def hardware_facts(self) -> dict[str, Any]:
        facts: dict[str, Any] = {}
        for _plugin, result in self.call_each("collect_hardware_facts"):
            if result:
                facts.update(result)
        return facts

    def register_commands(self, cli: Any) -> None:
        self.call_each("register_commands", cli=cli)

    def plugins(self) -> list[PluginRecord]:
        """Every plugin seen, loaded or failed, with what it registered."""
        self.backends()
        self.model_sources()
        with self._mutex:
            return sorted(self._records.values(), key=lambda r: (not r.builtin, r.name))

    def plugin_names(self) -> list[str]:
        return [name for name, _ in self.pm.list_name_plugin()]


_host: Host | None = None
_host_lock = threading.Lock()


def get_host() -> Host:
    """The process-wide host, built on first use."""
    global _host
    with _host_lock:
        if _host is None:
            _host = Host()
        return _host


def set_host(host: Host | None) -> Host | None:
    """Replace the process-wide host (tests, embedding applications); returns the old one."""
    global _host
    with _host_lock:
        old, _host = _host, host
        return old

