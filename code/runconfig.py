"""The one configuration system: defaults from ``config.py``, a ``--config FILE``, ``--KEY=value``.

Overrides are type-checked against the default's type and unknown keys are rejected, so a typo
fails loudly instead of silently training with a default.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import json
import os
import runpy
import sys
from pathlib import Path
from typing import Any

import config as _defaults
from fileio import repo_path


class ConfigError(ValueError):
    """A configuration file or override that does not fit the defaults."""


def default_config() -> dict[str, Any]:
    """The upper-case constants of ``config.py`` as a fresh dict."""
    return {k: _copy(v) for k, v in vars(_defaults).items() if k.isupper() and not k.startswith("_")}


def _copy(value: Any) -> Any:
    return list(value) if isinstance(value, list) else dict(value) if isinstance(value, dict) else value


def _coerce(key: str, value: Any, default: Any, source: str) -> Any:
    """Return ``value`` converted to the type of ``default`` or raise a ConfigError naming ``key``."""
    where = f"{key} (from {source})"
    if default is None:
        return value
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in {"true", "1", "yes", "false", "0", "no"}:
            return value.lower() in {"true", "1", "yes"}
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"{where} must be a boolean (true/false), got {value!r}")
    if isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where} must be an integer, got {value!r}")
    if isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{where} must be a number, got {value!r}")
    if isinstance(default, str):
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where} must be a string, got {value!r}")
    if isinstance(default, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list such as {default!r}, got {value!r}")
        if default:
            kind = type(default[0])
            bad = [v for v in value if not isinstance(v, kind)]
            if bad:
                raise ConfigError(f"{where} must hold {kind.__name__} items, got {bad!r}")
        return list(value)
    if isinstance(default, dict):
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        return dict(value)
    return value


def _parse_literal(text: str, default: Any) -> Any:
    """Parse a command-line value: Python/JSON literals, or the raw text for string keys."""
    if isinstance(default, str):
        try:
            parsed = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return text
        return parsed if isinstance(parsed, str) else text
    lowered = text.strip().lower()
    if lowered in {"true", "false"}:
        return lowered == "true"
    if lowered in {"none", "null"}:
        return None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return text


def _unknown_key_message(key: str, known: dict[str, Any], source: str) -> str:
    close = difflib.get_close_matches(key, list(known), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return f"unknown config key {key!r} (from {source}){hint} Known keys are the upper-case names in code/config.py."


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a ``.json`` object or a ``.py`` file of upper-case assignments."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a JSON object")
        return data
    if path.suffix == ".py":
        namespace = runpy.run_path(str(path))
        return {k: v for k, v in namespace.items() if k.isupper() and not k.startswith("_")}
    raise ConfigError(f"config file {path} must end in .py or .json")


def build_config(
    config_file: str | os.PathLike | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Defaults, then the file, then ``--KEY=value`` overrides (or a dict of them), all checked."""
    cfg = default_config()
    defaults = default_config()
    if config_file:
        for key, value in load_config_file(config_file).items():
            if key.startswith("_"):
                continue
            if key not in defaults:
                raise ConfigError(_unknown_key_message(key, defaults, str(config_file)))
            cfg[key] = _coerce(key, value, defaults[key], str(config_file))
    if isinstance(overrides, dict):
        items = list(overrides.items())
        for key, value in items:
            if key not in defaults:
                raise ConfigError(_unknown_key_message(key, defaults, "overrides"))
            cfg[key] = _coerce(key, value, defaults[key], "overrides")
    else:
        for token in overrides or []:
            key, text = split_override(token)
            if key not in defaults:
                raise ConfigError(_unknown_key_message(key, defaults, "command line"))
            cfg[key] = _coerce(key, _parse_literal(text, defaults[key]), defaults[key], "command line")
    return cfg


def split_override(token: str) -> tuple[str, str]:
    if not token.startswith("--") or "=" not in token:
        raise ConfigError(f"cannot read argument {token!r}: config overrides look like --KEY=value")
    key, text = token[2:].split("=", 1)
    return key, text


def model_config_path(typed: str | None, cfg: dict[str, Any]) -> Path | None:
    """``--model_config`` as typed (relative to the working directory), else ``MODEL_CONFIG``
    (relative to the repository root), else None for the official sizes."""
    if typed:
        return Path(typed)
    return repo_path(cfg["MODEL_CONFIG"]) if cfg["MODEL_CONFIG"] else None


CONFIG_HELP = (
    "Configuration: every upper-case name in code/config.py can be set with --config FILE "
    "(.py assignments or a .json object) and overridden with --KEY=value (e.g. --LORA_R=4)."
)


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="a .py or .json file of config.py overrides")
    parser.epilog = (parser.epilog + "\n\n" if parser.epilog else "") + CONFIG_HELP


def parse_args(
    parser: argparse.ArgumentParser, argv: list[str] | None = None
) -> tuple[argparse.Namespace, dict[str, Any]]:
    """Parse script arguments plus ``--config``/``--KEY=value``; exit with a clear message on error."""
    if not any(a.option_strings == ["--config"] for a in parser._actions):
        add_config_arguments(parser)
    args, rest = parser.parse_known_args(argv)
    overrides = []
    for token in rest:
        key = token[2:].split("=", 1)[0] if token.startswith("--") else ""
        if not (key[:1].isupper() and "=" in token):
            parser.error(f"unrecognized argument {token!r}")
        overrides.append(token)
    try:
        cfg = build_config(args.config, overrides)
    except ConfigError as exc:
        parser.error(str(exc))
    return args, cfg


def format_config(cfg: dict[str, Any]) -> str:
    width = max((len(k) for k in cfg), default=0)
    return "\n".join(f"{k:<{width}} = {v!r}" for k, v in sorted(cfg.items()))


def save_config(cfg: dict[str, Any], path: str | os.PathLike, extra: dict[str, Any] | None = None) -> Path:
    """Write the effective configuration (plus script arguments) as JSON, atomically."""
    from fileio import atomic_write_text

    payload = {"config": cfg, "argv": sys.argv, **(extra or {})}
    return atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")
