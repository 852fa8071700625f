"""The data stages' pieces without Ray: demo generator, error reasons, image checks, crop, resume bookkeeping, engines."""

from __future__ import annotations

import io
import json
import random
import time
from collections import Counter

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines import demo_shapes
from pipelines.download import classify
from pipelines.filter import check_image
from pipelines.pixels import IMAGE_FILE, IMAGE_ROW, fetch, open_images
from pipelines.pretokenize import Encoder, Resolution, TokenizeConfig, center_crop_arr, prepare_crops
from pipelines.resumable_parquet import (RECEIPTS, SRC, Source, check_complete, read_receipts, resume, to_arrow, totals,
                                        write_parts)
from simplear.datasets import DemoShapesParams
from simplear.visual_tokenizers import load_visual_tokenizer


def png(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


# ---- demo set ----------------------------------------------------------------------------------------


def test_demo_set_is_deterministic_and_broken_on_purpose(tmp_path):
    params = DemoShapesParams(count=40, seed=3)
    a = demo_shapes.generate(tmp_path / "a", params)
    b = demo_shapes.generate(tmp_path / "b", params)
    ta, tb = pq.read_table(a), pq.read_table(b)
    assert ta.equals(tb)
    for path in ta.column("path").to_pylist():
        fa, fb = tmp_path / "a" / path, tmp_path / "b" / path
        assert fa.exists() == fb.exists() and (not fa.exists() or fa.read_bytes() == fb.read_bytes())
    kinds = Counter(ta.column("kind").to_pylist())
    assert kinds == {"ok": 40, "truncated": 3, "not_an_image": 3, "zero_byte": 2, "huge_header": 2, "missing": 4}
    rows = ta.to_pylist()
    assert not (tmp_path / "a" / next(r["path"] for r in rows if r["kind"] == "missing")).exists()
    assert (tmp_path / "a" / next(r["path"] for r in rows if r["kind"] == "zero_byte")).stat().st_size == 0
    # a second call with the same params does nothing
    before = (tmp_path / "a/urls.parquet").stat().st_mtime_ns
    demo_shapes.generate(tmp_path / "a", params)
    assert (tmp_path / "a/urls.parquet").stat().st_mtime_ns == before


def test_demo_images_show_what_their_captions_say(tmp_path):
    demo_shapes.generate(tmp_path, DemoShapesParams(count=60, jpeg_fraction=0.0))
    rows = [r for r in pq.read_table(tmp_path / "urls.parquet").to_pylist() if r["kind"] == "ok"]
    shorts = set()
    for r in rows:
        fg, shape, bg = demo_shapes.parse_caption(r["caption"])
        assert demo_shapes.caption_for(fg, shape, bg) == r["caption"] and fg != bg
        with Image.open(tmp_path / r["path"]) as im:
            pixels = Counter(map(tuple, np.asarray(im.convert("RGB")).reshape(-1, 3).tolist()))
            shorts.add(min(im.size))
        (top, _), (second, _) = pixels.most_common(2)
        assert {top, second} == {demo_shapes.PALETTE[fg], demo_shapes.PALETTE[bg]}
    assert min(shorts) < 64 and max(shorts) >= 128  # both sides of the demo's thresholds
    assert demo_shapes.parse_caption("a photo of a dog") is None


def test_loopback_server_serves_and_404s(tmp_path):
    import urllib.error
    import urllib.request

    (tmp_path / "x.txt").write_text("hi")
    with demo_shapes.serve(tmp_path) as base:
        assert base.startswith("http://127.0.0.1:")
        assert urllib.request.urlopen(f"{base}/x.txt", timeout=5).read() == b"hi"
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(f"{base}/nope.png", timeout=5)
        assert e.value.code == 404
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{base}/x.txt", timeout=2)


# ---- reasons -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "status,error,reason",
    [
        ("success", None, None),
        ("failed_to_download", "HTTP Error 404: File not found", "http_404"),
        ("failed_to_download", "<urlopen error [Errno 111] Connection refused>", "connection_error"),
        ("failed_to_download", "The read operation timed out", "timeout"),
        ("failed_to_resize", "Image decoding error", "undecodable"),
        ("failed_to_resize", "OpenCV(4.14.0) loadsave.cpp:1310: error: (-215:Assertion failed) !buf.empty() in function 'imdecode_'", "empty_file"),
        ("failed_to_resize", "OpenCV(4.14.0) error: (-215:Assertion failed) pixels <= CV_IO_MAX_IMAGE_PIXELS", "too_large"),
        ("failed_to_resize", "image too small", "too_small"),
        ("failed_to_resize", "something new", "other"),
    ],
)
def test_img2dataset_errors_become_reasons(status, error, reason):
    assert classify(status, error) == reason


