"""The server's config file (``velollm serve --config team.toml``): TOML or YAML, checked by pydantic.

A team's server runs several models that need different settings (a long context for one, few
threads for another, one kept loaded, one loaded on demand), which one ``--ctx``/``--threads``
cannot say. The file is validated before anything loads, and every error names the file and the
line it comes from, since the person reading it is editing that file. Command-line flags still
work and override the file (:func:`apply_flags`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from velollm.errors import ConfigError, InvalidRequest, VeloError
from velollm.pool.status import parse_keep_alive

#: Model ids and aliases: what clients put in ``"model"`` (no slashes, no spaces).
ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]*$")
#: llama.cpp KV-cache element types and their ggml type numbers (``type_k``/``type_v``).
KV_CACHE_TYPES: dict[str, int] = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8,
                                  "iq4_nl": 20, "bf16": 30}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)(b?)\s*$", re.IGNORECASE)

__all__ = ["ConfigError", "ModelConfig", "ServerSection", "TeamConfig", "apply_flags", "check_report", "load_config",
           "make_pool", "parse_duration", "parse_size", "to_server_config"]


def parse_size(value: int | float | str) -> int:
    """Bytes from a number or a size like ``"6GiB"``, ``"512 MB"``, ``"8G"`` (binary units for G/M/K)."""
    if isinstance(value, bool):
        raise ValueError(f"a size, not {value!r}")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return int(value)
    match = _SIZE.match(str(value))
    if not match:
        raise ValueError(f"{value!r} is not a size (bytes, or like '6GiB', '512MiB')")
    number, unit, binary, byte = match.groups()
    power = "kmgt".find(unit.lower()) + 1 if unit else 0
    base = 1024 if binary or not byte else 1000  # "6G" and "6GiB" are binary, "6GB" decimal
    return int(float(number) * base**power)


def parse_duration(value: int | float | str | None) -> float | None:
    """Seconds from a number or an Ollama-style duration ("30s", "5m", "1h", "-1" = forever); the pool's parser,
    with a ValueError for pydantic to report against the config line."""
    if value is None:
        return None
    try:
        return parse_keep_alive(value)
    except InvalidRequest as exc:
        raise ValueError(str(exc).replace("keep_alive ", "", 1)) from None


class ModelConfig(BaseModel):
    """One served model: ``[models.<id>]`` in the file."""

    model_config = ConfigDict(extra="forbid")

    ref: str = Field(min_length=1, description="a pool reference: path, catalogue name, hf:..., remote:...")
    aliases: list[str] = Field(default_factory=list, description="other names clients may use")
    n_ctx: int | None = Field(default=None, ge=16, description="context window (tokens)")
    n_gpu_layers: int | None = Field(default=None, ge=-1, description="layers on the GPU; -1 all; unset: placement")
    threads: int | None = Field(default=None, ge=1, description="CPU threads")
    kv_cache_type: Literal["f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0", "iq4_nl"] | None = None
    parallel: int | None = Field(default=None, ge=1, le=64, description="sequences decoded at once")
    draft_model: str | None = Field(default=None, description="a smaller model of the same family to draft with")
    chat_template: str | None = Field(default=None, description="a built-in chat format name overriding the GGUF's")
    keep_alive: float | None = Field(default=None, description="seconds idle before unloading; -1 never; 0 at once")
    load_at_start: bool = False

    @field_validator("keep_alive", mode="before")
    @classmethod
    def _keep_alive(cls, value: Any) -> float | None:
        return parse_duration(value)

    @field_validator("aliases")
    @classmethod
    def _aliases(cls, value: list[str]) -> list[str]:
        for alias in value:
            if not ID_PATTERN.match(alias):
                raise ValueError(f"alias {alias!r}: use letters, digits and . _ : - (no spaces or slashes)")
        return value

    @field_validator("chat_template")
    @classmethod
    def _template(cls, value: str | None) -> str | None:
        if value is None:
            return None
        from velollm.chat_templates import BUILTIN_TEMPLATES

        if value not in BUILTIN_TEMPLATES and value not in ("auto", "gguf"):
            raise ValueError(f"unknown chat template {value!r}; built-in: {', '.join(sorted(BUILTIN_TEMPLATES))}")
        return value

    def load_options(self) -> dict[str, Any]:
        """The pool's load options for this model (only what the file sets: placement decides the rest)."""
        options: dict[str, Any] = {}
        if self.n_ctx is not None:
            options["n_ctx"] = self.n_ctx
        if self.threads is not None:
            options["n_threads"] = self.threads
        if self.n_gpu_layers is not None:
            options["n_gpu_layers"] = self.n_gpu_layers
        if self.draft_model is not None:
            options["draft_model"] = self.draft_model
        if self.chat_template is not None:
            options["chat_format"] = self.chat_template
        if self.parallel is not None:
            options.update(parallel_option(self.parallel))
        if self.kv_cache_type is not None and self.kv_cache_type != "f16":
            options.update(kv_cache_options(self.kv_cache_type))
        return options


