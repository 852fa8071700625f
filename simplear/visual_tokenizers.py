"""Visual tokenizers behind one interface: images in [-1, 1] <-> integer codes (B, H/d, W/d).

- `cosmos`: NVIDIA Cosmos discrete tokenizers released as TorchScript `encoder.jit`/`decoder.jit`
  (DI16x16 for images; DV8x16x16 for video, used with T=1 like the SimpleAR reference code).
- `pixel-fsq`: the project's weight-free tokenizer: average-pool by `downsample`, quantize each
  RGB channel to `levels` values; code = r*L^2 + g*L + b, so L = 40 gives Cosmos' 64,000 codes.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import warnings
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pydantic import Field, model_validator

from simplear.config import StrictModel
from simplear.devices import resolve_device

log = logging.getLogger("simplear.visual_tokenizers")

COSMOS_CODEBOOK = 64_000  # FSQ levels (8, 8, 8, 5, 5, 5)


class VisualTokenizerConfig(StrictModel):
    kind: Literal["pixel-fsq", "cosmos"] = "pixel-fsq"
    levels: int = 40  # pixel-fsq: values per RGB channel -> levels**3 codes
    downsample: int | None = None  # pixels per code side; default 8 (pixel-fsq) or 16 (cosmos)
    path: str | None = None  # cosmos: folder holding encoder.jit and decoder.jit
    temporal: bool | None = None  # cosmos: video tokenizer (B,3,T,H,W) used with T=1; default: "DV" in the folder name
    codebook_size: int | None = None  # cosmos: default 64,000; pixel-fsq: always levels**3
    device: str = "auto"  # "auto": cuda when available, else cpu
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # "auto": bf16 on cuda, fp32 on cpu
    sha256: str | None = Field(None, exclude_if=lambda v: v is None,  # absent from configs that do not set it
                               description="cosmos: the digest of encoder.jit + decoder.jit a checkpoint was trained "
                                           "with (save_checkpoint records it); other files under the path are refused")

    @model_validator(mode="after")
    def _resolve(self):
        if self.kind == "pixel-fsq":
            if not 2 <= self.levels <= 256:
                raise ValueError(f"levels must be in [2, 256], got {self.levels}")
            if self.codebook_size is not None and self.codebook_size != self.levels**3:
                raise ValueError(f"codebook_size {self.codebook_size} != levels**3 = {self.levels**3} for pixel-fsq")
            self.codebook_size = self.levels**3
            self.downsample = self.downsample or 8
        else:
            if not self.path:
                raise ValueError("path is required for kind 'cosmos' (a folder with encoder.jit and decoder.jit)")
            self.codebook_size = self.codebook_size or COSMOS_CODEBOOK
            self.downsample = self.downsample or 16
            if self.temporal is None:
                self.temporal = "DV" in Path(self.path).name.upper()
        if self.downsample < 1:
            raise ValueError(f"downsample must be >= 1, got {self.downsample}")
        return self


@runtime_checkable
class VisualTokenizer(Protocol):
    name: str
    codebook_size: int
    downsample: int
    config: VisualTokenizerConfig

    def encode(self, images_BCHW: torch.Tensor) -> torch.Tensor: ...

    def decode(self, codes_BHW: torch.Tensor) -> torch.Tensor: ...


# Images of 1024x1024 per decoder call (more of smaller ones, in proportion to their pixels): Cosmos DV8x16x16's
# decoder holds roughly 0.3-0.5 GiB of activations per 1024x1024 image (estimated from its layout), so 8 stay within
# ~4 GiB, beside a vLLM holding 0.9 of an 80 GB GPU. Serve and eval take `decode_batch`, `simplear generate` a flag.
DECODE_BATCH = 8
_DECODE_PIXELS = 1024 * 1024


class ChunkedDecode:
    """`decode` in bounded calls, whoever asks (serve's batches of up to max_batch_size x max_n images, eval's
    batches, GRPO's groups, `generate -n`): each call decodes at most `images_per_call` images and its result goes to
    the host before the next, so the device holds one chunk's activations and pixels at a time."""

    decode_batch: int = DECODE_BATCH
    downsample: int

    def images_per_call(self, h: int, w: int) -> int:
        return max(1, self.decode_batch * _DECODE_PIXELS // (h * w * self.downsample**2))

    @torch.no_grad()
    def decode(self, codes_BHW: torch.Tensor) -> torch.Tensor:
        """(B, h, w) codes -> (B, 3, H, W) float32 images in [-1, 1], on the host."""
        codes = torch.as_tensor(codes_BHW).long()
        if codes.ndim != 3:
            raise ValueError(f"expected codes of shape (B, h, w), got {tuple(codes.shape)}")
        B, h, w = codes.shape
        if B == 0:
            return torch.empty((0, 3, h * self.downsample, w * self.downsample))
        n = self.images_per_call(h, w)
        return torch.cat([self._decode(codes[i: i + n]).float().cpu() for i in range(0, B, n)])

    def _decode(self, codes_BHW: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def _check_images(images: torch.Tensor, downsample: int) -> None:
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
    H, W = images.shape[-2:]
    if H % downsample or W % downsample:
        raise ValueError(f"image size {H}x{W} is not a multiple of the tokenizer's downsample {downsample}")


class PixelFSQTokenizer(ChunkedDecode):
    """Weight-free: each code is the quantized mean colour of a downsample x downsample block."""

    def __init__(self, config: VisualTokenizerConfig):
        self.config = config
        self.levels = config.levels
        self.downsample = config.downsample
        self.codebook_size = config.codebook_size
        self.name = f"pixel-fsq-L{self.levels}-d{self.downsample}"

    @torch.no_grad()
    def encode(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        _check_images(images_BCHW, self.downsample)
        pooled = F.avg_pool2d(images_BCHW.float(), self.downsample)
        L = self.levels
        q = torch.round((pooled.clamp(-1, 1) + 1) / 2 * (L - 1)).long()  # (B, 3, h, w) in [0, L-1]
        return q[:, 0] * L * L + q[:, 1] * L + q[:, 2]

    def _decode(self, codes: torch.Tensor) -> torch.Tensor:
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.codebook_size):
            raise ValueError(f"codes out of range [0, {self.codebook_size})")
        L = self.levels
        q = torch.stack([codes // (L * L), (codes // L) % L, codes % L], dim=1).float()
        img = q / (L - 1) * 2 - 1
        return img.repeat_interleave(self.downsample, dim=2).repeat_interleave(self.downsample, dim=3)


COSMOS_FILES = ("encoder.jit", "decoder.jit")


def cosmos_digest(folder: str | Path) -> str:
    """What a Cosmos tokenizer is: the sha256 of its two TorchScript files (a DI16x16 and a DV8x16x16 both have
    64,000 codes, and one decodes the other's codes into other images). Hashed once per process and file state:
    every checkpoint save records it."""
    files = [Path(folder) / name for name in COSMOS_FILES]
    return _digest(tuple(str(f) for f in files), tuple((f.stat().st_size, f.stat().st_mtime_ns) for f in files))


@functools.lru_cache(maxsize=8)
def _digest(files: tuple[str, ...], _state: tuple) -> str:
    h = hashlib.sha256()
    for name in files:
        with open(name, "rb") as f:
            while block := f.read(1 << 22):
                h.update(block)
    return h.hexdigest()


class CosmosTokenizer(ChunkedDecode):
    """Cosmos discrete tokenizer from TorchScript files (NVIDIA's releases: `encoder.jit` maps (B, 3, [1,] H, W)
    in [-1, 1] to (indices, codes), `decoder.jit` maps indices back). A JIT that casts to bf16 inside (as the
    reference code's loader does) fails in fp32 on a CPU: it is then run in bf16, with a warning."""

    def __init__(self, config: VisualTokenizerConfig):
        self.config = config
        folder = Path(config.path)
        enc, dec = (folder / n for n in COSMOS_FILES)
        missing = [str(p) for p in (enc, dec) if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"cosmos tokenizer folder {folder} lacks {', '.join(missing)}")
        if config.sha256:
            found = cosmos_digest(folder)
            if found != config.sha256:
                raise ValueError(f"{folder}: its encoder.jit and decoder.jit (sha256 {found[:16]}) are not the Cosmos "
                                 f"tokenizer the checkpoint was trained with (sha256 {config.sha256[:16]}): another "
                                 "variant or release decodes its codes into other images")
        self.device = resolve_device(config.device)
        if config.dtype == "auto":
            self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        else:
            self.dtype = getattr(torch, config.dtype)
        with warnings.catch_warnings():  # torch 2.13 deprecates TorchScript; Cosmos releases nothing else
            warnings.filterwarnings("ignore", category=DeprecationWarning, message=r".*torch\.jit")
            self._encoder = torch.jit.load(str(enc), map_location=self.device).to(self.dtype).eval()
            self._decoder = torch.jit.load(str(dec), map_location=self.device).to(self.dtype).eval()
        self.codebook_size = config.codebook_size
        self.downsample = config.downsample
        self.temporal = bool(config.temporal)
        self.name = f"cosmos:{folder.name}"

    @torch.no_grad()
    def encode(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        _check_images(images_BCHW, self.downsample)
        x = images_BCHW.to(self.device, self.dtype)
        if self.temporal:
            x = x.unsqueeze(2)  # (B, 3, T=1, H, W)
        out = self._run("_encoder", x)
        indices = out[0] if isinstance(out, (tuple, list)) else out
        if self.temporal:
            indices = indices[:, 0]  # (B, t=1, h, w) -> (B, h, w)
        B, _, H, W = images_BCHW.shape
        expected = (B, H // self.downsample, W // self.downsample)
        if tuple(indices.shape) != expected:
            raise ValueError(f"{self.name}: encoder gave indices {tuple(indices.shape)}, expected {expected} (downsample {self.downsample})")
        return indices.long()

    def _decode(self, codes: torch.Tensor) -> torch.Tensor:
        codes = codes.to(self.device)
        if self.temporal:
            codes = codes.unsqueeze(1)  # (B, 1, h, w)
        img = self._run("_decoder", codes)
        if isinstance(img, (tuple, list)):
            img = img[0]
        if self.temporal:
            img = img[:, :, 0]
        return img.float().clamp(-1, 1)

    def _run(self, which: str, x: torch.Tensor):
        """One JIT call; a dtype clash of a JIT with a bf16 cast inside switches both to bf16 once."""
        try:
            return getattr(self, which)(x.to(self.dtype) if x.is_floating_point() else x)
        except RuntimeError as e:
            if self.dtype == torch.bfloat16 or "BFloat16" not in str(e):
                raise
            log.warning("%s: the TorchScript casts to bf16 inside (%s); running it in bf16", self.name, str(e).splitlines()[0])
            self.dtype = torch.bfloat16
            self._encoder, self._decoder = self._encoder.to(self.dtype), self._decoder.to(self.dtype)
            return getattr(self, which)(x.to(self.dtype) if x.is_floating_point() else x)


def load_visual_tokenizer(config: VisualTokenizerConfig | dict, device=None,
                          decode_batch: int = DECODE_BATCH) -> VisualTokenizer:
    """`device`: where a worker decodes (Cosmos runs there; the pixel tokenizer is plain tensor code on any);
    `decode_batch`: 1024x1024 images per decoder call (`ChunkedDecode`)."""
    if not isinstance(config, VisualTokenizerConfig):
        config = VisualTokenizerConfig.model_validate(config)
    if device is not None and config.kind == "cosmos":
        config = config.model_copy(update={"device": str(device)})
    tokenizer = PixelFSQTokenizer(config) if config.kind == "pixel-fsq" else CosmosTokenizer(config)
    tokenizer.decode_batch = decode_batch
    return tokenizer


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL image -> (3, H, W) float tensor in [-1, 1]."""
    arr = np.asarray(img.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1) / 127.5 - 1.0


def tensor_to_pil(t: torch.Tensor) -> Image.Image:
    """(3, H, W) tensor in [-1, 1] -> RGB PIL image."""
    if t.ndim == 4 and t.shape[0] == 1:
        t = t[0]
    arr = ((t.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return Image.fromarray(arr.permute(1, 2, 0).numpy())