def test_check_image_reasons():
    rng = random.Random(0)
    good = png(demo_shapes.draw("red", "circle", "blue", 96, 80, rng))
    jpeg = png(demo_shapes.draw("red", "circle", "blue", 96, 96, rng), "JPEG")
    args = dict(min_short_edge=64, max_aspect_ratio=2.0, verify_decode=True, max_pixels=10**8)
    assert check_image(good, **args) == (None, 96, 80, None)
    assert check_image(png(Image.new("RGB", (200, 48))), **args)[0] == "too_small"
    assert check_image(png(Image.new("RGB", (300, 100))), **args)[0] == "aspect_ratio"
    assert check_image(jpeg[: len(jpeg) * 3 // 4], **args)[0] == "undecodable"
    assert check_image(b"", **args)[0] == "empty_file"
    assert check_image(None, **args)[0] == "no_image"
    assert check_image(bytes(rng.randbytes(500)), **args)[0] == "undecodable"
    assert check_image(demo_shapes._huge_header_png(), **args)[0] == "too_large"
    assert check_image(png(Image.new("RGB", (2000, 2000))), **{**args, "max_pixels": 10**6})[0] == "too_large"


# ---- tokenize pieces -----------------------------------------------------------------------------------


def test_center_crop_arr_is_adm_centre_crop():
    img = Image.new("RGB", (400, 200), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 100, 200))  # a red quarter on the left is cropped away
    out = center_crop_arr(img, 64)
    assert out.size == (64, 64)
    arr = np.asarray(out)
    assert (arr[:, :, 2] > 200).all() and (arr[:, :, 0] < 50).all()
    small = center_crop_arr(Image.new("RGB", (50, 70), (10, 200, 10)), 64)  # upscales when asked to
    assert small.size == (64, 64)


def frame(images: list[bytes | None], run_dir) -> pa.Table:
    """Rows pointing at `images`, which lie in a download-like shard under `run_dir` (3 rows per row group)."""
    n = len(images)
    (run_dir / "dl").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"image": pa.array(images, pa.binary())}), run_dir / "dl/part.parquet", row_group_size=3)
    return pa.table({"key": [f"k{i}" for i in range(n)], "caption": ["c"] * n, SRC: ["s"] * n,
                     IMAGE_FILE: ["dl/part.parquet"] * n, IMAGE_ROW: pa.array(range(n), pa.int64())})


def test_fetch_reads_the_rows_asked_for_from_their_row_groups(tmp_path):
    blobs = [f"image-{i}".encode() for i in range(10)]
    t = frame(blobs, tmp_path)
    assert pq.ParquetFile(tmp_path / "dl/part.parquet").metadata.num_row_groups == 4
    want = [7, 0, 9, 3, 3, 12]  # across groups, out of order, twice, and one past the end
    got = fetch(["dl/part.parquet"] * len(want), want, tmp_path)
    assert got == [blobs[7], blobs[0], blobs[9], blobs[3], blobs[3], None]
    images, reasons, _ = open_images(t.slice(0, 2), tmp_path)
    assert images == [None, None] and reasons == ["undecodable", "undecodable"]