def kv_cache_options(kind: str) -> dict[str, Any]:
    """Load options for a KV-cache type: LoadOptions' own ``type_k``/``type_v`` where this build has
    them, else llama.cpp's ggml type numbers passed through ``extra``."""
    from velollm.engine import LoadOptions

    fields = LoadOptions.model_fields
    options: dict[str, Any] = ({"type_k": kind, "type_v": kind} if "type_k" in fields and "type_v" in fields
                               else {"extra": {"type_k": KV_CACHE_TYPES[kind], "type_v": KV_CACHE_TYPES[kind]}})
    if kind not in ("f32", "bf16"):
        options["flash_attn"] = True  # llama.cpp quantizes the V cache only with flash attention
    return options


def parallel_option(parallel: int) -> dict[str, Any]:
    """The LoadOptions field for parallel sequences, under the name this build's engine uses."""
    from velollm.engine import LoadOptions

    for name in ("parallel", "n_parallel", "n_seq_max"):
        if name in LoadOptions.model_fields:
            return {name: parallel}
    if parallel == 1:
        return {}
    raise ValueError("this velollm build decodes one sequence at a time per model: 'parallel' must be 1")


class Limits(BaseModel):
    """How much waiting the server allows, per model."""

    model_config = ConfigDict(extra="forbid")

    queue_size: int = Field(default=64, ge=0, description="requests that may wait for one model")
    queue_timeout: float = Field(default=300.0, gt=0, description="seconds a request may wait for its turn")
    max_loaded: int | None = Field(default=None, ge=1, description="models loaded at once")

    @field_validator("queue_timeout", mode="before")
    @classmethod
    def _timeout(cls, value: Any) -> float | None:
        return parse_duration(value)


