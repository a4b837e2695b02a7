"""Turn what a (small) model wrote into a signature's typed output fields.

Four strategies, tried in order, each contributing the fields it can type:

1. **markers** — ``[[ ## field ## ]]`` sections, tolerant of the variants small models write
   (``[[## Field ##]]``, ``## field ##``, a colon after the marker, text on the marker's line);
2. **json** — the first JSON object in the text (inside prose or code fences), repaired with
   ``json_repair`` when truncated or sloppy, its keys matched to the output fields;
3. **lines** — ``Field: value`` lines (case-insensitive names at the start of a line, ``**bold**``
   or a list dash allowed), a value running on until the next field line: what models write for
   backends and servers that cannot constrain;
4. **single** — with one output field, the whole text is its value.

A field takes the value of the first strategy that yields one that types correctly (DSPy's own
``parse_value``), so a marker section holding JSON, or markers for one field and JSON for
another, still parse. When fields remain missing or mistyped, :class:`ParseFailure` (an
``AdapterParseError``) says what was found and what went wrong, which the adapter feeds back to
the model on a retry.
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass, field
from typing import Any, Literal, get_args, get_origin

import json_repair
import pydantic
from dspy.adapters.utils import apply_output_field_defaults, parse_value
from dspy.signatures.signature import Signature
from dspy.utils.exceptions import AdapterParseError

ADAPTER_NAME = "velollm.Adapter"
COMPLETED = "completed"

_HEADER = re.compile(
    r"\[{1,2}[ \t]*#{1,3}[ \t]*(?P<a>[A-Za-z_][\w \-]{0,60}?)[ \t]*#{1,3}[ \t]*\]{1,2}[ \t]*:?"
    r"|^[ \t]*#{2,3}[ \t]*(?P<b>[A-Za-z_][\w\-]{0,60})[ \t]*#{0,3}[ \t]*:?[ \t]*$",
    re.MULTILINE,
)
_FENCE = re.compile(r"^\s*```[\w-]*\s*\n(?P<body>.*?)\n?\s*```\s*$", re.DOTALL)
_NUMBER = re.compile(r"[-+]?\d[\d,]*(?:\.\d+)?(?:[eE][-+]?\d+)?")


class ParseFailure(AdapterParseError):
    """No strategy recovered every output field; ``found``/``missing``/``invalid`` say what happened."""

    def __init__(self, signature: type[Signature], lm_response: str, report: ParseReport, message: str) -> None:
        self.report = report
        self.found = dict(report.values)
        self.missing = report.missing(signature)
        self.invalid = dict(report.invalid)
        super().__init__(ADAPTER_NAME, signature, lm_response, message=message, parsed_result=self.found)


@dataclass
class ParseReport:
    """Per field: the typed value that won, and the typing errors seen on the way."""

    values: dict[str, Any] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)
    invalid: dict[str, str] = field(default_factory=dict)
    strategies: dict[str, list[str]] = field(default_factory=dict)

    def missing(self, signature: type[Signature]) -> list[str]:
        return [name for name in signature.output_fields if name not in self.values and name not in self.invalid]

    def offer(self, strategy: str, name: str, raw: Any, annotation: Any) -> None:
        self.strategies.setdefault(strategy, []).append(name)
        if name in self.values:
            return
        try:
            self.values[name] = coerce(raw, annotation)
        except (ValueError, TypeError, pydantic.ValidationError) as exc:
            problem = f"{_short(raw)!r} is not a valid {_type_name(annotation)}: {_first_line(exc)}"
            self.invalid.setdefault(name, problem)
            return
        self.sources[name] = strategy
        self.invalid.pop(name, None)


# --- small helpers ------------------------------------------------------------------------------
def _short(value: Any, limit: int = 80) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def normalize_name(name: str) -> str:
    return re.sub(r"[\s\-]+", "_", name.strip().strip("`'\"*").lower())


def strip_fences(text: str) -> str:
    match = _FENCE.match(text)
    return match.group("body") if match else text


# --- typing values ------------------------------------------------------------------------------
def _literal_match(value: str, allowed: tuple[Any, ...]) -> Any:
    """``"Positive."`` for ``Literal["positive", ...]``: one unambiguous case/punctuation-insensitive hit."""
    key = value.strip().strip("\"'`*.").strip().casefold()
    hits = [a for a in allowed if isinstance(a, str) and a.casefold() == key]
    return hits[0] if len(hits) == 1 else value


def coerce(raw: Any, annotation: Any) -> Any:
    """``raw`` (text or decoded JSON) typed as ``annotation`` with DSPy's ``parse_value``."""
    if annotation is str:
        if isinstance(raw, str):
            return raw.strip()
        return json.dumps(raw, ensure_ascii=False) if isinstance(raw, (dict, list)) else str(raw)
    if isinstance(raw, str):
        raw = strip_fences(raw.strip())
        if get_origin(annotation) is Literal:
            raw = _literal_match(raw, get_args(annotation))
    try:
        return parse_value(raw, annotation)
    except (ValueError, TypeError, pydantic.ValidationError):
        if annotation in (int, float) and isinstance(raw, str):
            numbers = _NUMBER.findall(raw)
            if len(numbers) == 1:  # "The answer is 7." -> 7; "3+4=7" stays ambiguous
                return parse_value(numbers[0].replace(",", ""), annotation)
        raise


