"""Reading a config: defaults, then a YAML or TOML file, then CLI overrides, built onto the schema in
config.py. Every mistake names the file and the line of the key at fault.

    cfg = load_config("my.yaml", {"teacher.model": "Qwen/Qwen2.5-7B-Instruct"})
    text = dump_yaml(cfg)                      # what a run directory's config.yaml holds

Nothing outside this module and cli.py reads argv or config files.
"""

from __future__ import annotations

import dataclasses
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from selfinstruct.config import Config, ConfigValueError, EngineConfig, Sampling, ServerConfig
from selfinstruct.errors import UserError, redact

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None,
                under: str | Path | None = None) -> Config:
    """Defaults, then `under` (a resumed run's own config.yaml), then the file `path` (YAML or TOML), then
    `overrides` ({"section.key": value}); validated."""
    data: dict[str, Any] = {}
    lines: dict[str, int] = {}
    if under is not None:
        data, _ = _read_file(Path(under))
    if path is not None:
        mine, lines = _read_file(Path(path))
        data = _merge(data, mine)
    for dotted, value in (overrides or {}).items():
        dotted = moved(dotted)
        node = data
        *parents, last = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
        lines.pop(dotted, None)  # a flag, not the file, is now responsible for this value
    try:
        return small_teacher(_build(Config, data, "", lines, path))
    except ConfigValueError as e:  # raised by __post_init__ of a section we could not name more precisely
        raise UserError(str(e), path) from None


# The teacher section's server and engine keys, which earlier versions held flat (teacher.base_urls): a config
# file, a run directory's config.yaml or a dotted override that names them so is read into their new places.
MOVED = {**{k: "server" for k in ServerConfig.__dataclass_fields__},
         **{k: "engine" for k in EngineConfig.__dataclass_fields__}}


def moved(dotted: str) -> str:
    """`teacher.base_urls` -> `teacher.server.base_urls`; any other key as it is."""
    parts = dotted.split(".")
    return f"teacher.{MOVED[parts[1]]}.{parts[1]}" if len(parts) == 2 and parts[0] == "teacher" \
        and parts[1] in MOVED else dotted


def _move_flat_keys(data: dict[str, Any], lines: dict[str, int]) -> None:
    teacher = data.get("teacher")
    if not isinstance(teacher, dict):
        return
    for key in [k for k in teacher if k in MOVED]:
        section = teacher.setdefault(MOVED[key], {})
        if isinstance(section, dict):  # else _build names the bad section
            section.setdefault(key, teacher.pop(key))  # both spellings: the new one wins
            if f"teacher.{key}" in lines:
                lines[moved(f"teacher.{key}")] = lines.pop(f"teacher.{key}")


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """`top` over `base`, section by section (a mapping in both is merged, anything else replaced)."""
    out = dict(base)
    for key, value in top.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def small_teacher(cfg: Config) -> Config:
    """With the built-in teacher (`--teacher smollm2`), builtin.SMALL_TEACHER's CPU-sized settings wherever the
    config still holds the default value."""
    from selfinstruct.builtin import SMALL_TEACHER, is_builtin

    if not is_builtin(cfg.teacher.model):
        return cfg
    default = Config()
    for dotted, value in SMALL_TEACHER.items():
        *parents, last = dotted.split(".")
        node, base = cfg, default
        chain = []
        for p in parents:
            chain.append((node, p))
            node, base = getattr(node, p), getattr(base, p)
        if getattr(node, last) != getattr(base, last):
            continue  # the user chose this one
        new = dataclasses.replace(node, **{last: value})
        for holder, name in reversed(chain):  # rebuild the frozen path upwards
            new = dataclasses.replace(holder, **{name: new})
        cfg = new
    return cfg


def _read_file(path: Path) -> tuple[dict[str, Any], dict[str, int]]:
    try:
        return _parse_file(path)
    except RecursionError:
        raise UserError("the config is nested too deeply to read", path) from None


