"""Typed configuration base: every config in the project rejects unknown keys and reports the path of a bad field."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError


class StrictModel(BaseModel):
    """Base of every config: unknown keys are an error, so a typo never passes silently."""

    model_config = ConfigDict(extra="forbid", validate_default=True, protected_namespaces=())


class ConfigError(ValueError):
    """A user mistake in a configuration file; the message names the file and the key path."""


def _loc(prefix: str, loc: tuple[Any, ...]) -> str:
    parts = [prefix] if prefix else []
    parts += [str(p) for p in loc]
    return ".".join(parts) or "<root>"


def describe_validation_error(err: ValidationError, prefix: str = "") -> list[str]:
    """One line per problem, as `path.to.key: message`; pydantic's wording for extras becomes `unknown key`."""
    lines = []
    for e in err.errors():
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        lines.append(f"{_loc(prefix, e['loc'])}: {msg}")
    return lines