# --- strategy 1: markers ------------------------------------------------------------------------
def _headers(text: str, known: set[str] | None) -> list[re.Match[str]]:
    """Marker matches; a bare ``## name`` line counts only for known names (else it is Markdown)."""
    return [m for m in _HEADER.finditer(text)
            if m.group("a") or known is None or normalize_name(m.group("b")) in known]


def find_markers(text: str, known: set[str] | None = None) -> list[tuple[str, str]]:
    """``(normalized header name, section text)`` for every marker section, in order."""
    matches = _headers(text, known)
    sections = []
    for i, match in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        name = normalize_name(match.group("a") or match.group("b"))
        sections.append((name, text[match.end():end].strip()))
    return sections


def match_keys(found: dict[str, Any], fields: list[str]) -> dict[str, Any]:
    """Map found keys onto field names: exact, normalized, close spelling, then the lone leftover."""
    result: dict[str, Any] = {}
    leftovers: dict[str, Any] = {}
    normalized = {normalize_name(f): f for f in fields}
    for key, value in found.items():
        name = key if key in fields else normalized.get(normalize_name(key))
        if name is None:
            close = difflib.get_close_matches(normalize_name(key), list(normalized), n=1, cutoff=0.75)
            name = normalized[close[0]] if close else None
        if name is not None and name not in result:
            result[name] = value
        else:
            leftovers[key] = value
    unmatched = [f for f in fields if f not in result]
    if len(unmatched) == 1 and len(leftovers) == 1:
        result[unmatched[0]] = next(iter(leftovers.values()))
    return result


def _known(signature: type[Signature]) -> set[str]:
    return {normalize_name(n) for n in (*signature.input_fields, *signature.output_fields, COMPLETED)}


def strip_markers(text: str, known: set[str] | None = None) -> str:
    """The text before ``[[ ## completed ## ]]`` with marker headers removed."""
    pieces, last = [], 0
    for match in _headers(text, known):
        pieces.append(text[last:match.start()])
        last = match.end()
        if normalize_name(match.group("a") or match.group("b")) == COMPLETED:
            return "".join(pieces)
    pieces.append(text[last:])
    return "".join(pieces)


def markers_strategy(signature: type[Signature], text: str, report: ParseReport) -> None:
    fields = list(signature.output_fields)
    first: dict[str, str] = {}
    for name, body in find_markers(text, _known(signature)):
        if name == COMPLETED or name in signature.input_fields:
            continue
        first.setdefault(name, body)
    for name, body in match_keys(first, fields).items():
        report.offer("markers", name, body, signature.output_fields[name].annotation)


# --- strategy 2: JSON ---------------------------------------------------------------------------
def find_json_object(text: str, *, max_starts: int = 8) -> dict[str, Any] | None:
    """The first JSON object in ``text``: decoded strictly if possible, else repaired."""
    starts = [m.start() for m in re.finditer(r"\{", text)][:max_starts]
    decoder = json.JSONDecoder()
    for start in starts:
        try:
            value, _ = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            return value
    for start in starts:
        try:
            value = json_repair.loads(text[start:])
        except Exception:  # json_repair is best-effort; a crash there is just "no object"
            continue
        if isinstance(value, dict) and value:
            return value
    return None