class ServerSection(BaseModel):
    """``[server]``: where to listen, who may call, what the pool may hold."""

    model_config = ConfigDict(extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    api_keys_file: Path | None = None
    cors_origins: list[str] = Field(default_factory=list)
    memory_budget: int | None = Field(default=None, description="bytes (or '6GiB') the pool may keep loaded")
    keep_alive: float = Field(default=300.0, description="default seconds an idle model stays loaded")
    allow_any_model: bool = False
    log_requests: bool = True
    limits: Limits = Field(default_factory=Limits)

    @field_validator("keep_alive", mode="before")
    @classmethod
    def _keep_alive(cls, value: Any) -> float | None:
        return parse_duration(value)

    @field_validator("memory_budget", mode="before")
    @classmethod
    def _size(cls, value: Any) -> int | None:
        return None if value is None else parse_size(value)

    @field_validator("cors_origins")
    @classmethod
    def _origins(cls, value: list[str]) -> list[str]:
        for origin in value:
            if origin != "*" and not re.match(r"^https?://[^/\s]+$", origin):
                raise ValueError(f"CORS origin {origin!r}: use scheme://host[:port] with no path, or '*'")
        return value


class TeamConfig(BaseModel):
    """The whole file: ``[server]`` and one ``[models.<id>]`` table per served model."""

    model_config = ConfigDict(extra="forbid")

    server: ServerSection = Field(default_factory=ServerSection)
    models: dict[str, ModelConfig] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _unique_names(self) -> TeamConfig:
        seen: dict[str, str] = {}
        for model_id, model in self.models.items():
            if not model_id or any(c.isspace() for c in model_id):
                raise ValueError(f"model id {model_id!r}: must be non-empty, without spaces")
            for name in (model_id, *model.aliases):
                if name in seen and seen[name] != model_id:
                    raise ValueError(f"the name {name!r} is used by both {seen[name]!r} and {model_id!r}")
                seen[name] = model_id
        return self

    def aliases(self) -> dict[str, str]:
        """alias -> model id."""
        return {alias: model_id for model_id, m in self.models.items() for alias in m.aliases}


# --- reading the file --------------------------------------------------------------------------------
def load_config(path: str | Path) -> TeamConfig:
    """Read and validate a TOML (``.toml``) or YAML (``.yaml``/``.yml``) config; errors name the line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read the config file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file") from None
    yaml = path.suffix.lower() in (".yaml", ".yml")
    data, lines = (_read_yaml if yaml else _read_toml)(text, path)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}:1: the file must hold a table/mapping with 'server' and 'models'")
    try:
        config = TeamConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError("\n".join(_describe(error, path, lines) for error in exc.errors())) from None
    base = path.parent
    if config.server.api_keys_file is not None and not config.server.api_keys_file.is_absolute():
        config.server.api_keys_file = base / config.server.api_keys_file  # relative to the config file
    return config


def _describe(error: Any, path: Path, lines: dict[tuple[Any, ...], int]) -> str:
    loc = tuple(p for p in error["loc"] if not (isinstance(p, str) and p.startswith("function-")))
    line = _line_of(loc, lines)
    where = ".".join(str(p) for p in loc) or "(top level)"
    message = str(error["msg"]).removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        message = "unknown setting"
    return f"{path}:{line}: {where}: {message}"


def _line_of(loc: tuple[Any, ...], lines: dict[tuple[Any, ...], int]) -> int:
    for end in range(len(loc), 0, -1):
        if loc[:end] in lines:
            return lines[loc[:end]]
    return 1


def _read_toml(text: str, path: Path) -> tuple[Any, dict[tuple[Any, ...], int]]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]

    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        found = re.search(r"line (\d+)", str(exc))
        line = found.group(1) if found else "1"
        raise ConfigError(f"{path}:{line}: not valid TOML: {exc}") from None
    return data, _toml_lines(text)


_TOML_HEADER = re.compile(r"^\s*\[\[?\s*([^\[\]]+?)\s*\]\]?\s*(#.*)?$")
_TOML_KEY = re.compile(r"^\s*([A-Za-z0-9_\-\"'. ]+?)\s*=")


def _toml_keys(dotted: str) -> tuple[str, ...]:
    return tuple(part.strip().strip("\"'") for part in dotted.split("."))


def _toml_lines(text: str) -> dict[tuple[Any, ...], int]:
    """(table..., key) -> 1-based line, for tables and keys written in the usual one-per-line way."""
    lines: dict[tuple[Any, ...], int] = {}
    table: tuple[str, ...] = ()
    for number, line in enumerate(text.splitlines(), start=1):
        header = _TOML_HEADER.match(line)
        if header:
            table = _toml_keys(header.group(1))
            for end in range(1, len(table) + 1):
                lines.setdefault(table[:end], number)
            continue
        key = _TOML_KEY.match(line)
        if key:
            lines.setdefault(table + _toml_keys(key.group(1)), number)
    return lines


def _read_yaml(text: str, path: Path) -> tuple[Any, dict[tuple[Any, ...], int]]:
    import yaml

    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 1
        raise ConfigError(f"{path}:{line}: not valid YAML: {exc.problem or exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    lines: dict[tuple[Any, ...], int] = {}

    def walk(node: Any, loc: tuple[Any, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                here = (*loc, key.value)
                lines.setdefault(here, key.start_mark.line + 1)
                walk(value, here)
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                lines.setdefault((*loc, index), item.start_mark.line + 1)
                walk(item, (*loc, index))

    if node is not None:
        walk(node, ())
    return data, lines


# --- flags over the file -------------------------------------------------------------------------------
def apply_flags(config: TeamConfig, *, models: list[str] | None = None, host: str | None = None,
                port: int | None = None, api_keys_file: str | Path | None = None,
                cors_origins: list[str] | None = None, ctx: int | None = None, threads: int | None = None,
                n_gpu_layers: int | None = None, parallel: int | None = None, preload: bool = False,
                allow_any_model: bool = False) -> TeamConfig:
    """A copy of ``config`` with the command line's settings on top (flags win over the file).

    ``--model`` adds a model (or replaces the one with the same id); ``--ctx``, ``--threads``,
    ``-ngl`` and ``--parallel`` apply to every model; ``--cors-origin`` adds origins.
    """
    data = config.model_dump(mode="python")
    server, served = data["server"], data["models"]
    for item in models or []:
        model_id, ref = split_model_flag(item)
        served[model_id] = {"ref": ref}
    for model in served.values():
        for name, value in (("n_ctx", ctx), ("threads", threads), ("n_gpu_layers", n_gpu_layers),
                            ("parallel", parallel)):
            if value is not None:
                model[name] = value
        if preload:
            model["load_at_start"] = True
    for name, value in (("host", host), ("port", port), ("api_keys_file", api_keys_file)):
        if value is not None:
            server[name] = value
    if cors_origins:
        known = server["cors_origins"]
        server["cors_origins"] = [*known, *(o for o in cors_origins if o not in known)]
    if allow_any_model:
        server["allow_any_model"] = True
    try:
        return TeamConfig.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {str(e['msg']).removeprefix('Value error, ')}"
                             for e in exc.errors())
        raise ConfigError(f"invalid command-line settings: {problems}") from None


def split_model_flag(item: str) -> tuple[str, str]:
    """``--model REF`` or ``--model ID=REF`` -> (id, ref); a path containing '=' stays whole."""
    alias, sep, ref = item.partition("=")
    if sep and ID_PATTERN.match(alias) and ref and not Path(item).exists():
        return alias, ref
    return item, item


# --- what the server runs ------------------------------------------------------------------------------
def to_server_config(config: TeamConfig, *, api_key: str | None = None) -> Any:
    """The app's :class:`~velollm.server.app.ServerConfig` (no models in the file: every pulled one)."""
    from velollm.server.access import KeyStore
    from velollm.server.app import ServerConfig, pulled_catalogue_models

    models = {model_id: m.ref for model_id, m in config.models.items()} or pulled_catalogue_models()
    server = config.server
    return ServerConfig(
        models=models, api_key=api_key, allow_any_model=server.allow_any_model,
        model_options={model_id: m.load_options() for model_id, m in config.models.items()},
        # every request sets its model's keep_alive (as Ollama's do): its own, else the model's, else the default
        keep_alive={model_id: m.keep_alive if m.keep_alive is not None else server.keep_alive
                    for model_id, m in config.models.items()},
        aliases=config.aliases(), preload_models=[i for i, m in config.models.items() if m.load_at_start],
        keys=KeyStore(api_key=api_key, keys_file=server.api_keys_file), cors_origins=list(server.cors_origins),
        log_requests=server.log_requests)


def make_pool(config: TeamConfig) -> Any:
    """A pool with the file's budget, limits and default keep_alive."""
    from velollm.pool import ModelPool

    limits = config.server.limits
    return ModelPool(memory_budget=config.server.memory_budget, max_loaded=limits.max_loaded,
                     keep_alive=config.server.keep_alive, queue_size=limits.queue_size,
                     queue_timeout=limits.queue_timeout)


def check_report(config: TeamConfig, source: str = "") -> tuple[list[str], bool]:
    """What ``serve --check`` prints: the keys file, then each model's placement, without loading anything.

    Returns the lines and whether everything can be served (every model places, the keys file parses).
    """
    from velollm import hardware, models
    from velollm.engine import LoadOptions
    from velollm.loading import prepare
    from velollm.placement import fmt_bytes
    from velollm.server.access import KeyStore, readable_by_others

    ok, lines = True, []
    server = config.server
    lines.append(f"config {source or '(flags only)'}: valid; listening on http://{server.host}:{server.port}/v1")
    if server.api_keys_file is not None:
        try:
            count = len(KeyStore(keys_file=server.api_keys_file))
            loose = " (WARNING: other users can read it: chmod 600)" if readable_by_others(server.api_keys_file) else ""
            lines.append(f"keys: {count} key(s) in {server.api_keys_file}{loose}")
        except VeloError as exc:
            ok = False
            lines.append(f"keys: ERROR {exc}")
    if server.cors_origins:
        lines.append(f"CORS origins: {', '.join(server.cors_origins)}")
    probe = hardware.probe()
    total = 0
    for model_id, model in config.models.items():
        names = f" (aliases: {', '.join(model.aliases)})" if model.aliases else ""
        keep = model.keep_alive if model.keep_alive is not None else server.keep_alive
        when = "loaded at start" if model.load_at_start else "loaded on first use"
        lines.append(f"{model_id}{names}: {model.ref} [{when}, keep_alive {keep:g} s]")
        try:  # never downloads: a model that is not here yet is an error of the check
            resolved = models.resolve(model.ref, download=False)
            prepared = prepare(model.ref, options=LoadOptions(**model.load_options()), probe=probe, resolved=resolved)
        except (VeloError, ValueError) as exc:
            ok = False
            lines.append(f"  ERROR: {exc}")
            continue
        plan = prepared.plan
        total += plan.memory_bytes if plan.accounted else 0
        lines.append(f"  backend: {plan.backend}, n_ctx: {plan.n_ctx}, threads: {plan.n_threads}, "
                     f"n_gpu_layers: {plan.n_gpu_layers}, memory: {fmt_bytes(plan.memory_bytes)}")
        lines += [f"    {line}" for line in plan.explain()]
    budget = server.memory_budget
    lines.append(f"all models loaded at once: {fmt_bytes(total)}"
                 + (f" of the {fmt_bytes(budget)} budget" if budget else " (budget: 90% of RAM + GPU memory)")
                 + ("; the pool evicts idle models to fit" if budget and total > budget else ""))
    return lines, ok