def test_encoder_actor_encodes_each_resolution_it_can(tmp_path):
    cfg = TokenizeConfig(tokenizer={"kind": "pixel-fsq", "levels": 10}, resolutions=[Resolution(size=64), Resolution(size=128)])
    rng = random.Random(1)
    images = [
        png(demo_shapes.draw("red", "square", "blue", 160, 128, rng)),
        png(demo_shapes.draw("red", "square", "blue", 64, 96, rng)),
        png(Image.new("RGB", (40, 40))),
        b"not an image",
    ]
    prepared = prepare_crops(frame(images, tmp_path), run=str(tmp_path), resolutions=cfg.resolutions)
    out = Encoder(cfg, cpus=1)(prepared).to_pandas()
    assert not [c for c in out.columns if c.startswith("_pixels")]
    c64, c128 = out["codes@64"], out["codes@128"]
    assert len(c64[0]) == 64 and len(c128[0]) == 256 and c64[0].dtype == np.int32
    assert len(c64[1]) == 64 and c128[1] is None
    assert list(out["reason"]) == [None, None, "below_every_resolution", "undecodable"]
    tok = load_visual_tokenizer(cfg.tokenizer)
    assert out["tokenizer"][0] == tok.name
    # codes decode back to the picture's colours: mostly the blue background
    decoded = tok.decode(np.asarray(c64[0]).reshape(1, 8, 8))
    rgb = ((decoded[0].permute(1, 2, 0) + 1) * 127.5).numpy()
    blue = np.array(demo_shapes.PALETTE["blue"])
    assert (np.abs(rgb - blue).max(axis=-1) < 20).mean() > 0.4


# ---- resumable output --------------------------------------------------------------------------------

SCHEMA = pa.schema([("key", pa.string()), ("v", pa.int32())])


def split_even_odd(rows) -> dict[str, pa.Table]:
    even = rows["v"] % 2 == 0
    rej = rows[~even].assign(reason="odd")
    return {"kept": to_arrow(rows[even], SCHEMA), "rejected": to_arrow(rej, pa.schema([("key", pa.string()), ("reason", pa.string())]))}


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_write_parts_then_resume_keeps_finished_sources_only(tmp_path, backend, request):
    from simplear.storage import open_store

    run = str(tmp_path) if backend == "local" else request.getfixturevalue("s3_server").bucket("parts") + "/run"
    store, stage = open_store(run), "s"
    sources = [Source("a", "a.parquet", 4), Source("b", "b.parquet", 4)]
    batch = pd.DataFrame({"key": ["a0", "a1", "b0", "b1"], "v": [0, 1, 2, 3], SRC: ["a", "a", "b", "b"]})
    summary = write_parts(batch, run=run, stage=stage, split=split_even_odd)
    assert summary["rows"] == [2, 2]
    write_parts(pd.DataFrame({"key": ["a2", "a3"], "v": [4, 6], SRC: ["a", "a"]}), run=run, stage=stage, split=split_even_odd)
    # a retry of the same block rewrites the same files: no duplicate
    write_parts(pd.DataFrame({"key": ["a2", "a3"], "v": [4, 6], SRC: ["a", "a"]}), run=run, stage=stage, split=split_even_odd)
    store.write("s/kept/.tmp-part-b-x.parquet-1-ab", b"half")  # a killed write
    store.write("s/kept/part-b-orphan.parquet", b"no receipt")
    todo = resume(store, stage, sources, ["kept", "rejected"])
    assert [s.id for s in todo] == ["b"]  # b has 2 of its 4 rows
    files = [i.key for i in store.list(stage) if i.key.endswith(".parquet")]
    assert files == ["s/kept/part-a-a0.parquet", "s/kept/part-a-a2.parquet", "s/rejected/part-a-a0.parquet"]
    assert not list(store.list(f"s/{RECEIPTS}/b"))
    fs, root = store.filesystem()
    keys = pq.read_table([f"{root}/{f}" for f in files if "/kept/" in f], filesystem=fs).column("key").to_pylist()
    assert sorted(keys) == ["a0", "a2", "a3"]
    t = totals(read_receipts(store, stage))
    assert t == {"rows_in": 4, "rows_out": {"kept": 3, "rejected": 1}, "by_reason": {"odd": 1}}
    with pytest.raises(RuntimeError, match=r"b: 0 of 4 rows"):
        check_complete(read_receipts(store, stage), sources, "t")
    receipt = store.read_json(f"s/{RECEIPTS}/a/part-a-a0.json")
    assert receipt["files"] == ["kept/part-a-a0.parquet", "rejected/part-a-a0.parquet"]


def test_to_arrow_turns_every_missing_value_into_null():
    df = pd.DataFrame({"key": ["x", "y", "z"], "v": [1.0, float("nan"), 3.0]})
    df["w"] = pd.array([1, None, 2], dtype="Int64")
    schema = pa.schema([("key", pa.string()), ("v", pa.int32()), ("w", pa.int32()), ("absent", pa.string())])
    t = to_arrow(df, schema)
    assert t.schema == schema
    assert t.column("v").to_pylist() == [1, None, 3] and t.column("w").to_pylist() == [1, None, 2]
    assert t.column("absent").null_count == 3


