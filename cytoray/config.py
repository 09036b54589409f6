"""Typed configuration: dataclass schema <- yaml defaults <- override files <- ``key=value`` overrides.

Merged in that order with OmegaConf in struct mode, so an unknown key or a value of the wrong type fails at
start-up with the key named (:class:`ConfigError`). Fields declared with :func:`location_field` (dataset roots,
manifests, checkpoints, output locations) hold local paths or object-storage URIs; a relative local path is made
absolute against the working directory at load, so the resolved config (written next to the run's outputs with
secrets redacted, :func:`save_config`) and everything the run writes name files any process can find.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from cytoray import storage
from cytoray.errors import UserError

T = TypeVar("T")
LOCATION = "location"  # dataclass field metadata key: the field holds a path / URI, or a list of them


class ConfigError(UserError):
    """A user configuration problem; the message names the key or file and how to fix it."""


# Keys that were removed: a config that still sets one is told why and what to do (not just "unknown key").
REMOVED_KEYS = {
    "dedup.search_rows": "was removed: the near-duplicate search is a join over list partitions and has no query "
                         "groups (docs/curation.md, 'Search and scale'); delete it",
}


def _describe(exc: OmegaConfBaseException, cfg=None) -> str:
    """One line naming the key: OmegaConf's first line without its ``full_key/reference_type/object_type`` block;
    for an unknown key, the closest valid key by its full name."""
    key = getattr(exc, "full_key", None) or getattr(exc, "key", None)
    msg = (getattr(exc, "msg", None) or str(exc)).splitlines()[0]
    if key and isinstance(exc, ConfigKeyError) and cfg is not None:
        parent, _, leaf = str(key).rpartition(".")
        node = OmegaConf.select(cfg, parent) if parent else cfg
        if isinstance(node, DictConfig) and leaf not in node:
            for removed, why in REMOVED_KEYS.items():
                if f".{key}".endswith(f".{removed}"):
                    return f"key '{key}' {why}"
            close = difflib.get_close_matches(leaf, [str(k) for k in node.keys()], n=1, cutoff=0.6)
            hint = f"; did you mean '{parent + '.' if parent else ''}{close[0]}'?" if close else ""
            return f"unknown key '{key}'{hint}"
    msg = re.sub(r"\. Did you mean.*$", "", msg)
    return f"key '{key}': {msg}" if key else msg


def load_config(
    schema: type[T],
    defaults: str | os.PathLike | None = None,
    override_files: Sequence[str | os.PathLike] = (),
    cli: Sequence[str] = (),
    base: Sequence[tuple[str, dict]] = (),
) -> T:
    """Build a validated config object of ``schema`` (a dataclass); returns an OmegaConf-typed view.

    ``cli`` items look like ``ingest.batch_size=64`` or ``+extra.key=1`` is *not* accepted: unknown keys are
    errors by design. ``base`` holds (origin, mapping) layers merged before ``defaults`` (e.g. a model preset
    placed under its key).
    """
    cfg = OmegaConf.structured(schema)
    OmegaConf.set_struct(cfg, True)
    _open_free_form_dicts(cfg)
    sources: list[tuple[str, DictConfig]] = [(origin, OmegaConf.create(data)) for origin, data in base]
    for path in [p for p in [defaults, *override_files] if p is not None]:
        if not Path(path).is_file():
            raise ConfigError(f"config file not found: {path} (pass an existing yaml file)")
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid yaml: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level, got {type(data).__name__}")
        sources.append((str(path), OmegaConf.create(data)))
    bad = [item for item in cli if "=" not in item or item.startswith(("+", "~"))]
    if bad:
        raise ConfigError(f"overrides must look like key=value (no +/~ prefixes); got {bad}")
    if cli:
        sources.append(("command line", OmegaConf.from_dotlist(list(cli))))
    for origin, src in sources:
        try:
            cfg = OmegaConf.merge(cfg, src)
        except OmegaConfBaseException as exc:
            raise ConfigError(f"{origin}: {_describe(exc, cfg)}") from exc
    try:
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{_describe(exc)} (set it in a config file or as key=value)") from exc
    absolute_locations(cfg)
    return cfg  # type: ignore[return-value]


def location_field(default=None, **kwargs):
    """A dataclass field that holds a location (local path or object-storage URI), or a list of them with
    ``default_factory=list``: :func:`load_config` makes a relative local path absolute against the working
    directory."""
    if "default_factory" in kwargs:
        return dataclasses.field(metadata={LOCATION: True}, **kwargs)
    return dataclasses.field(default=default, metadata={LOCATION: True}, **kwargs)


def absolute_locations(node) -> None:
    """Make the relative local paths of every :func:`location_field` in ``node`` (an OmegaConf config of a
    dataclass schema, or a dataclass instance) absolute against the working directory, in place; nested
    dataclasses and lists of them included. Object-storage URIs, absolute paths and unset values stay as they are."""
    schema = OmegaConf.get_type(node) if OmegaConf.is_config(node) else type(node)
    if not (isinstance(schema, type) and dataclasses.is_dataclass(schema)):
        return
    for f in dataclasses.fields(schema):
        if OmegaConf.is_config(node) and OmegaConf.is_missing(node, f.name):
            continue
        value = getattr(node, f.name)
        if f.metadata.get(LOCATION):
            if isinstance(value, str):
                setattr(node, f.name, storage.absolute(value))
            elif value is not None:  # a list of locations
                setattr(node, f.name, [storage.absolute(v) for v in value])
        elif OmegaConf.is_list(value) or isinstance(value, list):
            for item in value:
                absolute_locations(item)
        else:
            absolute_locations(value)


def _open_free_form_dicts(node) -> None:
    """``dict[str, X]`` fields (e.g. label selectors) take new keys; dataclass fields stay closed."""
    if not isinstance(node, DictConfig):
        return
    for key in node.keys():
        child = node._get_node(key)
        if isinstance(child, DictConfig):
            if OmegaConf.get_type(child) is dict:
                OmegaConf.set_struct(child, False)
            else:
                _open_free_form_dicts(child)


def to_dict(cfg) -> dict:
    if OmegaConf.is_config(cfg):
        return OmegaConf.to_container(cfg, resolve=True)
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


def to_object(cfg):
    """The plain dataclass instance (picklable, cheap to ship to Ray workers)."""
    return OmegaConf.to_object(cfg) if OmegaConf.is_config(cfg) else cfg


def dump_yaml(cfg) -> str:
    return yaml.safe_dump(storage.redact(to_dict(cfg)), sort_keys=False)


def save_config(cfg, run_uri: str, storage_cfg: storage.StorageConfig | None = None) -> str:
    """Write the resolved, redacted config to ``<run_uri>/config.yaml``; returns its URI."""
    uri = storage.join_uri(run_uri, "config.yaml")
    storage.write_bytes(uri, dump_yaml(cfg).encode(), storage_cfg)
    return uri


def split_cli(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Separate ``--config a.yaml --config b.yaml`` file arguments from ``key=value`` overrides."""
    files, overrides = [], []
    it = iter(argv)
    for arg in it:
        if arg in ("--config", "-c"):
            try:
                files.append(next(it))
            except StopIteration:
                raise ConfigError("--config needs a yaml file path") from None
        elif arg.startswith("--config="):
            files.append(arg.split("=", 1)[1])
        elif "=" in arg:
            overrides.append(arg)
        else:
            raise ConfigError(f"unexpected argument {arg!r}: use --config FILE.yaml or key=value overrides")
    return files, overrides
