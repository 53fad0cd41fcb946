"""YAML -> typed dataclasses, the machinery behind `config.load_config` (and any other typed file, e.g. batch
job lines): `a.b=value` overrides, `${dotted.key}` interpolation, paths resolved relative to the file, and
type checks that fail naming the dotted field, the accepted values and, for a misspelt key, the nearest one.
A field whose metadata says `path` holds a filesystem path. Each dataclass may define `validate(where)`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from qwen_image_lora.errors import InputError


class ConfigError(InputError):
    """A config problem, always naming the file and the dotted field."""


class _NotFinite(ConfigError):
    """A float field given nan or inf: a range error, not a type mismatch (a union must not try its next type)."""


class StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses what PyYAML accepts silently: a key given twice in one mapping (the last wins, so a
    second `train:` section drops the whole first one) and an unquoted `16:9` (YAML 1.1 reads it as base 60: 969).
    The error names the dotted key and its line."""

    dotted = ""  # where the document sits in the config (an override's key)

    def construct_document(self, node):
        if (size := _expanded_size(node, {})) > MAX_VALUES:  # before any walk over it, which would take as long
            raise ConfigError(f"the document expands to {size:,} values through YAML aliases (at most {MAX_VALUES:,})")
        _check_nodes(node, self.dotted, on_command_line=bool(self.dotted))
        return super().construct_document(node)


MAX_VALUES = 100_000  # a config holds hundreds; nine nested aliases of nine items expand to 9**9


def _expanded_size(node, sizes: dict) -> int:
    """How many values the document holds with every alias expanded, counted once per distinct node."""
    if id(node) not in sizes:
        sizes[id(node)] = 0  # an alias cycle (a node inside itself) counts once
        children = [v for pair in node.value for v in pair] if isinstance(node, yaml.MappingNode) else node.value
        sizes[id(node)] = 1 + sum(_expanded_size(c, sizes) for c in children) if isinstance(children, list) else 1
    return sizes[id(node)]


def _check_nodes(node, dotted: str, on_command_line: bool = False) -> None:
    if isinstance(node, yaml.MappingNode):
        lines: dict = {}
        for key, value in node.value:
            name, line, ident = _join(dotted, key.value), key.start_mark.line + 1, (key.tag, str(key.value))
            if ident in lines:
                raise ConfigError(
                    f"{name}: given twice (lines {lines[ident]} and {line}); YAML keeps only the last, so merge them"
                )
            lines[ident] = line
            _check_nodes(value, name, on_command_line)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _check_nodes(item, f"{dotted}[{i}]", on_command_line)
    elif node.tag in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float") and ":" in node.value:
        number = yaml.safe_load(node.value)
        if on_command_line:  # no line to name, and the quotes go inside the shell's: 'key="16:9"'
            raise ConfigError(f"{dotted}: {node.value} reads as the base-60 number {number} in YAML; quote it: "
                              f"'{dotted}=\"{node.value}\"'")  # fmt: skip
        raise ConfigError(
            f"{dotted}: {node.value} (line {node.start_mark.line + 1}) reads as the base-60 number {number} "
            f'in YAML; quote it: {dotted.rsplit(".", 1)[-1]}: "{node.value}"'
        )


def load_yaml(text: str, where: str, dotted: str = ""):
    """`yaml.safe_load` through `StrictLoader`; any problem is a ConfigError naming `where`."""
    loader = StrictLoader(text)
    loader.dotted = dotted
    try:
        return loader.get_single_data()
    except yaml.MarkedYAMLError as e:  # its str() is several lines with a caret drawing: one line, at its place
        mark = e.problem_mark or e.context_mark
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        context = f" ({e.context})" if e.context else ""
        raise ConfigError(f"{where}: not valid YAML{at}: {e.problem}{context}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: not valid YAML: {e}") from e
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    except ValueError:  # Python's int() past 4,300 digits: a traceback from the YAML constructor
        raise ConfigError(f"{where}: a number of more than 4,300 digits; no setting takes one") from None
    except RecursionError:
        raise ConfigError(f"{where}: nested too deeply to read; no setting is nested past a few levels") from None
    finally:
        loader.dispose()


def apply_override(raw: dict, item: str, where: str) -> None:
    if "=" not in item:
        raise ConfigError(f"on the command line, {item}: write it as section.key=value, e.g. train.max_steps=10")
    key, value = item.split("=", 1)
    node = raw
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"on the command line, {item}: {part} is not a section")
    if value.lstrip().startswith("#"):  # on a command line `key=#000000` means the text, not a YAML comment
        node[parts[-1]] = value.strip()
        return
    node[parts[-1]] = load_yaml(value, f"on the command line, {item}", key.strip()) if value.strip() else None