def _parse_file(path: Path) -> tuple[dict[str, Any], dict[str, int]]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError("config file not found", path) from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read config file: {e}", path) from None
    if path.suffix == ".toml":
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            m = re.search(r"line (\d+)", str(e))
            raise UserError(f"invalid TOML: {e}", path, int(m.group(1)) if m else None) from None
        lines = _toml_key_lines(text)
    elif path.suffix in (".yaml", ".yml"):
        try:
            node, data = _load_yaml(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            raise UserError(f"invalid YAML: {getattr(e, 'problem', e)}", path,
                            mark.line + 1 if mark else None) from None
        lines = _yaml_key_lines(node, "") if node is not None else {}
    else:
        raise UserError("config files must end in .yaml, .yml or .toml", path)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError("the config must be a mapping of sections (teacher, generate, filters, train, eval, "
                        "rounds, quality)", path, 1)
    _move_flat_keys(data, lines)
    return data, lines


# libyaml's parser where PyYAML was built with it (as its wheels are): the pure-Python one took a second on a
# config nested a thousand deep before its RecursionError; libyaml refuses that depth at once, as a YAMLError.
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _load_yaml(text: str) -> tuple[yaml.Node | None, Any]:
    """The document's node tree (for the keys' line numbers) and its data, from one parse."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        return node, (loader.construct_document(node) if node is not None else None)
    finally:
        loader.dispose()


def _yaml_key_lines(node: yaml.Node, prefix: str) -> dict[str, int]:
    out: dict[str, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            dotted = f"{prefix}{key_node.value}"
            out[dotted] = key_node.start_mark.line + 1
            out.update(_yaml_key_lines(value_node, dotted + "."))
    return out


def _toml_key_lines(text: str) -> dict[str, int]:
    out: dict[str, int] = {}
    table = ""
    for no, line in enumerate(text.splitlines(), 1):
        if m := re.match(r"\s*\[\s*([\w.\- ]+?)\s*\]", line):
            table = m.group(1).replace(" ", "") + "."
            out[table[:-1]] = no
        elif m := re.match(r"\s*([\w\-.]+)\s*=", line):
            out[table + m.group(1)] = no
    return out


def _build(cls: type, data: Any, prefix: str, lines: dict[str, int], path: Any, base: Any = None) -> Any:
    """`data` onto `base` (the field's own default; `cls()` at the top): a key the file leaves out keeps the
    default its field has, which for a nested sampling mapping may differ from the class's (the paper's stop
    strings of instruction_sampling, say)."""
    where = prefix[:-1] or "the config"
    if not isinstance(data, dict):
        raise UserError(f"'{where}' must be a mapping, got {type(data).__name__}", path, lines.get(prefix[:-1]))
    known = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in known:
            raise UserError(f"unknown key '{prefix}{key}' (known: {', '.join(known)})", path,
                            lines.get(prefix + str(key)))
    hints = typing.get_type_hints(cls)
    base = cls() if base is None else base
    values = {}
    for name, value in data.items():
        dotted = prefix + name
        if dataclasses.is_dataclass(hints[name]):
            values[name] = _build(hints[name], value, dotted + ".", lines, path, getattr(base, name))
        else:
            values[name] = _coerce(value, hints[name], known[name].metadata.get("choices"), dotted, lines, path)
    try:
        return dataclasses.replace(base, **values)
    except ConfigValueError as e:
        raise UserError(f"'{prefix}{e.key}': {str(e).split(': ', 1)[1]}", path,
                        lines.get(prefix + e.key)) from None


def _coerce(value: Any, hint: Any, choices: Any, dotted: str, lines: dict[str, int], path: Any) -> Any:
    line = lines.get(dotted)
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
        args = typing.get_args(hint)
    bad = f"'{dotted}' must be {_type_name(hint)}, got {value!r}"
    if typing.get_origin(hint) is list:
        if isinstance(value, str):  # a single string where a list is expected: accept it as a 1-list
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, args[0]) for v in value):
            raise UserError(bad, path, line)
        return list(value)
    if hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    else:
        ok = isinstance(value, hint)
    if not ok:
        raise UserError(bad, path, line)
    if choices and value not in choices:
        raise UserError(f"'{dotted}' must be one of {', '.join(choices)}, got {value!r}", path, line)
    return value


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) is list:
        return f"a list of {typing.get_args(hint)[0].__name__}"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))


# ---------------------------------------------------------------- writing and documenting


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Config) -> str:
    """The config as a run directory records it: credentials in URLs redacted (pass --base-url again when
    resuming a run whose server needs them)."""
    return redact(yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True))


def field_help(dotted: str) -> str:
    """The help text of `section.key`, for argparse."""
    cls: Any = Config
    *parents, last = dotted.split(".")
    for p in parents:
        cls = typing.get_type_hints(cls)[p]
    f = {f.name: f for f in dataclasses.fields(cls)}[last]
    return f.metadata["help"]


def config_reference() -> str:
    """A markdown table of every config key, its default and its help (kept in the README)."""
    rows = ["| key | default | meaning |", "|---|---|---|"]

    def walk(obj: Any, prefix: str) -> None:
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value) and not isinstance(value, Sampling):  # a section: recurse
                walk(value, f"{prefix}{f.name}.")
                continue
            default = dataclasses.asdict(value) if isinstance(value, Sampling) else value
            shown = yaml.safe_dump(default, default_flow_style=True, width=10_000).strip()
            shown = shown.removesuffix("...").strip().replace("|", "\\|").replace("\n", "\\n")
            rows.append(f"| `{prefix}{f.name}` | `{shown}` | {f.metadata['help']} |")

    walk(Config(), "")
    return "\n".join(rows)
