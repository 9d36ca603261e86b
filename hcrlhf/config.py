"""One config system for every settings section: :class:`Section`, :class:`ConfigError`, overrides, YAML.

Every settings object of hcrlhf (``SafeRLConfig``, ``ScoreTrainingConfig``, the pipeline's ``data``,
``models``, ``safety``, ``sft``, ``evaluation`` sections and ``PipelineConfig`` itself) is a dataclass
deriving from :class:`Section`, so each one:

* is **checked on creation** (``__post_init__``): types from the field annotations, then the section's own
  rules (:meth:`Section.check`); an invalid section never exists;
* reports **every problem at once** in one :class:`ConfigError`, each naming its dotted key
  (``rl.kl_coef``) — unknown keys with a did-you-mean hint;
* loads from a mapping (:meth:`Section.from_dict`, nested sections included) or a YAML file
  (:meth:`Section.from_yaml`), and takes dotted ``key=value`` overrides (:func:`apply_overrides`, the
  command line's ``hcrlhf run cfg.yaml rl.kl_coef=0.05``);
* documents itself: one ``Attributes:`` entry per field in the class docstring, from which
  ``docs/config.md`` is generated (``python -m hcrlhf.config > docs/config.md``).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import re
import typing
from pathlib import Path

__all__ = ["ConfigError", "Problems", "Section", "apply_overrides", "parse_override", "read_yaml", "reference"]


class ConfigError(ValueError):
    """Bad settings. ``problems`` lists every ``(key, message)`` found; ``key`` is the first one's dotted key.

    Raised before any work starts; it never leaves a half-made config or anything on disk behind.
    """

    def __init__(self, problems, message: str | None = None, *, owner: str | None = None):
        if isinstance(problems, str):  # ConfigError("safety.delta", "must be in (0, 1)")
            problems = [(problems, message or "is invalid")]
        self.problems = [(str(key), str(text)) for key, text in problems]
        self.owner = owner
        self.key = self.problems[0][0] if self.problems else ""
        lines = [f"config key {key!r}: {text}" for key, text in self.problems]
        head = f"{owner}: " if owner else ""
        if len(lines) == 1:
            super().__init__(head + lines[0])
        else:
            super().__init__(head + f"{len(lines)} problems:\n  " + "\n  ".join(lines))

    def prefixed(self, prefix: str) -> ConfigError:
        """The same problems with ``prefix`` (e.g. ``"rl."``) before every key."""
        return ConfigError([(prefix + key, text) for key, text in self.problems])


class Problems:
    """Collects ``(key, message)`` problems; the check helpers skip ``None`` (an unset optional value)."""

    def __init__(self):
        self.items: list[tuple[str, str]] = []

    def __bool__(self) -> bool:
        return bool(self.items)

    def add(self, key: str, message: str) -> None:
        self.items.append((key, message))

    def choice(self, key: str, value, choices) -> None:
        # `is` for True/False so that 1 is not taken for True
        if not any(value is c or (type(value) is type(c) and value == c) for c in choices):
            self.add(key, f"must be one of {tuple(choices)}, got {value!r}")

    def at_least(self, key: str, value, minimum) -> None:
        if value is not None and not value >= minimum:
            self.add(key, f"must be >= {minimum}, got {value!r}")

    def positive(self, key: str, value) -> None:
        if value is not None and not (math.isfinite(value) and value > 0):
            self.add(key, f"must be a finite number > 0, got {value!r}")

    def nonnegative(self, key: str, value) -> None:
        if value is not None and not (math.isfinite(value) and value >= 0):
            self.add(key, f"must be a finite number >= 0, got {value!r}")

    def finite(self, key: str, value) -> None:
        if value is not None and not math.isfinite(value):
            self.add(key, f"must be finite, got {value!r}")

    def open_unit(self, key: str, value) -> None:
        """A probability such as δ: in the open interval (0, 1)."""
        if value is not None and not 0.0 < value < 1.0:
            self.add(key, f"must be in the open interval (0, 1), got {value!r}")

    def between(self, key: str, value, low: float, high: float) -> None:
        """In the closed interval [low, high]."""
        if value is not None and not low <= value <= high:
            self.add(key, f"must be in [{low}, {high}], got {value!r}")

    def raise_if_any(self, owner: str | None = None) -> None:
        if self.items:
            raise ConfigError(self.items, owner=owner)


# ------------------------------------------------------------------------------------- types


def type_name(hint) -> str:
    """A readable name of a type hint ("float | None", "list[str]", "SafetyConfig")."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is list and args:
        return f"list[{type_name(args[0])}]"
    if origin is dict:
        return "dict"
    if args:
        return " | ".join(type_name(a) for a in args)
    return "null" if hint is type(None) else getattr(hint, "__name__", str(hint))


