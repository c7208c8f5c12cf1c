"""Configuration as dataclasses loaded from YAML.

Every config section is a (nested) dataclass. :func:`from_dict` builds one from a plain dict and
rejects unknown keys and wrong types with a :class:`ConfigError` naming the key path
(e.g. ``train.optim.lr``), so a typo in a YAML file never silently falls back to a default.

:func:`load_config` is the one YAML loader: every command and helper that reads a config file
(training configs, ``predict --config``/``--postprocess``, ``tune --space``) goes through it.
A config may inherit from another with a top-level ``base:`` key (a file relative to it, or a
shipped name; deep-merged, :func:`load_yaml_tree`), and the CLI's ``--set KEY=VALUE`` overrides
any key on top (:func:`parse_overrides`). A config argument is resolved by
:func:`resolve_config_path`: an existing file, or a path with a folder, is that file; a bare
name such as ``kaggle-t4`` or ``kaggle-t4.yaml`` that is not a file is one of the configs shipped in the package (``kaggle_utils/configs/``, listed by
:func:`shipped_configs`); anything else is a :class:`ConfigError` naming the path.

Renamed keys stay readable: a dataclass lists ``{old: new}`` in a ``CONFIG_ALIASES`` class
attribute, and :func:`from_dict` maps the old key with a :class:`ConfigDeprecationWarning` (also
logged once, so a user of the CLI or a notebook sees it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import types
import typing
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, TypeVar

import yaml

__all__ = [
    "ConfigError",
    "ConfigDeprecationWarning",
    "SHIPPED_CONFIG_DIR",
    "from_dict",
    "to_dict",
    "load_yaml",
    "load_yaml_tree",
    "deep_merge",
    "parse_overrides",
    "BASE_KEY",
    "load_config",
    "save_config",
    "resolve_config_path",
    "shipped_configs",
    "warn_deprecated",
    "canonical_dict",
    "as_patch_shape",
    "PatchShape",
    "check_probability",
    "check_range",
]

T = TypeVar("T")

#: The configs shipped in the wheel (``kaggle_utils/configs/*.yaml``); the only copy of them.
SHIPPED_CONFIG_DIR = Path(__file__).resolve().parent / "configs"

_log = logging.getLogger(__name__)
_logged: set[str] = set()
_quiet = False


class ConfigError(ValueError):
    """A configuration value is unknown, missing or of the wrong type. The message names the key."""


class ConfigDeprecationWarning(DeprecationWarning):
    """An old config key or value was read; it still works, under its new name or value."""


def check_probability(name: str, value: float) -> None:
    """``ValueError`` ``"{name} must be a probability in [0, 1], got {value!r}"`` unless ``0 <= value <= 1``."""
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}")


def check_range(name: str, value: Sequence[float], lo_min: float | None = None) -> tuple[float, float]:
    """A ``(low, high)`` setting as floats; ``ValueError`` naming ``name`` unless it is a pair with
    ``low <= high`` (and ``low >= lo_min`` when given)."""
    if len(value) != 2 or float(value[0]) > float(value[1]):
        raise ValueError(f"{name} must be a (low, high) pair with low <= high, got {value!r}")
    if lo_min is not None and float(value[0]) < lo_min:
        raise ValueError(f"{name} must not go below {lo_min}, got {value!r}")
    return (float(value[0]), float(value[1]))


#: Type of a patch or window shape field in a config dataclass: YAML may give one int (a cube) or
#: three; :func:`from_dict` reads it with :func:`as_patch_shape` into ``(z, y, x)``.
PatchShape = typing.NewType("PatchShape", tuple)


def as_patch_shape(value: Any, name: str = "patch_size") -> tuple[int, int, int]:
    """The one reading of a 3D patch or window shape, wherever one enters (sampler, inference, models).

    Args:
        value: one edge (an int: a cube) or three edges ``(z, y, x)`` (any sequence of ints,
            e.g. a YAML list). Whole-number floats are accepted (``128.0``); ``bool`` is not.
        name: the key or argument to name in the error (``"sampler.patch_size"``).

    Returns:
        ``(z, y, x)`` as a tuple of three positive ints.

    Raises:
        ValueError: naming ``name``: not one or three edges, an edge that is not a whole number, or one <= 0.
    """
    edges = [value] if not isinstance(value, (list, tuple)) and not hasattr(value, "__len__") else list(value)
    if isinstance(value, (str, bytes)) or len(edges) not in (1, 3):
        raise ValueError(f"{name}: expected one edge (a cube) or three edges (z, y, x), got {value!r}")
    out = []
    for e in edges:
        if isinstance(e, bool) or not isinstance(e, (int, float)) and not hasattr(e, "__index__"):
            raise ValueError(f"{name}: edges must be whole numbers, got {value!r}")
        if isinstance(e, float) and not e.is_integer():
            raise ValueError(f"{name}: edges must be whole numbers, got {value!r}")
        out.append(int(e))
    if len(out) == 1:
        out *= 3
    if min(out) <= 0:
        raise ValueError(f"{name}: every edge must be positive, got {value!r}")
    return tuple(out)  # type: ignore[return-value]


def warn_deprecated(message: str, stacklevel: int = 3) -> None:
    """Report an old config key or value: a :class:`ConfigDeprecationWarning` each time, and a
    ``WARNING`` log line of logger ``kaggle_utils.config`` once per message and process (Python
    hides DeprecationWarnings outside ``__main__``; the log line reaches a CLI or notebook user)."""
    if _quiet:
        return
    warnings.warn(message, ConfigDeprecationWarning, stacklevel=stacklevel)
    if message not in _logged:
        _logged.add(message)
        _log.warning(message)


@contextlib.contextmanager
def _quietly() -> Iterator[None]:
    global _quiet
    old, _quiet = _quiet, True
    try:
        yield
    finally:
        _quiet = old


def _apply_aliases(cls: type, data: dict, prefix: str) -> dict:
    """``data`` with the old keys of ``cls.CONFIG_ALIASES`` renamed (a warning each)."""
    aliases: dict[str, str] = getattr(cls, "CONFIG_ALIASES", None) or {}
    if not aliases or not set(data) & set(aliases):
        return data
    where = f"{prefix}." if prefix else ""
    out = dict(data)
    for old, new in aliases.items():
        if old not in out:
            continue
        if new in out:
            raise ConfigError(f"{where}{old}: old name of {where}{new}; give only {where}{new}")
        warn_deprecated(f"{where}{old} is deprecated: renamed {where}{new} (the old key still works)", stacklevel=5)
        out[new] = out.pop(old)
    return out


def _names_its_key(message: str, prefix: str) -> bool:
    """Whether ``message`` already starts with a key path (``train.epochs: ...``): no second prefix."""
    if prefix:
        return message.startswith((f"{prefix}.", f"{prefix}:", f"{prefix} "))
    return re.match(r"^[A-Za-z_]\w*\.[A-Za-z_][\w.\[\]]*[: ]", message) is not None


#: A number written as text: PyYAML (YAML 1.1) loads ``2e-3`` or ``1E4`` as a string, not a float.
_FLOAT_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _convert(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if tp is PatchShape:
        try:
            return as_patch_shape(value, key)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{key}: must be one of {list(args)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return from_dict(tp, value, key)
    if origin in (list, tuple, typing.Sequence) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}")
            return tuple(_convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        out = [_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple or tp is tuple else out
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        vt = args[1] if len(args) == 2 else Any
        return {k: _convert(v, vt, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()):
            return float(value)  # ``2e-3``: YAML 1.1 (PyYAML) reads a float without a dot as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if tp is Path:
        return Path(value)
    return value


def from_dict(cls: type[T], data: dict | None, prefix: str = "") -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys and bad types raise :class:`ConfigError`."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or cls.__name__}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    data = _apply_aliases(cls, data, prefix)
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(
            f"unknown config key(s) {', '.join(where + k for k in unknown)}; "
            f"allowed under {prefix or cls.__name__}: {sorted(fields)}"
        )
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _convert(value, hints[name], key)
    missing = [
        n for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING  # type: ignore[misc]
    ]
    if missing:
        raise ConfigError(f"missing required config key(s) under {prefix or cls.__name__}: {missing}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        message = str(exc)
        if _names_its_key(message, prefix):
            raise ConfigError(message) from None
        raise ConfigError(f"{prefix or cls.__name__}: {message}") from None


def to_dict(obj: Any) -> Any:
    """Dataclass (nested) → plain dict of YAML-safe values."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def shipped_configs() -> list[str]:
    """Names of the configs shipped in the package (``kaggle-t4``, ``smoke-cpu``, ...), sorted."""
    return sorted(p.stem for p in SHIPPED_CONFIG_DIR.glob("*.yaml"))


