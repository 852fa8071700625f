"""What decides whether a stage's outputs are still valid, and, when they are not, why.

A fingerprint hashes its *parts*: the kind's declared `version`, the resolved config without the
kind's operational keys, each input's fingerprint and output checksums, and the dataset manifests the
config names. The parts are kept in the manifest, so `status` can say which one changed. The source
hash of the code is not a part: editing a comment must never throw days of work away.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any

SCHEME = 2  # manifests written before `version`/`operational` existed have no "scheme"


def _digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def strip_keys(config: dict, dotted: frozenset[str] | set[str]) -> dict:
    """A copy of `config` without the given dotted keys (`train.log_every`), and without the sections that held
    nothing else (`vllm: {}` once its only key is stripped is the same as no `vllm` key)."""
    out = copy.deepcopy(config)
    for key in dotted:
        *path, last = key.split(".")
        nodes = [out]
        for part in path:
            nxt = nodes[-1].get(part) if isinstance(nodes[-1], dict) else None
            if not isinstance(nxt, dict):
                break
            nodes.append(nxt)
        else:
            nodes[-1].pop(last, None)
            for parent, part, node in reversed(list(zip(nodes, path, nodes[1:]))):
                if not node:
                    parent.pop(part, None)
    return out


def outputs_digest(manifest: dict) -> str:
    return _digest([(o["path"], o["sha256"]) for o in manifest["outputs"]])


def datasets_used(dataset_files: dict, config: Any) -> dict[str, str]:
    """Hashes of the dataset manifests a config names anywhere in its values."""
    names: set[str] = set()

    def walk(value: Any) -> None:
        if isinstance(value, str) and value in dataset_files:
            names.add(value)
        elif isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                walk(v)

    walk(config)
    return {n: hashlib.sha256(dataset_files[n].read_bytes()).hexdigest() for n in sorted(names)}


def fingerprint_parts(kind: str, version: int, config: dict, operational: frozenset[str], inputs: dict[str, dict],
                      datasets: dict[str, str]) -> dict:
    return {
        "kind": kind,
        "version": version,
        "config": strip_keys(config, operational),
        "inputs": {n: {"fingerprint": m["fingerprint"], "outputs": outputs_digest(m)} for n, m in sorted(inputs.items())},
        "datasets": datasets,
    }


def fingerprint_of(parts: dict) -> str:
    return _digest(parts)


def legacy_fingerprint(kind: str, config: dict, code_version: str, inputs: dict[str, dict], datasets: dict[str, str]) -> str:
    """The fingerprint of manifests written before SCHEME 2 (config, code hash, inputs, datasets): used only to
    check that such a manifest still matches its inputs before it is re-fingerprinted."""
    payload = {
        "kind": kind,
        "config": config,
        "code_version": code_version,
        "inputs": {n: {"fingerprint": m["fingerprint"], "outputs": [(o["path"], o["sha256"]) for o in m["outputs"]]}
                   for n, m in sorted(inputs.items())},
        "datasets": datasets,
    }
    return _digest(payload)


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and not value and not prefix:
        return {}
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


_DEFAULT = object()  # a key left at its default is not in the fingerprinted config


def _shown(value: Any) -> str:
    return "(default)" if value is _DEFAULT else json.dumps(value)


def stale_reasons(recorded: dict | None, current: dict) -> list[str]:
    """Which parts changed between the fingerprint a stage ran with and the one it would run with now."""
    if not recorded:
        return ["its manifest records no fingerprint parts"]
    reasons = []
    if recorded.get("version") != current["version"]:
        reasons.append(f"version {recorded.get('version')} -> {current['version']}")
    old, new = _flatten(recorded.get("config", {})), _flatten(current["config"])
    for key in sorted(set(old) | set(new)):
        if old.get(key, _DEFAULT) != new.get(key, _DEFAULT):
            reasons.append(f"config {key}: {_shown(old.get(key, _DEFAULT))} -> {_shown(new.get(key, _DEFAULT))}")
    for name in sorted(set(recorded.get("inputs", {})) | set(current["inputs"])):
        if recorded.get("inputs", {}).get(name) != current["inputs"].get(name):
            reasons.append(f"input {name} changed")
    for name in sorted(set(recorded.get("datasets", {})) | set(current["datasets"])):
        if recorded.get("datasets", {}).get(name) != current["datasets"].get(name):
            reasons.append(f"dataset {name} changed")
    return reasons or ["fingerprint differs"]


def source_changes(recorded: dict[str, list], current: dict[str, list]) -> list[str]:
    """How the files outside the run a stage read changed since it ran (new, changed, gone)."""
    out = []
    for path in sorted(set(recorded) | set(current)):
        name = Path(path).name
        if path not in recorded:
            out.append(f"source {name} is new")
        elif path not in current:
            out.append(f"source {name} is gone (its outputs are kept)")
        elif list(recorded[path]) != list(current[path]):
            out.append(f"source {name} changed ({recorded[path][0]} -> {current[path][0]} bytes)")
    return out