# ---- recaption engine (transformers) on the tiny model -------------------------------------------------


def test_tiny_qwen2vl_is_a_checkpoint_and_captions_through_transformers(tmp_path, monkeypatch):
    from transformers import AutoConfig

    from pipelines.recaption import Recaptioner, RecaptionConfig, TinyQwen2VL, build_tiny_qwen2vl, prepare_images

    spec = TinyQwen2VL()
    a, b = build_tiny_qwen2vl(tmp_path / "a", spec), build_tiny_qwen2vl(tmp_path / "b", spec)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    config = AutoConfig.from_pretrained(a)
    assert config.model_type == "qwen2_vl" and config.text_config.hidden_size // config.text_config.num_attention_heads >= 32
    cfg = RecaptionConfig(model="tiny-random", tiny={}, engine="transformers", max_new_tokens_long=5, max_new_tokens_short=3, max_pixels=50176)
    rng = random.Random(2)
    images = [png(demo_shapes.draw("green", "cross", "white", 64 + 32 * i, 64, rng)) for i in range(3)] + [b"broken"]
    prepared = prepare_images(frame(images, tmp_path), run=str(tmp_path), min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
    assert [w % 28 for w in prepared["_pixels_w"].to_pylist()[:3]] == [0, 0, 0]  # resized for the model in the reader
    monkeypatch.setenv("SIMPLEAR_STAGING_DIR", str(tmp_path / "staging"))  # where each actor builds the tiny model
    out = Recaptioner(cfg, cpus=1)(prepared).to_pandas()
    assert len(list((tmp_path / "staging").glob("tiny-qwen2vl-*/model.safetensors"))) == 1
    assert list(out["reason"]) == [None, None, None, "undecodable"]
    assert all(isinstance(t, str) for t in out["caption_long"][:3]) and out["caption_long"][3] is None
    assert set(out["caption_model"]) == {"tiny-random"}
    # the same model and inputs give the same captions (greedy decoding)
    again = Recaptioner(cfg, cpus=1)(prepared).to_pandas()
    assert list(again["caption_long"][:3]) == list(out["caption_long"][:3])


def test_tiny_spec_rejects_head_dims_vllm_cannot_run():
    from pydantic import ValidationError

    from pipelines.recaption import TinyQwen2VL

    with pytest.raises(ValidationError, match="must be a whole multiple of 4 and >= 32"):
        TinyQwen2VL(hidden_size=64, num_attention_heads=4)




def test_describe_outputs_uses_the_entries_tasks_recorded_and_rereads_a_changed_file(tmp_path):
    from simplear.storage.local import LocalStore
    from simplear.workflow.manifest import describe_outputs, sha256_file

    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "a.bin").write_bytes(b"abc")
    (tmp_path / "shards" / "b.bin").write_bytes(b"defg")
    known = {"shards/a.bin": {"path": "shards/a.bin", "bytes": 3, "sha256": "from-the-task"},
             "shards/b.bin": {"path": "shards/b.bin", "bytes": 99, "sha256": "stale"}}
    out = {o["path"]: o for o in describe_outputs(LocalStore(tmp_path.parent), tmp_path.name, known=known)}
    assert out["shards/a.bin"]["sha256"] == "from-the-task"  # not read again
    assert out["shards/b.bin"]["sha256"] == sha256_file(tmp_path / "shards" / "b.bin")  # its size changed: read


