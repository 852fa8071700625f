"""Outputs a stage had before it reran: moved aside to `<stage>/.previous/<label>/` (a rename, cheap at any
size), never deleted silently; `simplear clean` removes them and says how much it freed."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

log = logging.getLogger("simplear.engine")

PREVIOUS = ".previous"
MOVED = "_MOVED.json"


def move_aside(stage_dir: Path, label: str, reason: str, keep: bool = True) -> Path | None:
    """Move everything in `stage_dir` but `.previous/` aside; returns where it went (None: nothing there)."""
    entries = [p for p in stage_dir.iterdir() if p.name != PREVIOUS] if stage_dir.is_dir() else []
    if not entries:
        return None
    if not keep:
        for p in entries:
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        log.warning("%s: deleted its previous outputs (%d entries; keep_previous is false): %s", stage_dir.name, len(entries), reason)
        return None
    root = stage_dir / PREVIOUS
    dest, n = root / label, 1
    while dest.exists():
        n += 1
        dest = root / f"{label}-{n}"
    dest.mkdir(parents=True)
    for p in entries:
        os.rename(p, dest / p.name)
    (dest / MOVED).write_text(json.dumps({"reason": reason, "at": time.time(), "entries": sorted(p.name for p in entries)}, indent=2))
    log.warning("%s: moved its previous outputs aside to %s (%s); `simplear clean` removes them",
                stage_dir.name, dest.relative_to(stage_dir.parent), reason)
    return dest


def tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def previous_sets(stage_dir: Path) -> list[Path]:
    root = stage_dir / PREVIOUS
    return sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


def clean(stage_dir: Path) -> tuple[int, int]:
    """Remove what was moved aside in one stage folder; returns (sets removed, bytes freed)."""
    sets = previous_sets(stage_dir)
    freed = sum(tree_bytes(p) for p in sets)
    shutil.rmtree(stage_dir / PREVIOUS, ignore_errors=True)
    return len(sets), freed
