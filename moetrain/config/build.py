"""Building a :class:`~moetrain.config.schema.RunConfig`: from YAML (a shipped config or a
file), ``--set a.b=c`` overrides and dicts, with typed coercion, renamed keys refused by name and
duplicate YAML keys refused; every config built here is validated (:mod:`moetrain.config.checks`)."""

from __future__ import annotations

import dataclasses
import importlib.resources
import os
import typing
from pathlib import Path
from typing import Any

import yaml

from moetrain.config.checks import validate
from moetrain.config.schema import ConfigError, RunConfig

# Building from dicts / YAML / overrides
# --------------------------------------------------------------------------------------------


# old key -> new key, for a clear error
RENAMED = {
    "placement.solver": "placement.method",
    **{
        f"{section}.{key}": f"storage.{key}"
        for section in ("data", "checkpoint")
        for key in ("s3_endpoint", "s3_region", "gcs_endpoint")
    },
}


def _from_dict(cls: type, data: Any, path: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'} must be a mapping, got {type(data).__name__}: {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        where = f"{path}.{key}" if path else str(key)
        if key not in fields:
            if where in RENAMED:
                raise ConfigError(f"config key {where!r} was renamed {RENAMED[where]!r}")
            known = ", ".join(sorted(fields))
            raise ConfigError(f"unknown config key {where!r} (known keys here: {known})")
        kwargs[key] = _coerce(hints[key], value, where)
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, where: str) -> Any:
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return _from_dict(hint, value, where)
    origin = typing.get_origin(hint)
    if origin is list:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        return [str(v) for v in value]
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        try:
            as_float = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where} must be an integer, got {value!r}") from None
        if not as_float.is_integer():
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return int(as_float)
    if hint is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where} must be a number, got {value!r}") from None
    if hint is str:
        if value is None:
            return ""
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return str(value)
    return value


def _parse_scalar(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides to a nested dict (values parsed as YAML scalars)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, _, raw = item.partition("=")
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"--set has an empty key segment: {item!r}")
        node = data
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {key}: {part!r} is not a section")
            node = child
        node[parts[-1]] = _parse_scalar(raw)
    return data


def _check_unique_keys(node: Any, path: str = "") -> None:
    """Refuse a key given twice in one YAML mapping (PyYAML would keep the last silently),
    naming its dotted path and both lines."""
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = str(key_node.value)
            where = f"{path}.{key}" if path else key
            if key in seen:
                raise ConfigError(
                    f"key {where!r} is given twice (lines {seen[key]} and {key_node.start_mark.line + 1}): remove one"
                )
            seen[key] = key_node.start_mark.line + 1
            _check_unique_keys(value_node, where)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _check_unique_keys(item, f"{path}[{i}]")


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {str(p)!r}")
    try:
        text = p.read_text(encoding="utf-8")
        _check_unique_keys(yaml.compose(text, Loader=yaml.SafeLoader))
        data = yaml.safe_load(text)
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {str(p)!r} is not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {str(p)!r} is not valid YAML: {exc}") from None
    except ConfigError as exc:
        raise ConfigError(f"config file {str(p)!r}: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a mapping at the top level")
    return data


def builtin_config_path(name: str) -> Path:
    """Path of a config shipped inside the package (``tiny``, ``small``)."""
    res = importlib.resources.files("moetrain") / "configs" / f"{name}.yaml"
    return Path(str(res))


def load_config(path: str | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load a config: the shipped ``tiny`` default, or ``path``, then ``--set`` overrides."""
    if path is None:
        data = load_yaml(builtin_config_path("tiny"))
    elif not os.path.exists(path) and builtin_config_path(path).is_file():
        data = load_yaml(builtin_config_path(path))
    else:
        data = load_yaml(path)
    data = apply_overrides(data, list(overrides or []))
    cfg = _from_dict(RunConfig, data, "")
    return validate(cfg)


def from_dict(data: dict[str, Any]) -> RunConfig:
    return validate(_from_dict(RunConfig, data, ""))