def resolve_config_path(path: str | os.PathLike) -> Path:
    """The YAML file that a config argument names.

    * an existing file, or any path with a folder in it (``configs/x.yaml``, ``./x.yaml``): that file;
    * a bare name (``kaggle-t4`` or ``kaggle-t4.yaml``) that is not a file here: the shipped config
      of that name (``kaggle_utils/configs/kaggle-t4.yaml``).

    Raises:
        ConfigError: the path does not exist (a bare name: nor is it a shipped config; the message
            lists the shipped names), or is a folder.
    """
    text = os.fspath(path)
    p = Path(text)
    if p.is_file():
        return p
    if p.exists():
        raise ConfigError(f"{text}: is a folder, not a config file")
    has_folder = os.sep in text or (os.altsep is not None and os.altsep in text)
    if not has_folder and text:
        name = text if text.endswith((".yaml", ".yml")) else text + ".yaml"
        shipped = SHIPPED_CONFIG_DIR / name
        if shipped.is_file():
            return shipped
        raise ConfigError(f"{text}: config file not found, and not a shipped config name "
                          f"({', '.join(shipped_configs())})")
    raise ConfigError(f"{text}: config file not found")


def load_yaml(path: str | os.PathLike) -> dict:
    """Read a YAML mapping with ``yaml.safe_load``; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML ({exc})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


#: The key of config inheritance (:func:`load_yaml_tree`): ``base: kaggle-t4`` or ``base: ./my-base.yaml``.
BASE_KEY = "base"

_DOTTED_KEY = re.compile(r"[A-Za-z_][\w-]*(\.[A-Za-z_][\w-]*)*")


def deep_merge(base: dict, over: dict) -> dict:
    """``base`` with ``over`` on top: mappings merged key by key (recursively), any other value
    (numbers, strings, lists) replaced. Neither input is modified."""
    out = dict(base)
    for key, value in over.items():
        old = out.get(key)
        out[key] = deep_merge(old, value) if isinstance(value, dict) and isinstance(old, dict) else value
    return out


def _base_path(text: Any, child: Path) -> Path:
    """The file that ``base: text`` in ``child`` names: a file relative to ``child``'s folder (``.yaml``
    may be left off), else a shipped config name; a :class:`ConfigError` naming ``child`` otherwise."""
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"{child}: {BASE_KEY}: expected a config file or shipped config name, got {text!r}")
    suffixed = text if text.endswith((".yaml", ".yml")) else text + ".yaml"
    for candidate in (child.parent / text, child.parent / suffixed):
        if candidate.is_file():
            return candidate
    has_folder = os.sep in text or (os.altsep is not None and os.altsep in text)
    if not has_folder and (SHIPPED_CONFIG_DIR / suffixed).is_file():
        return SHIPPED_CONFIG_DIR / suffixed
    raise ConfigError(f"{child}: {BASE_KEY}: {text}: no such file next to it ({child.parent / suffixed}) and not a "
                      f"shipped config name ({', '.join(shipped_configs())})")


def load_yaml_tree(path: str | os.PathLike, _chain: tuple[Path, ...] = ()) -> dict:
    """Read a YAML mapping and the configs it inherits from: a top-level ``base: NAME`` (a file
    relative to this one, or a shipped config name) is read first (recursively) and this file's
    keys are deep-merged on top (:func:`deep_merge`); ``base`` itself is dropped. A ``base:`` that
    holds a mapping is a setting, not inheritance (``tune``'s search space has one) and is kept.

    Raises:
        ConfigError: a missing base, or a cycle (``a.yaml -> b.yaml -> a.yaml``), naming the files.
    """
    path = Path(path)
    here = path.resolve()
    if here in _chain:
        cycle = " -> ".join(str(p) for p in (*_chain[_chain.index(here):], here))
        raise ConfigError(f"{_chain[0]}: {BASE_KEY}: inheritance cycle {cycle}")
    data = load_yaml(path)
    if BASE_KEY not in data or isinstance(data[BASE_KEY], dict):
        return data
    parent = load_yaml_tree(_base_path(data[BASE_KEY], path), (*_chain, here))
    return deep_merge(parent, {k: v for k, v in data.items() if k != BASE_KEY})


def parse_overrides(items: Sequence[str], flag: str = "--set") -> dict[str, Any]:
    """``["optim.lr=1e-3", "sampler.patch_size=[64,64,64]"]`` -> ``{"optim.lr": "1e-3", ...}``: each
    value parsed as YAML (``[64,64,64]`` a list, ``null`` None, ``1e-3`` the string a float field
    accepts); the key paths are checked when the config is built (:func:`from_dict` messages).

    Raises:
        ConfigError: an item without ``=``, a key that is not a dotted name, or a value that is not YAML.
    """
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not _DOTTED_KEY.fullmatch(key):
            raise ConfigError(f"{flag} {item!r}: expected KEY=VALUE with a dotted key, e.g. {flag} optim.lr=1e-3")
        try:
            out[key] = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{flag} {key}: invalid YAML value {text!r} ({str(exc).splitlines()[0]})") from None
    return out


def _set_dotted(data: dict, key: str, value: Any) -> None:
    node = data
    *parents, last = key.split(".")
    for part in parents:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[last] = value


def load_config(
    cls: type[T],
    path: str | os.PathLike,
    *,
    section: str | None = None,
    overrides: dict[str, Any] | None = None,
    transform: Callable[[dict, str], dict] | None = None,
) -> T:
    """Load dataclass ``cls`` from a YAML file or shipped config name: THE config loader.

    Args:
        cls: the dataclass (``TrainConfig``, ``PostprocessConfig``, ``InferenceConfig``, ...).
        path: a YAML file or a shipped config name (see :func:`resolve_config_path`); a top-level
            ``base:`` inherits from another config (:func:`load_yaml_tree`).
        section: for one section of a whole config: the file may hold that section's keys bare
            (as ``tune`` writes them) or under a top-level ``<section>:`` key (a training config);
            key paths in messages start with ``<section>.``.
        overrides: ``{"dotted.key": value}`` set on top of the file (``{"train.epochs": 3}``),
            relative to ``cls`` (the CLI's ``--set``, :func:`parse_overrides`).
        transform: ``f(mapping, prefix) -> mapping`` applied before :func:`from_dict` (``tune``
            expands its ``{start, stop, step}`` ranges with it).

    Raises:
        ConfigError: one line naming the file and, where it is about a key, the key path.
    """
    resolved = resolve_config_path(path)
    data = load_yaml_tree(resolved)
    prefix = section or ""
    if section is not None and isinstance(data.get(section), dict):
        data = data[section]
    for key, value in (overrides or {}).items():
        _set_dotted(data, key, value)
    try:
        if transform is not None:
            data = transform(data, prefix)
        return from_dict(cls, data, prefix)
    except ConfigError as exc:
        raise ConfigError(f"{resolved}: {exc}") from None


def canonical_dict(cls: type, data: dict) -> dict:
    """``data`` (a stored config dict, e.g. a checkpoint's) with old key names and values replaced by
    today's, quietly: the keys ``data`` holds, as :func:`to_dict` would write them. A dict that does
    not load as ``cls`` is returned unchanged."""
    try:
        with _quietly(), warnings.catch_warnings():
            warnings.simplefilter("ignore", ConfigDeprecationWarning)
            full = to_dict(from_dict(cls, data))
    except (ConfigError, TypeError):
        return data

    def renamed(kind: type, d: dict) -> dict:
        aliases = getattr(kind, "CONFIG_ALIASES", None) or {}
        hints = typing.get_type_hints(kind) if dataclasses.is_dataclass(kind) else {}
        out = {}
        for k, v in d.items():
            k = aliases.get(k, k)
            sub = hints.get(k)
            out[k] = renamed(sub, v) if isinstance(v, dict) and dataclasses.is_dataclass(sub) else v
        return out

    def keep(full_d: Any, held: Any) -> Any:
        if isinstance(full_d, dict) and isinstance(held, dict):
            return {k: keep(full_d[k], v) for k, v in held.items() if k in full_d}
        return full_d

    return keep(full, renamed(cls, data))


def save_config(obj: Any, path: str | os.PathLike) -> None:
    """Write a dataclass as YAML (atomically)."""
    from .data import atomic_path

    with atomic_path(path) as tmp:
        Path(tmp).write_text(yaml.safe_dump(to_dict(obj), sort_keys=False))