def test_each_source_is_one_task_and_concurrency_is_honoured(ray_session, tmp_path):
    """Ray Data would fuse a one-file read with a batch_size=B step into tasks of B sources; here 6 sources
    with batch_size 4 are 6 tasks (read back from the receipts), at most `concurrency` of them at a time."""
    import pyarrow as pa

    from pipelines.resumable_parquet import SplitByReason, read_receipts, run_stage
    from pipelines_support import stage_context, write_input_stage

    schema = pa.schema([("key", pa.string()), ("reason", pa.string())])
    write_input_stage(tmp_path, "src", [{"key": [f"s{i}-{j:03d}" for j in range(10)], "reason": [None] * 10} for i in range(6)], schema)
    ctx = stage_context(tmp_path, "t", "filter", None, ["src"], cpus=0.5, concurrency=2)
    from conftest import wait_for_ray_data_to_own_the_cluster
    from pipelines_support import slow_identity

    # a driver an earlier test killed may still hold a share of the cluster; then tasks would run one by one
    cpus = wait_for_ray_data_to_own_the_cluster()

    result = run_stage(ctx, folders=["shards", "rejected"], split=SplitByReason(schema, schema), process=slow_identity,
                       process_kwargs={"seconds": 0.4}, batch_size=4)
    assert result.metrics["rows_out"] == {"rejected": 0, "shards": 60}
    receipts = [d for recs in read_receipts(ctx.store, ctx.name).values() for _, d in recs]
    assert len(receipts) == 18  # 3 blocks of at most 4 rows per source
    tasks: dict[tuple, list[dict]] = {}  # by call: an actor's calls share its task id, each has its start
    for d in receipts:
        tasks.setdefault((d["task"], d["started"]), []).append(d)
    assert len(tasks) == 6 and all(len({d["source"] for d in ds}) == 1 for ds in tasks.values())
    spans = [(min(d["started"] for d in ds), max(d["at"] for d in ds)) for ds in tasks.values()]
    overlap = max(sum(s <= t < e for s, e in spans) for t, _ in spans)
    assert overlap == 2, (f"Ray Data could reserve {cpus} CPUs at the start", spans)


def test_long_and_short_prompts_in_one_call_give_what_two_calls_give(tmp_path):
    from pipelines.recaption import RecaptionConfig, TinyQwen2VL, TransformersEngine, build_tiny_qwen2vl

    model = build_tiny_qwen2vl(tmp_path / "m", TinyQwen2VL())
    cfg = RecaptionConfig(model="tiny-random", tiny={}, engine="transformers", max_pixels=50176)
    engine = TransformersEngine(str(model), cfg, cpus=1)
    rng = random.Random(3)
    from PIL import Image

    images = [Image.open(io.BytesIO(png(demo_shapes.draw("red", "circle", "blue", 64, 64 + 16 * i, rng)))).convert("RGB")
              for i in range(2)]
    together = engine.generate([(im, "describe", 6) for im in images] + [(im, "briefly", 3) for im in images])
    apart = engine.generate([(im, "describe", 6) for im in images]) + engine.generate([(im, "briefly", 3) for im in images])
    assert together == apart and together[0] != together[2]


class _Engine:
    """Stands in for a model engine: fails on the rows whose long prompt image is marked, or on every row."""

    def __init__(self, fail_all: bool = False, bad_widths: tuple = ()):
        self.fail_all, self.bad_widths = fail_all, bad_widths

    def generate(self, requests):
        if self.fail_all or any(im.size[0] in self.bad_widths for im, _, _ in requests):
            raise RuntimeError("CUDA out of memory" if self.fail_all else "this image breaks the engine")
        return [f"{p} {im.size[0]}" for im, p, _ in requests]


def _recaptioner(engine, **cfg):
    from pipelines.recaption import Recaptioner, RecaptionConfig

    r = Recaptioner.__new__(Recaptioner)
    r.engine, r.writer = engine, None
    r.cfg = RecaptionConfig(model="tiny-random", tiny={}, engine="transformers", batch_size=4, **cfg)
    return r


def test_an_engine_that_fails_fails_the_part_instead_of_rejecting_its_rows(tmp_path):
    from pipelines.recaption import prepare_images

    rng = random.Random(4)
    images = [png(demo_shapes.draw("red", "circle", "blue", 64 + 28 * i, 64, rng)) for i in range(10)]
    rows = prepare_images(frame(images, tmp_path), run=str(tmp_path), min_pixels=28 * 28, max_pixels=10**6)
    with pytest.raises(RuntimeError, match="failed on every row of a batch"):
        _recaptioner(_Engine(fail_all=True))(rows)
    with pytest.raises(RuntimeError, match="failed on 1 of 10 rows"):
        _recaptioner(_Engine(bad_widths=(84,)))(rows)  # 10% > the default 5%
    out = _recaptioner(_Engine(bad_widths=(84,)), max_reject_ratio=0.2)(rows).to_pandas()
    assert list(out["reason"]).count("recaption_error") == 1 and out["caption_short"][0].endswith(" 56")  # resized to 28s
