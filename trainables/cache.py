"""otstudy's on-disk cache (torch-free): things that are slow to make and never change for a given input.

``$OTSTUDY_CACHE_DIR``, else ``$XDG_CACHE_HOME/otstudy``, else ``~/.cache/otstudy``. Every
entry is keyed by everything it depends on and written atomically, so concurrent trials
and studies share it safely; deleting the directory only costs time.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional


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


def write_json(name: str, value: Any) -> None:
    """Cache ``value`` under ``name``; a cache that cannot be written is skipped silently."""
    path = cache_dir() / name
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(value))
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