def blame_override(error: ConfigError, where: str, overrides) -> ConfigError:
    """`FILE: field: problem` -> `on the command line, field=value: field: problem` when that field (or its section)
    was given as an override: the file does not hold the bad value, the command line does."""
    message = str(error)
    if not message.startswith(f"{where}: "):
        return error
    problem = message.removeprefix(f"{where}: ")
    for item in reversed(overrides):  # the last override of a key is the one that counts
        key, _, value = (part.strip() for part in item.partition("="))
        parts = key.split(".")
        sections = [".".join(parts[:n]) for n in range(1, len(parts))]  # `foo.bar=1`: "unknown key 'foo'"
        if (
            re.match(rf"(unknown key ')?{re.escape(key)}\b", problem)
            or any(problem.startswith(f"unknown key '{section}'") for section in sections)
            or any(ref in value for ref in re.findall(r"\$\{[^}]*\}", problem))  # a `${key}` this value holds
        ):
            return ConfigError(f"on the command line, {item}: {problem}")
    return error


def merge(defaults: dict, raw: dict) -> dict:
    out = dict(defaults)
    for key, value in raw.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and out[key]:
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


_REF = re.compile(r"\$\{([A-Za-z0-9_.]+)\}")


def _lookup(root: dict, dotted: str, where: str):
    node: Any = root
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise ConfigError(f"{where}: ${{{dotted}}} refers to a key that is not set")
        node = node[part]
    return node


def interpolate(node, root, where):
    if isinstance(node, dict):
        return {k: interpolate(v, root, where) for k, v in node.items()}
    if isinstance(node, list):
        return [interpolate(v, root, where) for v in node]
    if isinstance(node, str):
        given = node
        for _ in range(10):  # nested references resolve in a few rounds
            new = _REF.sub(lambda m: str(_lookup(root, m.group(1), where)), node)
            if new == node:
                break
            node = new
        else:  # `output_dir: ${output_dir}/x` grew a path of ten "/x" and validated as OK
            refs = ", ".join(sorted({f"${{{ref}}}" for ref in _REF.findall(given)}))
            raise ConfigError(f"{where}: {given!r} refers to itself through {refs}; a value cannot contain its own key")
    return node


# Metadata of a field (or a whole section) that a resume must not change: it changes the maths of the run, so a
# checkpoint continued with another value is a different run. `config.resume_fixed_fields()` lists them; the
# checkpoint component compares them (`--allow-config-change` turns the error into a warning).
FIXED = {"resume": "fixed"}


def fixed_field(default=dataclasses.MISSING, **kw):
    return dataclasses.field(default=default, metadata=FIXED, **kw)


def path_field(default=None, hub_id: bool = False, fixed: bool = False, **kw):
    """A string field holding a filesystem path, which `build` resolves relative to the config file's folder. With
    `hub_id` it may also name a Hugging Face repo (`owner/name`), left as it is when no such path exists; `fixed`:
    a resume must not change it."""
    metadata = {"path": "or-hub-id" if hub_id else True, **(FIXED if fixed else {})}
    return dataclasses.field(default=default, metadata=metadata, **kw)


def paths_field(**kw):
    """A list of paths (`path_field`'s rule for each), empty by default."""
    return path_field(dataclasses.MISSING, default_factory=list, **kw)


