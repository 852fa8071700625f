"""The GPU check script runs (on CPU, toy shapes) with torch and transformers alone, so it cannot rot unseen."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_tiny_runs_every_part_without_ray_or_vllm(tmp_path):
    out = tmp_path / "gpu.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks/gpu_check.py"), "--tiny", "--json", str(out)], check=True,
                   capture_output=True, timeout=300, cwd=tmp_path)
    r = json.loads(out.read_text())
    assert r["imports"] == [] and r["tiny"] and r["recompute_counted_in_mfu"] is False
    assert [(t["micro_batch"], t["tokens"]) for t in r["train"]] == [(2, 40), (1, 72)]
    assert all(t["tokens_per_s"] > 0 and t["loss"] > 0 for t in r["train"])
    assert r["fsdp"]["world_size"] == 1 and r["fsdp"]["tokens_per_s"] > 0
    assert [s["batch"] for s in r["sample"]] == [1, 2] and all(s["s_per_image"] > 0 for s in r["sample"])
    assert r["tokenizer"]["codes_per_image"] == (64 // 16) ** 2 and r["tokenizer"]["images_per_s"] > 0
    assert all(s["step_ms"] > 0 and s["floor_step_ms"] is None for s in r["sample"])  # no bandwidth known on CPU
    # 5 images of 64^2 at 8 per call of 1024^2: one call
    assert r["decode"]["images"] == 5 and r["decode"]["images_per_call"] >= 5 and r["decode"]["images_per_s"] > 0
