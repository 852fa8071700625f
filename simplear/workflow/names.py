"""Names that become paths: stage, checkpoint and prompt-set names from workflow.yaml, item ids from benchmark files.

A name is one path component that cannot climb (`..`), hide (a leading dot, like the engine's own `.previous`),
or reach elsewhere (a separator, an absolute path). Names a person chose in workflow.yaml are checked and refused
with the rule; ids a data file brings are mapped to a safe name, kept as they are when already safe (DPG-Bench
names its grids after its item ids, and its own ids all pass).
"""

from __future__ import annotations

import hashlib
import re

NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"
_NAME = re.compile(NAME)
RULE = "letters, digits, '_', '.' and '-', starting with a letter or digit, at most 128 characters"


def check_name(name: str, what: str) -> str:
    """`name` if it is a safe path component, else ValueError naming `what` and the rule."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"{what} {name!r} cannot name a folder or file: use {RULE}")
    return name


def file_name(text: str) -> str:
    """A safe path component for an id from a data file: itself when safe, else its safe characters and a hash of
    the whole id (two ids that differ only in unsafe characters stay apart)."""
    if _NAME.fullmatch(text):
        return text
    kept = re.sub(r"[^A-Za-z0-9_.-]+", "_", text).lstrip("._-")[:100] or "id"
    return f"{kept}-{hashlib.sha256(text.encode('utf-8', 'surrogatepass')).hexdigest()[:12]}"