def build(cls, raw, dotted: str, where: str, base: Path, exact: bool = False):
    """`raw` as a `cls`, each value checked against its annotation. `exact`: JSON, whose numbers are typed (a batch
    line, an image's settings), so a string is never a number; YAML 1.1 reads `1e-4` and `1.0e2` as strings, so a
    config's float field takes a string that reads as one."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: {dotted or 'top level'} must be a mapping, got {type(raw).__name__}")
    # An "internal" field is set by the code that reads the file (a config's source, a job's line index), not in it
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    hints = typing.get_type_hints(cls)
    unknown = [k for k in raw if k not in fields]
    if unknown:
        key = unknown[0]
        short = getattr(cls, "SHORT_NAMES", {}).get(key)  # `steps` for num_inference_steps: too far for difflib
        close = [short] if short in fields else difflib.get_close_matches(str(key), list(fields), n=1)
        hint = f"; did you mean {_join(dotted, close[0])!r}?" if close else f"; valid keys: {', '.join(fields)}"
        raise ConfigError(f"{where}: unknown key {_join(dotted, key)!r}{hint}")
    kwargs = {}
    for name, value in raw.items():
        f = fields[name]
        value = _coerce(value, hints[name], _join(dotted, name), where, base, exact)
        if f.metadata.get("path"):
            value = _resolve_paths(value, base, hub_ids=f.metadata["path"] == "or-hub-id")
        kwargs[name] = value
    return cls(**kwargs)


def _join(dotted: str, key: str) -> str:
    return f"{dotted}.{key}" if dotted else str(key)


def _resolve_paths(value, base: Path, hub_ids: bool):
    if isinstance(value, list):
        return [_resolve_paths(v, base, hub_ids) for v in value]
    if isinstance(value, str) and value and not (hub_ids and _looks_like_hub_id(value)):
        p = Path(value).expanduser()
        return str(p if p.is_absolute() else (base / p).resolve())
    return value


def _looks_like_hub_id(value: str) -> bool:
    return (
        bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", value))
        and not Path(value).exists()
        and "." not in value.split("/")[0]
    )


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " or ".join(_yaml_repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _yaml_repr(value) -> str:
    """A value as the YAML a user writes spells it: true, false, null; strings quoted."""
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    return repr(value)


def _parses_as_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _is_number(text: str) -> bool:
    return _parses_as_float(text) and math.isfinite(float(text))


def _coerce(value, tp, dotted: str, where: str, base: Path, exact: bool = False):
    """Check `value` against the annotation `tp`; convert int->float only. Raise naming the field."""
    origin = typing.get_origin(tp)
    quote = isinstance(value, int) and not isinstance(value, bool) and (tp is str or str in typing.get_args(tp))
    hint = f'; quote it: {dotted.rsplit(".", 1)[-1]}: "{value}"' if quote else ""
    if value is None and tp is str:  # `background: #000000` reads as an empty value: YAML's # starts a comment
        hint = f'; an empty value, or one starting with # (a YAML comment), is null: quote it: {dotted.rsplit(".", 1)[-1]}: "#000000"'
    words = {False: ("no", "off", "false"), True: ("yes", "on", "true")}.get(value) if isinstance(value, bool) else ()
    if origin is Literal and (word := next((w for w in words if w in typing.get_args(tp)), None)):
        hint = (
            f'; YAML reads an unquoted {word} as {_yaml_repr(value)}: quote it: {dotted.rsplit(".", 1)[-1]}: "{word}"'
        )

    if isinstance(value, str) and tp in (float, int, float | None, int | None) and _is_number(value):
        hint = "; write the number without quotes"
    bad = ConfigError(f"{where}: {dotted} must be {_type_name(tp)} (got {_yaml_repr(value)}){hint}")
    if origin in (Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option, dotted, where, base, exact)
            except _NotFinite:
                raise
            except ConfigError:
                continue
        raise bad
    if origin is Literal:
        if value in typing.get_args(tp) and type(value) is type(next(a for a in typing.get_args(tp) if a == value)):
            return value
        raise bad
    if tp is type(None):
        if value is None:
            return None
        raise bad
    if origin is list:
        if not isinstance(value, list):
            raise bad
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{dotted}[{i}]", where, base, exact) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise bad
        key_tp, val_tp = typing.get_args(tp)
        return {str(k): _coerce(v, val_tp, f"{dotted}.{k}", where, base, exact) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return build(tp, value, dotted, where, base, exact)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if tp is float:
        if isinstance(value, str) and not exact and _parses_as_float(value):  # YAML 1.1's `1e-4`, `1.0e2`, `nan`
            value = float(value)
        if not isinstance(value, (int, float)) or isinstance(value, bool):  # a batch line's "2": JSON has numbers
            raise bad
        number = float(value)
        if not math.isfinite(number):
            raise _NotFinite(f"{where}: {dotted} must be a finite number (got {number})")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad
    raise ConfigError(f"{where}: {dotted}: unsupported annotation {tp!r}")


def validate(node, dotted: str, where: str) -> None:
    if hasattr(node, "validate"):
        try:
            node.validate(dotted or "config")
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            validate(value, _join(dotted, f.name), where)
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if dataclasses.is_dataclass(item):
                    validate(item, f"{_join(dotted, f.name)}[{i}]", where)


def require(where: str, obj, ok, accepted: str, *names: str) -> None:
    """For a `validate(where)`: raise naming the first of `names` whose value (unless null) fails `ok`, saying what
    is accepted."""
    for name in names:
        if (value := getattr(obj, name)) is not None and not ok(value):
            raise ConfigError(f"{where}.{name}: must be {accepted} (got {value})")