def _as_whole(value: dict[str, Any], annotation: Any) -> bool:
    """Whether a JSON object is itself the value of a structured field (the model skipped the key)."""
    try:
        pydantic.TypeAdapter(annotation).validate_python(value)
    except (pydantic.ValidationError, TypeError, ValueError, pydantic.PydanticSchemaGenerationError):
        return False
    return True


def json_strategy(signature: type[Signature], text: str, report: ParseReport) -> None:
    obj = find_json_object(text)
    if obj is None:
        return
    fields = list(signature.output_fields)
    matched = match_keys(obj, fields)
    if len(fields) == 1 and not matched:
        annotation = signature.output_fields[fields[0]].annotation
        if annotation is not str and _as_whole(obj, annotation):
            matched = {fields[0]: obj}
    for name, value in matched.items():
        report.offer("json", name, value, signature.output_fields[name].annotation)


# --- strategy 3: "Field: value" lines -------------------------------------------------------------
_LINE = re.compile(r"^[ \t]*(?:[-*][ \t]+)?[*_`]{0,2}(?P<name>[A-Za-z_][\w \-]{0,60}?)[*_`]{0,2}[ \t]*:[*_`]{0,2}[ \t]*"
                   r"(?P<value>.*)$", re.MULTILINE)


def find_field_lines(text: str, known: set[str]) -> list[tuple[str, str]]:
    """``(normalized name, value)`` for lines starting ``Name:`` with a known field name; a value
    runs on over the following lines until the next such line."""
    matches = [m for m in _LINE.finditer(text) if normalize_name(m.group("name")) in known]
    sections = []
    for i, match in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        value = (match.group("value") + text[match.end():end]).strip()
        sections.append((normalize_name(match.group("name")), value))
    return sections


def lines_strategy(signature: type[Signature], text: str, report: ParseReport) -> None:
    outputs = {normalize_name(n): n for n in signature.output_fields}
    first: dict[str, str] = {}
    for name, value in find_field_lines(strip_markers(text, _known(signature)), _known(signature)):
        if name in outputs and value:
            first.setdefault(outputs[name], value)
    for name, value in first.items():
        report.offer("lines", name, value, signature.output_fields[name].annotation)


# --- strategy 4: the whole text for a lone field -------------------------------------------------
def single_strategy(signature: type[Signature], text: str, report: ParseReport) -> None:
    if len(signature.output_fields) != 1:
        return
    name, info = next(iter(signature.output_fields.items()))
    body = strip_fences(strip_markers(text, _known(signature)).strip())
    if body:
        report.offer("single", name, body, info.annotation)


STRATEGIES = (("markers", markers_strategy), ("json", json_strategy), ("lines", lines_strategy),
              ("single", single_strategy))


def parse_completion(signature: type[Signature], text: str) -> dict[str, Any]:
    """Typed output fields from ``text``, or :class:`ParseFailure` saying what is missing/invalid."""
    report = ParseReport()
    for _name, strategy in STRATEGIES:
        strategy(signature, text, report)
        if all(name in report.values for name in signature.output_fields):
            break
    values = apply_output_field_defaults(signature, report.values)
    if values.keys() == signature.output_fields.keys():
        return values
    raise ParseFailure(signature, text, report, describe(signature, text, report))


def describe(signature: type[Signature], text: str, report: ParseReport) -> str:
    """One paragraph a model (or a person) can act on."""
    if not text.strip():
        return "The answer was empty."
    parts = []
    if report.values:
        parts.append("Found " + ", ".join(f"`{n}`" for n in report.values) + ".")
    missing = [n for n in report.missing(signature) if n not in report.values]
    if missing:
        parts.append("Missing " + ", ".join(f"`{n}`" for n in missing) + ".")
    for name, problem in report.invalid.items():
        parts.append(f"Field `{name}`: {problem}.")
    return " ".join(parts)
