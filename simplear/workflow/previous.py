"""Outputs a stage had before it reran: moved aside to `<stage>/.previous/<label>/`, never deleted silently;
`simplear clean` removes them and says how much it freed. On a POSIX run dir the move is a rename per top-level
entry (cheap at any size); on object storage a server-side copy and delete per object (requests, no download).
"""

from __future__ import annotations

import logging
import time

from simplear.storage import Store, join

log = logging.getLogger("simplear.engine")

PREVIOUS = ".previous"
MOVED = "_MOVED.json"


def top_entries(store: Store, stage: str) -> list[str]:
    """The names directly under a stage's folder that hold files, `.previous/` aside."""
    if store.is_local:
        folder = store.local_root / stage
        return sorted(p.name for p in folder.iterdir() if p.name != PREVIOUS) if folder.is_dir() else []
    return sorted({item.key[len(stage) + 1:].split("/")[0] for item in store.list(stage)} - {PREVIOUS})


def move_aside(store: Store, stage: str, label: str, reason: str, keep: bool = True) -> str | None:
    """Move everything of a stage but `.previous/` aside; returns where it went (None: nothing there)."""
    entries = top_entries(store, stage)
    if not entries:
        return None
    if not keep:
        for name in entries:
            store.delete_prefix(join(stage, name))
        log.warning("%s: deleted its previous outputs (%d entries; keep_previous is false): %s", stage, len(entries), reason)
        return None
    taken = set(previous_sets(store, stage))
    dest, n = label, 1
    while dest in taken:
        n += 1
        dest = f"{label}-{n}"
    for name in entries:
        store.move(join(stage, name), join(stage, PREVIOUS, dest, name))
    store.write_json(join(stage, PREVIOUS, dest, MOVED), {"reason": reason, "at": time.time(), "entries": entries})
    log.warning("%s: moved its previous outputs aside to %s (%s); `simplear clean` removes them",
                stage, join(stage, PREVIOUS, dest), reason)
    return join(stage, PREVIOUS, dest)


def previous_sets(store: Store, stage: str) -> list[str]:
    root = join(stage, PREVIOUS)
    if store.is_local:
        folder = store.local_root / root
        return sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
    return sorted({item.key[len(root) + 1:].split("/")[0] for item in store.list(root)})


def clean(store: Store, stage: str) -> tuple[int, int]:
    """Remove what was moved aside in one stage folder; returns (sets removed, bytes freed)."""
    sets = previous_sets(store, stage)
    return len(sets), store.delete_prefix(join(stage, PREVIOUS))
