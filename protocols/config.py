"""Settings of a long-running role from a TOML file, the environment and command-line flags.

Every service (``iomt cloud party``, ``iomt edge run`` ...) takes ``--config FILE``: a TOML
file whose keys are the field names of the role's pydantic-settings class. Precedence, from
strongest to weakest:

1. a command-line flag given explicitly,
2. the role's environment variable (``IOMT_PARTY_INDEX``, ``IOMT_EDGE_HOSPITAL`` ...),
3. the TOML file,
4. the field's default.

A key the class does not know (a typo) is an error that names the key and the file; so is
a required setting that none of the four supplies. The CLI turns :class:`ConfigError` into
exit code 2.
"""
from __future__ import annotations

import argparse
import tomllib
from pathlib import Path
from typing import Any, Mapping, TypeVar

from pydantic import ValidationError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, TomlConfigSettingsSource

from protocols.errors import ConfigError

S = TypeVar("S", bound=BaseSettings)


def add_config_argument(parser: argparse.ArgumentParser, settings_cls: type[BaseSettings]) -> None:
    """``--config FILE``: the role's TOML settings (flags given explicitly win over it)."""
    prefix = settings_cls.model_config.get("env_prefix", "")
    parser.add_argument("--config", type=Path, metavar="TOML",
                        help=f"TOML file of {settings_cls.__name__} keys; precedence: flag > "
                             f"environment ({prefix}*) > file > default; unknown keys are an error")


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except OSError as err:
        raise ConfigError(f"config file {path}: {err.strerror or err}") from err
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config file {path} is not valid TOML: {err}") from err


def _describe(err: ValidationError, settings_cls: type[BaseSettings], path: Path | None,
              flags: Mapping[str, str]) -> str:
    prefix = settings_cls.model_config.get("env_prefix", "")
    where = f" in {path}" if path else ""
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            lines.append(f"unknown key {key!r}{where}")
        elif e["type"] == "missing":
            flag = flags.get(key, "--" + key.replace("_", "-"))
            lines.append(f"{key} is required: give {flag}, set {prefix}{key.upper()} or put {key} in --config")
        else:
            lines.append(f"{key}: {e['msg']}" if key else e["msg"])
    return "; ".join(lines)


def load_settings(settings_cls: type[S], path: Path | None = None, flags: Mapping[str, Any] | None = None, *,
                  flag_names: Mapping[str, str] | None = None) -> S:
    """An instance of ``settings_cls`` from ``path`` (TOML), the environment and ``flags``.

    Parameters
    ----------
    settings_cls
        The role's settings class (``extra="forbid"``, with its own ``env_prefix``).
    path
        The TOML file, or None for environment and flags only.
    flags
        Field name -> value of the command-line flags; ``None`` values (flags not given) are
        left out so that they do not hide the environment or the file.
    flag_names
        Field name -> flag, for error messages where they differ (``party_urls`` -> ``--party``).

    Raises
    ------
    ConfigError
        Unreadable or malformed file, unknown key, missing or invalid setting.
    """
    given = {k: v for k, v in (flags or {}).items() if v is not None}
    if path is not None:
        _read_toml(path)  # a clear error for a missing or malformed file before pydantic's

        class _FromFile(settings_cls):  # type: ignore[valid-type, misc]
            @classmethod
            def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                           file_secret_settings) -> tuple[PydanticBaseSettingsSource, ...]:
                return init_settings, env_settings, TomlConfigSettingsSource(settings_cls, toml_file=path)

        _FromFile.__name__ = _FromFile.__qualname__ = settings_cls.__name__
        cls: type[BaseSettings] = _FromFile
    else:
        cls = settings_cls
    try:
        loaded = cls(**given)
    except ValidationError as err:
        raise ConfigError(_describe(err, settings_cls, path, flag_names or {})) from err
    except ValueError as err:
        raise ConfigError(str(err)) from err
    if cls is settings_cls:
        return loaded  # type: ignore[return-value]
    # hand back the role's own class (picklable, same type as everywhere else); values are validated
    return settings_cls.model_construct(_fields_set=loaded.model_fields_set,
                                        **{name: getattr(loaded, name) for name in settings_cls.model_fields})