def matches(value, hint) -> bool:
    """True when ``value`` is of type ``hint`` (bool, int, float, str, None, Any, unions, list[X], dict, classes).

    bool is never a number; an int is a float.
    """
    if hint is typing.Any:
        return True
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (list, dict):
        if not isinstance(value, origin):
            return False
        return origin is dict or not args or all(matches(v, args[0]) for v in value)
    if args:  # a union
        return any(matches(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, hint)


def coerce(value, hint):
    """YAML conveniences for a float field: a numeric string (``1e-6``, which PyYAML leaves a string) or an
    int becomes a float. Anything else is returned unchanged (check it with :func:`matches`)."""
    allowed = typing.get_args(hint) or (hint,)
    if float in allowed and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    if float in allowed and int not in allowed and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def _section_class(hint):
    """The Section subclass a field holds (``X`` or ``X | None``), else None."""
    for candidate in (hint, *typing.get_args(hint)):
        if isinstance(candidate, type) and issubclass(candidate, Section):
            return candidate
    return None


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


# ----------------------------------------------------------------------------------- the base


@dataclasses.dataclass
class Section:
    """Base of every settings dataclass: checked on creation, all problems at once, loadable and documented.

    Subclasses are ``@dataclass``-decorated, give every field a type annotation and a default (or are
    built by :meth:`from_dict`), document every field in an ``Attributes:`` block of their docstring, and
    put their value rules in :meth:`check`.
    """

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` listing every problem. Runs on creation; the trainers run it again on the
        config they are given, because a dataclass can be changed in place after it was created."""
        problems = Problems()
        hints = _hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not matches(value, hints[f.name]):
                problems.add(f.name, f"must be {type_name(hints[f.name])}, got {value!r} ({type(value).__name__})")
        if not problems:  # value rules assume the types are right
            self.check(problems)
        problems.raise_if_any(type(self).__name__)

    def check(self, problems: Problems) -> None:
        """Add a problem for every bad value or combination (keys are this section's field names)."""

    # ------------------------------------------------------------------------------- loading

    @classmethod
    def known_keys(cls) -> list[str]:
        """The keys a mapping for this section may hold."""
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, values, *, prefix: str = ""):
        """A section from a mapping (as read from YAML), nested sections included.

        Unknown keys (with a did-you-mean hint), wrong types and every value the sections' checks reject are
        collected and raised together as one :class:`ConfigError` whose keys carry ``prefix``. Floats may be
        given as ints or numeric strings.
        """
        problems, failed = Problems(), []
        values = _mapping(prefix.rstrip(".") or "<root>", values)
        known = cls.known_keys()
        hints = _hints(cls)
        for key in values:
            if key not in known:
                close = difflib.get_close_matches(str(key), known, n=1)
                hint = f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(sorted(known))}"
                problems.add(f"{prefix}{key}", f"unknown key; {hint}")
        kwargs = {}
        for key, value in values.items():
            if key not in known:
                continue
            hint = hints[key]
            nested = _section_class(hint)
            optional = type(None) in typing.get_args(hint)
            if nested is not None and (isinstance(value, nested) or (value is None and optional)):
                kwargs[key] = value  # a section built already, or an optional section left out
            elif nested is not None:
                try:
                    kwargs[key] = nested.from_dict(value, prefix=f"{prefix}{key}.")
                except ConfigError as error:
                    problems.items.extend(error.problems)
                    failed.append(f"{prefix}{key}.")
            else:
                value = coerce(value, hint)
                if matches(value, hint):
                    kwargs[key] = value
                else:
                    problems.add(f"{prefix}{key}", f"must be {type_name(hint)}, got {value!r} ({type(value).__name__})")
        # Build even when some keys were refused (their defaults stand in), to report the other keys' problems too —
        # but not what the checks say about a refused section's stand-in defaults ("data.prompts is required" when
        # the data section was refused for another key): those would name keys the user did set.
        try:
            built = cls(**kwargs)
        except ConfigError as error:
            problems.items.extend(item for item in error.prefixed(prefix).problems
                                  if not str(item[0]).startswith(tuple(failed)))
        except TypeError as error:  # a required field is missing
            problems.add(prefix.rstrip(".") or "<root>", str(error))
        if problems:
            raise ConfigError(problems.items)
        return built

    @classmethod
    def from_yaml(cls, path, overrides: typing.Sequence[str] = ()):
        """A section from a YAML file holding one mapping, then dotted ``key=value`` overrides."""
        return cls.from_dict(apply_overrides(read_yaml(path), overrides))

    def to_dict(self) -> dict:
        """The settings as a plain nested mapping (YAML / JSON ready; re-loadable with :meth:`from_dict`)."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = value.to_dict() if isinstance(value, Section) else _plain(value)
        return out


def _plain(value):
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def _mapping(key: str, value) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(key, f"must be a mapping of settings, got {type(value).__name__}")
    bad = [k for k in value if not isinstance(k, str)]
    if bad:
        raise ConfigError(key, f"keys must be strings, got {bad[0]!r}")
    return value


# ------------------------------------------------------------------------------ YAML, overrides


@functools.cache  # one class, built on first use (yaml is imported lazily)
def _unique_key_loader():
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        """SafeLoader that refuses a key given twice in one mapping (plain YAML keeps the last silently: a second
        ``safety:`` block would replace the first whole)."""

        def construct_mapping(self, node, deep=False):
            seen = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} is given twice in one mapping (lines {seen[key] + 1} and "
                                    f"{key_node.start_mark.line + 1}); keep one", key_node.start_mark)
                seen[key] = key_node.start_mark.line
            return super().construct_mapping(node, deep=deep)

    return UniqueKeyLoader


def read_yaml(path) -> dict:
    """The mapping in a YAML file (an empty file is an empty mapping)."""
    import yaml

    path = Path(path).expanduser()
    if path.is_dir():
        raise ConfigError("<file>", f"config file {str(path)!r} is a directory; expected a YAML file")
    if not path.is_file():
        raise ConfigError("<file>", f"config file {str(path)!r} does not exist")
    try:
        values = yaml.load(path.read_text(encoding="utf-8"), Loader=_unique_key_loader())
    except yaml.YAMLError as error:
        raise ConfigError("<file>", f"{path} is not valid YAML: {error}") from None
    except UnicodeDecodeError as error:
        raise ConfigError("<file>", f"{path} is not UTF-8 text: {error}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError("<root>", f"{path} must hold one mapping of settings, got {type(values).__name__}")
    return values


_OVERRIDE_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def parse_override(text: str) -> tuple[str, object]:
    """``"rl.kl_coef=0.05"`` → ``("rl.kl_coef", 0.05)``. The value is read as YAML: ``null``, ``true``,
    ``[0, 1]``, ``1e-6`` (a float field takes the string) and plain strings all work."""
    import yaml

    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not _OVERRIDE_KEY.match(key):
        raise ConfigError(key or text, f"an override must look like section.key=value (e.g. rl.kl_coef=0.05), "
                                       f"got {text!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key, value


def apply_overrides(values: dict, overrides: typing.Sequence[str]) -> dict:
    """A copy of ``values`` with each dotted ``key=value`` override set (sections created as needed).

    Keys are checked when the result is loaded (unknown keys are named there); a key that runs through a
    setting which is not a section (``seed.x=1``) is refused here.
    """
    import copy

    out = copy.deepcopy(values)
    for text in overrides:
        key, value = parse_override(text)
        *path, last = key.split(".")
        node = out
        for depth, part in enumerate(path):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(".".join(path[:depth + 1]), f"is a setting, not a section; cannot set {key!r}")
            node = child
        node[last] = value
    return out


# ---------------------------------------------------------------------------------- reference


def field_docs(cls) -> dict[str, str]:
    """{field: description} from the ``Attributes:`` block of a class docstring (``a, b: text`` documents
    both ``a`` and ``b``; continuation lines are indented deeper)."""
    doc = cls.__doc__ or ""
    lines = doc.splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == "Attributes:")
    except StopIteration:
        return {}
    out, current, indent = {}, [], None
    entry = re.compile(r"^(\s*)([A-Za-z_][A-Za-z0-9_]*(?:, [A-Za-z_][A-Za-z0-9_]*)*): ?(.*)$")
    for line in lines[start + 1:]:
        if not line.strip():
            continue
        match = entry.match(line)
        width = len(line) - len(line.lstrip())
        if match and (indent is None or width == indent):
            indent = width
            current = match.group(2).split(", ")
            for name in current:
                out[name] = match.group(3).strip()
        elif indent is not None and width > indent and current:
            for name in current:
                out[name] += " " + line.strip()
        else:
            break
    return out


def _markdown(text: str) -> str:
    """Docstring markup as Markdown: ``x`` and :role:`~a.b.X` become `x` and `X`; docs/page.md#anchor a link."""
    text = re.sub(r":[a-z]+:`~([^`]+)`", lambda m: "`" + m.group(1).rsplit(".", 1)[-1] + "`", text)
    text = re.sub(r":[a-z]+:`([^`]+)`", r"`\1`", text)
    text = re.sub(r"``([^`]+)``", r"`\1`", text)
    return re.sub(r"docs/([a-z-]+\.md(?:#[^\s),;]+)?)", r"[\1](\1)", text)


def _summary(cls) -> str:
    doc = (cls.__doc__ or "").strip()
    head = doc.split("Attributes:")[0].strip()
    return " ".join(line.strip() for line in head.splitlines())


def _default(f) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "required"
    if isinstance(value, Section):
        return "(section)"
    import yaml

    return "`" + yaml.safe_dump(_plain(value), default_flow_style=True).strip().removesuffix("...").strip() + "`"


def reference(root: type[Section], *, title: str = "Configuration reference", intro: str = "",
              derived: dict[str, dict[str, str]] | None = None) -> str:
    """Markdown documenting every key of ``root`` and its nested sections: type, default, meaning.

    ``derived`` maps a section name to ``{key: why}`` for keys that the loader sets and the user must not.
    """
    derived = derived or {}
    out = [f"# {title}", ""]
    if intro:
        out += [intro.strip(), ""]
    queue = [("", root)]
    while queue:
        name, cls = queue.pop(0)
        docs = field_docs(cls)
        hints = _hints(cls)
        heading = f"## {name} (`{cls.__name__}`)" if name else "## top level"
        out += [heading, "", _markdown(_summary(cls)), "", "| key | type | default | meaning |", "|---|---|---|---|"]
        for f in dataclasses.fields(cls):
            nested = _section_class(hints[f.name])
            if nested is not None:
                queue.append((f"{name}.{f.name}" if name else f.name, nested))
            what = docs.get(f.name, "")
            if f.name in derived.get(name, {}):
                what = f"set by the pipeline ({derived[name][f.name]}); do not set it. " + what
            kind = f"section `{nested.__name__}`" if nested else f"`{type_name(hints[f.name])}`"
            cells = [f"`{f.name}`", kind, _default(f) if not nested else "—", _markdown(what)]
            out.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"



if __name__ == "__main__":  # python -m hcrlhf.config > docs/config.md
    from hcrlhf.pipeline.config import config_reference

    print(config_reference(), end="")
