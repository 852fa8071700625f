"""The GPU check: what production training and sampling do on one GPU, with torch and transformers alone.

    python benchmarks/gpu_check.py [--json out.json]      # one CUDA GPU, <= 5 minutes on an H200
    python benchmarks/gpu_check.py --tiny [--json out.json]  # the same code on CPU at toy shapes (in the tests)

No Ray and no vLLM are imported (the machine this runs on may have neither). It prints one table and
writes a JSON with:
- train: a Qwen2.5-0.5B-shaped model (24 layers, hidden 896, tied embeddings) with the real joint
  vocabulary (215,672 rows), random weights, fp32 master weights under bf16 autocast, AdamW, gradient
  checkpointing and the chunked loss (`simplear.losses`), as the production profile trains: steps at
  pretrain's 8 x 1,282 and SFT's 2 x 4,354 tokens, with tokens/s, peak memory and MFU. MFU counts
  model FLOPs only, 6 * N * tokens + 12 * layers * hidden * length * tokens (attention, counted
  without the causal half), against 989 TFLOP/s (H100/H200 dense bf16); the recompute of gradient
  checkpointing and of the loss's chunks is not counted (it is work the GPU does on top).
- fsdp: the same step with the model under torch FSDP2 (`fully_shard` per decoder layer and the root)
  through `torch.distributed` at world size 1 (NCCL on GPU, gloo on CPU).
- sample: `simplear.sampler.TorchSampler` (KV cache, CFG 6.0 as served, bf16 as `dtype: auto` draws on a GPU)
  generating the 4,096 codes of a 1024 x 1024 image (64 x 64 grid), as the eval stage draws: seconds per image
  at batch 1 and 64, and each step beside its bandwidth floor: the bytes one step must read (the bf16 weights
  of the body and the head's visual rows once, plus every row's keys and values up to the step's position,
  averaged over the image) over the GPU's memory bandwidth (H100 3.35 TB/s, H200 4.8 TB/s; unknown elsewhere).
  The step is the engine's CUDA-graph replay per length bucket, grouped-query attention kept grouped.
- decode: `simplear.visual_tokenizers.ChunkedDecode` over a TorchScript module shaped like Cosmos DV8x16x16's
  decoder path (16x upsampling in convolutions from the codes' six FSQ digits), 64 images at 1024 x 1024 in calls
  of `decode_batch` (8): peak memory (the bound serve and eval rely on) and images/s.
- tokenizer: a TorchScript module shaped like Cosmos DV8x16x16's encoder path (16x downsampling in
  convolutions, FSQ levels 8,8,8,5,5,5 = 64,000 codes) encoding 1024 x 1024 images: images/s.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

PEAK_TFLOPS = 989.0  # H100 / H200 SXM dense bf16
VOCAB = 151_665 + 7 + 64_000
FULL = dict(model=dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                       num_key_value_heads=2, head_dim=64, vocab_size=VOCAB, tie_word_embeddings=True,
                       max_position_embeddings=8192, rope_theta=1_000_000.0),
            train=[(8, 1282), (2, 4354)], steps=4, warmup=2, grid=(64, 64), sample_batches=(1, 64), image=1024,
            tokenizer_batch=8, decode_images=64)
TINY = dict(model=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=1, head_dim=32, vocab_size=2_000, tie_word_embeddings=True,
                       max_position_embeddings=512),
            train=[(2, 40), (1, 72)], steps=2, warmup=1, grid=(4, 4), sample_batches=(1, 2), image=64, tokenizer_batch=2,
            decode_images=5)
BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12}  # bytes/s, SXM HBM3 / HBM3e


def bandwidth(device) -> float | None:
    name = torch.cuda.get_device_name() if device.type == "cuda" else ""
    return next((bw for key, bw in BANDWIDTH.items() if key in name), None)


def step_floor_s(model, rows: int, prompt: int, tokens: int, codebook: int, device) -> float | None:
    """Seconds a decode step cannot beat: the weights it reads (as drawn: the body, and of the embedding table and the
    LM head only the `codebook` visual rows the head scores) plus the KV cache of `rows` rows up to the step's
    position (mean over the image's steps), read once from memory at the GPU's bandwidth."""
    bw = bandwidth(device)
    if bw is None:
        return None
    c = model.config
    elem = 2 if device.type == "cuda" else 4
    tables = {id(model.get_input_embeddings().weight), id(model.get_output_embeddings().weight)}
    body = sum(p.numel() for p in model.parameters() if id(p) not in tables)
    weights = (body + codebook * c.hidden_size) * elem
    kv_per_token = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * elem
    mean_context = prompt + tokens / 2
    return (weights + rows * mean_context * kv_per_token) / bw


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_gib(device) -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None


def reset_peak(device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def build_model(spec: dict, device):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(**spec)).to(device)


def autocast(device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def train_steps(model, device, batch: int, length: int, steps: int, warmup: int) -> dict:
    """Seconds per optimizer step (after `warmup` steps) and peak memory at one micro-batch shape."""
    from simplear.losses import causal_lm_cross_entropy

    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(length)
    ids = torch.randint(0, vocab, (batch, length), generator=g).to(device)
    x = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids,
         "position_ids": torch.arange(length, device=device).expand(batch, length)}
    reset_peak(device)
    times = []
    for i in range(warmup + steps):
        sync(device)
        t0 = time.perf_counter()
        with autocast(device):
            loss = causal_lm_cross_entropy(model, x).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    del opt
    step_s = sorted(times)[len(times) // 2]
    return {"micro_batch": batch, "tokens": length, "step_s": round(step_s, 4), "tokens_per_s": round(batch * length / step_s, 1),
            "peak_memory_gib": peak_gib(device), "loss": round(loss.item(), 3)}


def mfu(model, r: dict, device) -> float | None:
    if device.type != "cuda":
        return None
    cfg = model.config
    n = sum(p.numel() for p in model.parameters())  # tied: the head counted once, as the matmul it is
    tokens = r["micro_batch"] * r["tokens"]
    flops = 6 * n * tokens + 12 * cfg.num_hidden_layers * cfg.hidden_size * r["tokens"] * tokens
    return round(flops / r["step_s"] / (PEAK_TFLOPS * 1e12), 4)


def fsdp_steps(spec: dict, device, batch: int, length: int, steps: int, warmup: int) -> dict:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        model = build_model(spec, device)
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        out = train_steps(model, device, batch, length, steps, warmup)
        out["world_size"] = dist.get_world_size()
        return out
    finally:
        dist.destroy_process_group()


def sample(model, device, grid: tuple[int, int], batches: tuple[int, ...]) -> list[dict]:
    from simplear.sampler import SamplingParams, TorchSampler
    from simplear.vocab import Vocabulary

    vocab = Vocabulary("tiny", codebook_size=64_000 if model.config.vocab_size >= VOCAB else 1_000)
    model.eval()
    sampler = TorchSampler(model.to(torch.bfloat16) if device.type == "cuda" else model, vocab)
    out = []
    for b in batches:
        prompts = [f"a red circle on a blue background {i}" for i in range(b)]
        sampler.generate_codes(prompts[:1], (2, 2), SamplingParams(cfg_scale=6.0, seed=0))  # warm
        sync(device)
        t0 = time.perf_counter()
        codes = sampler.generate_codes(prompts, grid, SamplingParams(cfg_scale=6.0, seed=0))
        sync(device)
        s = time.perf_counter() - t0
        assert codes.shape == (b, *grid)
        N = grid[0] * grid[1]
        floor = step_floor_s(sampler.model, 2 * b, len(vocab.prompt_ids(prompts[0])), N, vocab.codebook_size,
                             device)
        out.append({"batch": b, "tokens_per_image": N, "seconds": round(s, 2), "s_per_image": round(s / b, 3),
                    "step_ms": round(1000 * s / N, 3), "floor_step_ms": None if floor is None else round(1000 * floor, 3)})
    return out


class CosmosShapedDecoder(torch.nn.Module):
    """Codes -> their six FSQ digits -> 16x upsampling in four stages of 2x nearest + convolutions -> RGB."""

    def __init__(self, width: int = 128):
        super().__init__()
        chans = [6, 4 * width, 4 * width, 2 * width, width]
        layers: list[torch.nn.Module] = []
        for a, b in zip(chans, chans[1:]):
            layers += [torch.nn.Upsample(scale_factor=2.0, mode="nearest"), torch.nn.Conv2d(a, b, 3, padding=1),
                       torch.nn.SiLU(), torch.nn.Conv2d(b, b, 3, padding=1), torch.nn.SiLU()]
        layers.append(torch.nn.Conv2d(width, 3, 3, padding=1))
        self.net = torch.nn.Sequential(*layers)
        self.register_buffer("basis", torch.tensor([1, 8, 64, 512, 2560, 12800]))
        self.register_buffer("levels", torch.tensor([8, 8, 8, 5, 5, 5]))

    def forward(self, codes):
        digits = (codes[:, None] // self.basis.view(1, 6, 1, 1)) % self.levels.view(1, 6, 1, 1)
        x = digits.to(self.net[1].weight.dtype) / (self.levels.view(1, 6, 1, 1) - 1) * 2 - 1
        return torch.tanh(self.net(x))


def decode_memory(device, image: int, images: int, width: int) -> dict:
    """`images` decoded at `image` px through `ChunkedDecode` (decode_batch 8 at 1024^2): peak memory, images/s."""
    from simplear.visual_tokenizers import DECODE_BATCH, ChunkedDecode

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    net = torch.jit.script(CosmosShapedDecoder(width).to(device, dtype).eval())

    class Decoder(ChunkedDecode):
        downsample = 16

        def _decode(self, codes):
            return net(codes.to(device))

    dec, h = Decoder(), image // 16
    codes = torch.randint(0, 64_000, (images, h, h))
    with torch.inference_mode():
        dec.decode(codes[:1])
        sync(device)
        reset_peak(device)
        t0 = time.perf_counter()
        out = dec.decode(codes)
        sync(device)
    s = time.perf_counter() - t0
    assert out.shape == (images, 3, image, image) and out.device.type == "cpu"
    return {"image": image, "images": images, "decode_batch": DECODE_BATCH, "images_per_call": dec.images_per_call(h, h),
            "images_per_s": round(images / s, 2), "peak_memory_gib": peak_gib(device)}


class CosmosShapedEncoder(torch.nn.Module):
    """16x downsampling in four stride-2 stages to 6 channels, FSQ-rounded to levels 8,8,8,5,5,5 = 64,000 codes."""

    def __init__(self, width: int = 128):
        super().__init__()
        chans = [3, width, 2 * width, 4 * width, 4 * width]
        layers: list[torch.nn.Module] = []
        for a, b in zip(chans, chans[1:]):
            layers += [torch.nn.Conv2d(a, b, 3, stride=2, padding=1), torch.nn.SiLU(), torch.nn.Conv2d(b, b, 3, padding=1), torch.nn.SiLU()]
        layers.append(torch.nn.Conv2d(chans[-1], 6, 1))
        self.net = torch.nn.Sequential(*layers)
        self.register_buffer("levels", torch.tensor([8, 8, 8, 5, 5, 5]))
        self.register_buffer("basis", torch.tensor([1, 8, 64, 512, 2560, 12800]))

    def forward(self, x):
        z = torch.tanh(self.net(x).float())  # (B, 6, H/16, W/16) in (-1, 1)
        half = (self.levels - 1).view(1, 6, 1, 1) / 2.0
        digits = torch.round((z + 1) * half).long()  # 0 .. level-1
        return (digits * self.basis.view(1, 6, 1, 1)).sum(1)  # (B, H/16, W/16) codes in [0, 64000)


def tokenizer_throughput(device, image: int, batch: int, width: int) -> dict:
    enc = torch.jit.script(CosmosShapedEncoder(width).to(device).eval())
    x = torch.rand(batch, 3, image, image, device=device) * 2 - 1
    with torch.inference_mode(), autocast(device):
        codes = enc(x)
        sync(device)
        t0 = time.perf_counter()
        reps = 5
        for _ in range(reps):
            codes = enc(x)
        sync(device)
    s = (time.perf_counter() - t0) / reps
    assert codes.shape == (batch, image // 16, image // 16) and int(codes.max()) < 64_000
    return {"image": image, "batch": batch, "images_per_s": round(batch / s, 2), "codes_per_image": (image // 16) ** 2}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="toy shapes on CPU (what the test suite runs)")
    ap.add_argument("--json")
    args = ap.parse_args()
    spec = TINY if args.tiny else FULL
    if not args.tiny and not torch.cuda.is_available():
        print("no CUDA GPU: run with --tiny for the CPU rehearsal", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.tiny else "cuda")
    t_all = time.perf_counter()
    result: dict = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
                    "tiny": args.tiny, "peak_tflops": PEAK_TFLOPS, "train": [], "recompute_counted_in_mfu": False}
    import transformers

    result["transformers"] = transformers.__version__
    model = build_model(spec["model"], device)
    result["params"] = sum(p.numel() for p in model.parameters())
    for b, length in spec["train"]:
        r = train_steps(model, device, b, length, spec["steps"], spec["warmup"])
        r["mfu"] = mfu(model, r, device)
        result["train"].append(r)
    del model
    reset_peak(device)
    b, length = spec["train"][0]
    result["fsdp"] = fsdp_steps(spec["model"], device, b, length, spec["steps"], spec["warmup"])
    reset_peak(device)
    result["sample"] = sample(build_model(spec["model"], device), device, spec["grid"], spec["sample_batches"])
    result["tokenizer"] = tokenizer_throughput(device, spec["image"], spec["tokenizer_batch"], 16 if args.tiny else 128)
    reset_peak(device)
    result["decode"] = decode_memory(device, spec["image"], spec["decode_images"], 16 if args.tiny else 128)
    result["imports"] = sorted(m for m in ("ray", "vllm") if m in sys.modules)
    result["seconds"] = round(time.perf_counter() - t_all, 1)

    rows = [("what", "shape", "figure")]
    for r in result["train"]:
        rows.append(("train step (ckpt, chunked loss)", f"{r['micro_batch']} x {r['tokens']}",
                     f"{r['tokens_per_s']:.0f} tok/s, {r['step_s']} s, peak {r['peak_memory_gib']} GiB, MFU {r['mfu']}"))
    f = result["fsdp"]
    rows.append(("FSDP2 step, world 1", f"{f['micro_batch']} x {f['tokens']}", f"{f['tokens_per_s']:.0f} tok/s, peak {f['peak_memory_gib']} GiB"))
    for r in result["sample"]:
        rows.append(("sample, CFG 6, KV cache", f"batch {r['batch']}, {r['tokens_per_image']} tok",
                     f"{r['s_per_image']} s per image, {r['step_ms']} ms a step (floor {r['floor_step_ms']} ms)"))
    t = result["tokenizer"]
    rows.append(("Cosmos-shaped encode", f"{t['batch']} x {t['image']}^2", f"{t['images_per_s']} images/s"))
    d = result["decode"]
    rows.append(("Cosmos-shaped decode, chunked", f"{d['images']} x {d['image']}^2, {d['images_per_call']} a call",
                 f"{d['images_per_s']} images/s, peak {d['peak_memory_gib']} GiB"))
    width = [max(len(str(r[i])) for r in rows) for i in range(3)]
    for r in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, width)))
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
