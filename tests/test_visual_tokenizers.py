"""Visual tokenizers: config rules, pixel-fsq, and the real cosmos loading path with tiny TorchScript files."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from simplear.visual_tokenizers import (
    CosmosTokenizer,
    PixelFSQTokenizer,
    VisualTokenizer,
    VisualTokenizerConfig,
    load_visual_tokenizer,
    pil_to_tensor,
    tensor_to_pil,
)

# Cosmos ships TorchScript, so this is the format to test, deprecated or not.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:DeprecationWarning")

FSQ_LEVELS = [8, 8, 8, 5, 5, 5]  # Cosmos' discrete tokenizers: 64,000 codes


class TinyCosmosEncoder(torch.nn.Module):
    """Shaped like NVIDIA's released encoder.jit: images (B,3,H,W) or videos (B,3,T,H,W) in [-1,1] ->
    (int32 indices (B,[t,]h,w), codes (B,6,[t,]h,w)) with FSQ levels (8,8,8,5,5,5); exported with torch.jit.trace
    as the releases are."""

    def __init__(self, downsample: int, temporal: bool):
        super().__init__()
        self.downsample = downsample
        self.temporal = temporal
        self.proj = torch.nn.Conv2d(3, 6, 1)
        levels = torch.tensor(FSQ_LEVELS)
        self.register_buffer("levels", levels.view(1, 6, 1, 1))
        self.register_buffer("basis", torch.cumprod(torch.tensor([1] + FSQ_LEVELS[:-1]), 0).view(1, 6, 1, 1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B = x.shape[0]
        T = 1
        if self.temporal:
            T = x.shape[2]
            x = x.permute(0, 2, 1, 3, 4).reshape(B * T, x.shape[1], x.shape[3], x.shape[4])
        z = torch.tanh(self.proj(F.avg_pool2d(x, self.downsample)))
        lv = self.levels.to(z.dtype)
        q = torch.round((z + 1) / 2 * (lv - 1))
        indices = (q.long() * self.basis).sum(1).to(torch.int32)
        codes = q / (lv - 1) * 2 - 1
        if self.temporal:
            h, w = indices.shape[-2], indices.shape[-1]
            indices = indices.reshape(B, T, h, w)
            codes = codes.reshape(B, T, 6, h, w).permute(0, 2, 1, 3, 4)
        return indices, codes


class TinyCosmosDecoder(torch.nn.Module):
    """indices (B,[t,]h,w) -> images (B,3,[T,]H,W) in [-1,1]. `bf16_cast`: the quantizer's output cast to bf16
    inside, as the reference code's loader does, which an fp32 run on a CPU cannot take."""

    def __init__(self, downsample: int, temporal: bool, bf16_cast: bool = False):
        super().__init__()
        self.downsample = downsample
        self.temporal = temporal
        self.bf16_cast = bf16_cast
        self.proj = torch.nn.Conv2d(6, 3, 1)
        self.register_buffer("levels", torch.tensor(FSQ_LEVELS).view(1, 6, 1, 1))
        self.register_buffer("basis", torch.cumprod(torch.tensor([1] + FSQ_LEVELS[:-1]), 0).view(1, 6, 1, 1))

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        B = indices.shape[0]
        T = 1
        if self.temporal:
            T = indices.shape[1]
            indices = indices.reshape(B * T, indices.shape[2], indices.shape[3])
        q = (indices.long().unsqueeze(1) // self.basis) % self.levels
        codes = (q.to(self.proj.weight.dtype) / (self.levels - 1).to(self.proj.weight.dtype)) * 2 - 1
        if self.bf16_cast:
            codes = codes.to(torch.bfloat16)
        img = torch.tanh(self.proj(codes))
        img = F.interpolate(img, scale_factor=float(self.downsample), mode="nearest")
        if self.temporal:
            img = img.reshape(B, T, 3, img.shape[-2], img.shape[-1]).permute(0, 2, 1, 3, 4)
        return img


def write_tiny_cosmos(folder: Path, downsample: int = 16, temporal: bool = False, bf16_cast: bool = False,
                      seed: int = 0) -> Path:
    """Traced on one example shape, as NVIDIA exports its tokenizers; other batch sizes and image sizes still run
    (the traced graph keeps the shape arithmetic)."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    x = torch.zeros(2, 3, 1, 2 * downsample, 2 * downsample) if temporal else torch.zeros(2, 3, 2 * downsample, 2 * downsample)
    encoder = TinyCosmosEncoder(downsample, temporal).eval()
    decoder = TinyCosmosDecoder(downsample, temporal, bf16_cast).eval()
    if bf16_cast:  # such a release is exported in bf16
        decoder = decoder.to(torch.bfloat16)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python values read from tensors' shapes
        torch.jit.save(torch.jit.trace(encoder, x), str(folder / "encoder.jit"))
        torch.jit.save(torch.jit.trace(decoder, encoder(x)[0]), str(folder / "decoder.jit"))
    return folder


def images(B=2, H=64, W=48, seed=0):
    return torch.rand(B, 3, H, W, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# -- config rules -----------------------------------------------------------------------------


def test_config_defaults_and_rules():
    c = VisualTokenizerConfig(kind="pixel-fsq")
    assert (c.levels, c.downsample, c.codebook_size) == (40, 8, 64_000)  # Cosmos-sized codebook by default
    assert VisualTokenizerConfig(kind="pixel-fsq", levels=6).codebook_size == 216
    c = VisualTokenizerConfig(kind="cosmos", path="/models/Cosmos-1.0-Tokenizer-DV8x16x16")
    assert (c.downsample, c.codebook_size, c.temporal) == (16, 64_000, True)
    assert VisualTokenizerConfig(kind="cosmos", path="/models/Cosmos-Tokenizer-DI16x16").temporal is False
    with pytest.raises(ValidationError, match="path is required"):
        VisualTokenizerConfig(kind="cosmos")
    with pytest.raises(ValidationError, match="levs"):
        VisualTokenizerConfig.model_validate({"kind": "pixel-fsq", "levs": 4})  # unknown key
    with pytest.raises(ValidationError, match="levels"):
        VisualTokenizerConfig(kind="pixel-fsq", levels=1)
    with pytest.raises(ValidationError, match="codebook_size"):
        VisualTokenizerConfig(kind="pixel-fsq", levels=4, codebook_size=100)
    with pytest.raises(ValidationError):
        VisualTokenizerConfig(kind="vqgan")
    # a dumped config validates back to itself (checkpoints store it as JSON)
    assert VisualTokenizerConfig.model_validate(c.model_dump(mode="json")) == c


# -- pixel-fsq ----------------------------------------------------------------------------------


@pytest.mark.parametrize("levels,downsample", [(40, 8), (4, 8), (10, 4)])
def test_pixel_fsq_interface_and_reconstruction_bound(levels, downsample):
    tok = load_visual_tokenizer({"kind": "pixel-fsq", "levels": levels, "downsample": downsample})
    assert isinstance(tok, PixelFSQTokenizer) and isinstance(tok, VisualTokenizer)
    assert tok.codebook_size == levels**3 and tok.downsample == downsample and tok.name
    x = images()
    codes = tok.encode(x)
    assert codes.dtype == torch.long and codes.shape == (2, 64 // downsample, 48 // downsample)
    assert codes.min() >= 0 and codes.max() < tok.codebook_size
    y = tok.decode(codes)
    assert y.shape == x.shape and y.min() >= -1 and y.max() <= 1
    # the only loss besides pooling is quantization: half a step of 2/(L-1) per channel
    bound = 1.0 / (levels - 1) + 1e-5
    pooled_up = F.interpolate(F.avg_pool2d(x, downsample), scale_factor=downsample, mode="nearest")
    assert (y - pooled_up).abs().max() <= bound
    blocky = pooled_up  # an image constant on each block is reconstructed within the bound
    assert (tok.decode(tok.encode(blocky)) - blocky).abs().max() <= bound
    assert torch.equal(tok.encode(tok.decode(codes)), codes)  # decoded codes are fixed points


def test_pixel_fsq_codes_cover_the_codebook_corners():
    tok = load_visual_tokenizer({"kind": "pixel-fsq", "levels": 40})
    black, white = -torch.ones(1, 3, 8, 8), torch.ones(1, 3, 8, 8)
    assert tok.encode(black).item() == 0 and tok.encode(white).item() == 64_000 - 1
    red = torch.tensor([1.0, -1.0, -1.0]).view(1, 3, 1, 1).expand(1, 3, 8, 8)
    assert tok.encode(red).item() == 39 * 40 * 40


def test_size_not_multiple_of_downsample_is_an_error():
    tok = load_visual_tokenizer({"kind": "pixel-fsq", "levels": 4})
    with pytest.raises(ValueError, match="multiple"):
        tok.encode(torch.zeros(1, 3, 20, 16))
    with pytest.raises(ValueError, match="out of range"):
        tok.decode(torch.full((1, 2, 2), 64))


# -- cosmos (TorchScript files through the real loading path) ------------------------------------


@pytest.mark.parametrize("name,temporal", [("Cosmos-Tokenizer-DI16x16", False), ("Cosmos-1.0-Tokenizer-DV8x16x16", True)])
def test_cosmos_jit_interface(tmp_path, name, temporal):
    folder = write_tiny_cosmos(tmp_path / name, temporal=temporal)
    tok = load_visual_tokenizer({"kind": "cosmos", "path": str(folder), "device": "cpu"})
    assert isinstance(tok, CosmosTokenizer) and isinstance(tok, VisualTokenizer)
    assert tok.temporal is temporal  # inferred from the folder name
    assert (tok.codebook_size, tok.downsample) == (64_000, 16)
    x = images(B=3, H=64, W=32)
    codes = tok.encode(x)
    assert codes.dtype == torch.long and codes.shape == (3, 4, 2)
    assert codes.min() >= 0 and codes.max() < 64_000
    y = tok.decode(codes)
    assert y.shape == x.shape and y.dtype == torch.float32 and y.abs().max() <= 1
    # the loaded module is the real thing: same indices as running it directly
    torch.manual_seed(0)  # the weights write_tiny_cosmos saved
    direct = TinyCosmosEncoder(16, temporal)
    ref = direct(x.unsqueeze(2) if temporal else x)[0]
    assert ref.dtype == torch.int32  # the released interface; the project's codes are int64 from here on
    assert torch.equal(codes, (ref[:, 0] if temporal else ref).long())


def test_cosmos_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="encoder.jit"):
        load_visual_tokenizer({"kind": "cosmos", "path": str(tmp_path)})
    folder = write_tiny_cosmos(tmp_path / "DI16x16")
    tok = load_visual_tokenizer({"kind": "cosmos", "path": str(folder), "downsample": 8, "device": "cpu"})
    with pytest.raises(ValueError, match="expected"):  # a wrong downsample is caught on the first encode
        tok.encode(images(B=1, H=32, W=32))


def test_a_cosmos_jit_that_casts_to_bf16_inside_runs_in_bf16_on_a_cpu(tmp_path, caplog):
    folder = write_tiny_cosmos(tmp_path / "Cosmos-1.0-Tokenizer-DV8x16x16", temporal=True, bf16_cast=True)
    tok = load_visual_tokenizer({"kind": "cosmos", "path": str(folder), "device": "cpu"})
    assert tok.dtype == torch.float32
    codes = tok.encode(images(B=2, H=64, W=64))
    with caplog.at_level("WARNING", logger="simplear.visual_tokenizers"):
        out = tok.decode(codes)
    assert out.shape == (2, 3, 64, 64) and out.dtype == torch.float32 and tok.dtype == torch.bfloat16
    assert "casts to bf16 inside" in caplog.text
    assert tok.decode(codes).shape == (2, 3, 64, 64)  # and stays there


def test_a_checkpoint_records_its_cosmos_files_and_refuses_others(tmp_path):
    """A DI16x16 and a DV8x16x16 both have 64,000 codes: only the files' digest tells them apart. save_checkpoint
    records it; loading the tokenizer of that checkpoint from changed files is refused, naming both digests."""
    import json

    from simplear.model import save_checkpoint
    from simplear.tiny import TINY_QWEN2
    from simplear.visual_tokenizers import VisualTokenizerConfig, cosmos_digest
    from simplear.vocab import Vocabulary
    from transformers import Qwen2Config, Qwen2ForCausalLM

    folder = write_tiny_cosmos(tmp_path / "Cosmos-1.0-Tokenizer-DV8x16x16", temporal=True)
    config = VisualTokenizerConfig(kind="cosmos", path=str(folder), device="cpu")
    assert "sha256" not in config.model_dump(mode="json")  # unset: configs (and their fingerprints) as before
    vocab = Vocabulary("tiny", codebook_size=64_000)
    model = Qwen2ForCausalLM(Qwen2Config(**{**TINY_QWEN2, "num_hidden_layers": 1, "hidden_size": 32, "intermediate_size": 64,
                                            "head_dim": 8, "vocab_size": vocab.size}))
    save_checkpoint(tmp_path / "ck", model, vocab, config)
    recorded = VisualTokenizerConfig.model_validate(json.loads((tmp_path / "ck" / "simplear.json").read_text())["visual_tokenizer"])
    assert recorded.sha256 == cosmos_digest(folder)
    load_visual_tokenizer(recorded)  # the same files: fine
    write_tiny_cosmos(folder, temporal=True, seed=1)  # another tokenizer under the same folder
    with pytest.raises(ValueError, match="not the Cosmos tokenizer the checkpoint was trained with"):
        load_visual_tokenizer(recorded)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cosmos_bf16_on_gpu(tmp_path):
    folder = write_tiny_cosmos(tmp_path / "Cosmos-1.0-Tokenizer-DV8x16x16", temporal=True)
    tok = load_visual_tokenizer({"kind": "cosmos", "path": str(folder)})
    assert tok.device.type == "cuda" and tok.dtype == torch.bfloat16
    codes = tok.encode(images(B=2, H=64, W=64).cuda())
    assert codes.shape == (2, 4, 4) and codes.max() < 64_000
    assert tok.decode(codes).shape == (2, 3, 64, 64)


def test_pil_round_trip():
    from PIL import Image

    arr = torch.randint(0, 256, (12, 20, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    img = Image.fromarray(arr.numpy())
    t = pil_to_tensor(img)
    assert t.shape == (3, 12, 20) and t.min() >= -1 and t.max() <= 1
    back = tensor_to_pil(t)
    assert back.size == (20, 12) and back.mode == "RGB"
    assert torch.equal(torch.from_numpy(np.array(back)), arr)
