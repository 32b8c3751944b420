"""Settings objects built from CLI options (or by API users), and pyproject defaults.

The CLI turns its options into these plain objects as early as it can; nothing past
``cli.py`` sees click. ``[tool.dsrewrite.<command>]`` tables in ``pyproject.toml`` (or a
``dsrewrite.toml``) fill click's ``default_map``, so flags given on the command line win.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ConfigError

if TYPE_CHECKING:  # no torch at import time: the CLI's --help must start fast
    import torch

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclasses.dataclass
class ModelSettings:
    """How to load a model and what to feed it."""

    spec: str
    input_shapes: list[tuple[int, ...]] = dataclasses.field(default_factory=list)
    dtype: torch.dtype | None = None
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    trust_pickle: bool = False
    #: bytes a real-forward fallback may use (None: 80% of the memory available)
    max_memory: float | None = None


@dataclasses.dataclass
class OutputSettings:
    """Where and how to write a report."""

    format: str = "table"
    output: str | None = None


def find_config(start: Path | None = None) -> Path | None:
    """The nearest ``dsrewrite.toml`` or ``pyproject.toml`` with a ``[tool.dsrewrite]`` table."""
    folder = (start or Path.cwd()).resolve()
    for candidate_dir in [folder, *folder.parents]:
        for name in ("dsrewrite.toml", "pyproject.toml"):
            path = candidate_dir / name
            if path.is_file() and (name == "dsrewrite.toml" or "[tool.dsrewrite" in path.read_text(errors="ignore")):
                return path
    return None


def read_tool_table(path: Path) -> dict[str, Any]:
    """The ``[tool.dsrewrite]`` table of a pyproject (the whole file for dsrewrite.toml)."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"{path}: cannot read TOML: {e}") from e
    if path.name == "pyproject.toml":
        return data.get("tool", {}).get("dsrewrite", {})
    return data.get("tool", {}).get("dsrewrite", data)


def default_map(path: Path | None) -> dict[str, Any]:
    """Click ``default_map`` from a config file: ``{command: {option: value}}`` with ``-`` → ``_``."""
    if path is None:
        return {}
    table = read_tool_table(path)
    return {
        command: {k.replace("-", "_"): v for k, v in options.items() if not isinstance(v, dict)}
        for command, options in table.items() if isinstance(options, dict)
    }
