"""otstudy's on-disk cache (torch-free): things that are slow to make and never change for a given input.

``$OTSTUDY_CACHE_DIR``, else ``$XDG_CACHE_HOME/otstudy``, else ``~/.cache/otstudy``. Every
entry is keyed by everything it depends on and written atomically, so concurrent trials
and studies share it safely; deleting the directory only costs time.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Optional


def cache_dir() -> Path:
    if os.environ.get("OTSTUDY_CACHE_DIR"):
        return Path(os.environ["OTSTUDY_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "otstudy"


def read_json(name: str) -> Optional[Any]:
    """The cached JSON value ``name``, or None (absent or unreadable)."""
    try:
        return json.loads((cache_dir() / name).read_text())
    except (OSError, ValueError):
        return None


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` to a file of this process next to ``path``, then move it to ``path`` in one step
    (concurrent writers each use their own file); nothing is left behind if ``write`` raises."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(name: str, value: Any) -> None:
    """Cache ``value`` under ``name``; a cache that cannot be written is skipped silently."""
    try:
        write_atomically(cache_dir() / name, lambda tmp: tmp.write_text(json.dumps(value)))
    except OSError:
        pass
