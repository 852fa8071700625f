"""The model's rows on a preallocated KV cache: prompts, then what each row accepts, with no host round trip per step.

Every engine step is a forward of T new tokens per row (1 for plain decoding, the window for speculative Jacobi
decoding) on transformers' static cache layers (`StaticLayer`) sized for the whole image, so nothing grows or is
copied as an image is decoded, and the attention mask, the positions and the cache's write slot are device tensors
computed from two per-row vectors (where a row starts, how many slots it holds): no step reads anything back to the
host. Attention covers only the slots in use: exactly while uncaptured, and to the end of the current length bucket
when the one-token step is replayed from recorded graphs (`capture`: CUDA graphs, one per bucket of `bucket` slots,
since a graph's shapes are fixed). Grouped-query attention stays grouped (`drawing`): a step's query heads are
folded onto their key/value head, so no step copies the cache's keys and values per query head as transformers'
SDPA path does under a mask.

Slots are shared: a forward writes every row's T tokens at the same slots (the cache's write slot), after the longest
row. A row that keeps fewer than T of them (rejected drafts) or lags the longest has its kept keys and values moved
down to its own length (`keep`): a row's tokens are always the slots [start, length), whatever the other rows did.
Keys carry their position (RoPE of the row's own position ids), so a moved key is the same key.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.cache_utils import Cache, StaticLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

GROUPED_SDPA = "simplear_grouped_sdpa"
STEP_TOKENS = 32  # forwards of at most this many tokens per row fold their query heads: steps, not prefills


def grouped_sdpa(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                 **kwargs):
    """SDPA for a step of T <= STEP_TOKENS tokens under a mask, the g query heads of each key/value head folded into
    its query length: (R, Hk * g, T, D) -> (R, Hk, g * T, D) against the cache's (R, Hk, S, D) as they are. With a
    mask, transformers' SDPA path copies every key and value g times (`repeat_kv`; CUDA's SDPA has no masked GQA
    kernel); folded, each key is read once for its g heads. Anything else (a prefill, no mask, training's dropout)
    goes to transformers' SDPA."""
    groups = getattr(module, "num_key_value_groups", 1)
    R, H, T, D = query.shape
    if groups == 1 or attention_mask is None or dropout or T > STEP_TOKENS or attention_mask.dim() != 4 \
            or attention_mask.shape[1] != 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    Hk, S = key.shape[1], key.shape[2]
    mask = attention_mask.expand(R, 1, T, S)
    if T > 1:  # query row j * T + t of a key/value head is head j's token t: it sees what token t sees
        mask = mask[:, :, None].expand(R, 1, groups, T, S).reshape(R, 1, groups * T, S)
    out = F.scaled_dot_product_attention(query.reshape(R, Hk, groups * T, D), key, value, attn_mask=mask, scale=scaling)
    return out.reshape(R, H, T, D).transpose(1, 2).contiguous(), None


AttentionInterface.register(GROUPED_SDPA, grouped_sdpa)
AttentionMaskInterface.register(GROUPED_SDPA, sdpa_mask)  # the masks are SDPA's (the engines build them 4-D anyway)


@contextmanager
def drawing(model):
    """The model as the engines draw with it: in eval mode, with `grouped_sdpa`; both restored after (GRPO trains the
    same model with transformers' SDPA)."""
    was_training, attention = model.training, model.config._attn_implementation
    model.eval()
    model.set_attn_implementation(GROUPED_SDPA)
    try:
        yield model
    finally:
        model.set_attn_implementation(attention)
        model.train(was_training)


class _InUseLayer(StaticLayer):
    """transformers' static cache layer handing attention only its first `in_use` slots: with the full length, every
    step would also copy (GQA's repeat_kv) and score the slots no row has reached yet."""

    in_use = 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        return keys[:, :, : self.in_use], values[:, :, : self.in_use]


class VisualHead:
    """hidden (..., H) -> logits (..., K) over the visual ids: the LM head's visual rows only (text ids are never scored).

    On CPU a GEMM reads the (K, H) rows at memory speed only for several hidden rows, while a single row (a GEMV) reads
    them 3x slower than an (H, K) copy does (64,000 x 128 fp32 on the 2-core machine: one row 3.0 ms from (K, H), 0.98 ms
    from (H, K); two rows 1.25 ms from (K, H), 2.05 ms from (H, K)): on CPU both are kept and each matmul takes the one
    for its row count. cuBLAS reads either at memory speed, so the GPU keeps the weight alone. Both are the weight's own
    dtype, so the sampler's log-probs have the precision of GRPO's recomputed ones (`simplear.grpo.logps`).
    """

    def __init__(self, model, vocab, every_id: bool = False):
        vo, K = (0, vocab.size) if every_id else (vocab.visual_offset, vocab.codebook_size)  # every_id: the reference mode
        self.w_KH = model.get_output_embeddings().weight[vo: vo + K]  # made per generation: never stale after a GRPO step
        self.w_HK = self.w_KH.T.contiguous() if self.w_KH.device.type == "cpu" else None

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        x = hidden.reshape(-1, hidden.shape[-1])
        if self.w_HK is None:
            out = x @ self.w_KH.T
        elif len(x) == 1:
            out = x @ self.w_HK
        else:
            out = (self.w_KH @ x.T).T
        return out.reshape(*hidden.shape[:-1], out.shape[-1])


class CudaGraphs:
    """Records the one-token step as CUDA graphs sharing one memory pool (they are replayed one at a time, in the order
    of their lengths, which is the order they were recorded in). `bucket`: slots per length bucket; at 512, a 1024 px
    image (4,096 codes after its prompt) records 9 graphs and attends on average to ~256 slots past the ones in use,
    where a single graph over the whole cache would attend to all ~4,200 at every step (twice the in-use mean)."""

    def __init__(self, device, bucket: int = 512):
        self.device, self.bucket, self.pool = torch.device(device), bucket, None

    def warm_up(self, run) -> None:
        """One run outside any graph, on a side stream as CUDA graphs ask (lazy cuBLAS / kernel set-up happens here)."""
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            run()
        torch.cuda.current_stream(self.device).wait_stream(side)

    def record(self, run):
        """A replay function returning `run`'s output, recomputed from the current contents of its input buffers."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = run()
        self.pool = graph.pool()

        def replay() -> torch.Tensor:
            graph.replay()
            return out

        return replay


class KVRows:
    """Left-padded prompts in slots [start, L), then each row's kept tokens; `capacity` slots for them after the prompts.

    `use_cache=False` (the benchmark's baseline) keeps no cache and runs every slot again at each forward. Build and
    run rows inside `drawing(model)`."""

    def __init__(self, model, head: VisualHead, prompts: list[list[int]], pad_id: int, capacity: int,
                 use_cache: bool = True):
        assert model.config._attn_implementation == GROUPED_SDPA, "rows run inside `drawing` (SDPA's masks, GQA kept)"
        self.body, self.head = model.base_model, head
        dev = head.w_KH.device
        R, L = len(prompts), max(len(p) for p in prompts)
        S = L + capacity
        self.ids = torch.full((R, S), pad_id, dtype=torch.long, device=dev)
        for i, p in enumerate(prompts):
            self.ids[i, L - len(p): L] = torch.tensor(p, dtype=torch.long, device=dev)
        self.slots = torch.arange(S, device=dev)
        self.start = torch.tensor([L - len(p) for p in prompts], device=dev)
        self.length = torch.full((R,), L, device=dev)
        self.first: int | torch.Tensor = L  # the next forward's first slot: after the longest row (an int while level)
        self.fed = 0  # tokens per row the last forward wrote
        self.cache = Cache(layers=[_InUseLayer(S) for _ in range(model.config.num_hidden_layers)]) if use_cache else None
        self.graphs: dict[int, tuple[torch.Tensor, object]] | None = None  # bucket end -> (its mask input, replay)
        self.bucket = 0

    def _visible(self, first, T: int, kv: int, lengths: torch.Tensor) -> torch.Tensor:
        """(R, 1, T, kv) SDPA mask: query i (slot first + i) sees its row's tokens (start <= j < length) and the slots
        of this forward up to its own (first <= j <= first + i); never left padding, nor slots a row rolled back."""
        j = self.slots[:kv]
        q = first + torch.arange(T, device=j.device)
        own = (j >= self.start[:, None]) & (j < lengths[:, None])
        new = (j >= first) & (j <= q[:, None])
        return ((own[:, None] | new) & (j >= self.start[:, None])[:, None])[:, None]

    def _run(self, ids, mask, pos, scored: int) -> torch.Tensor:
        """Logits (R, scored, K) of the last `scored` positions run: only those reach the head."""
        out = self.body(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=self.cache,
                        use_cache=self.cache is not None)
        return self.head(out.last_hidden_state[:, -scored:])

    def _span(self, end) -> int:
        """Slots a forward writing up to `end` attends to: those up to its own while the rows are level (`end` is a host
        int then; with recorded graphs, to the end of its length bucket), else all (after a per-row rollback)."""
        S = self.ids.shape[1]
        if not isinstance(end, int):
            return S
        return min(math.ceil(end / self.bucket) * self.bucket, S) if self.graphs is not None else end

    def _in_use(self, end) -> int:
        """`_span(end)`, handed to the cache layers (what they return to attention)."""
        kv = self._span(end)
        if self.cache is not None:
            for layer in self.cache.layers:
                layer.in_use = kv
        return kv

    def prefill(self) -> torch.Tensor:
        """Logits (R, K) at the last prompt position."""
        L = self.first
        pos = (self.slots[:L] - self.start[:, None]).clamp(min=0)
        return self._run(self.ids[:, :L], self._visible(0, L, self._in_use(L), self.start), pos, 1)[:, 0]

    def forward(self, new_ids_RT: torch.Tensor) -> torch.Tensor:
        """Logits (R, T, K) after each of T new tokens per row; they count as the rows' once `keep` says so."""
        T = self.fed = new_ids_RT.shape[1]
        if self.cache is None:  # every slot again, the new ones included
            n = self.first + T
            self.ids[:, self.first: n] = new_ids_RT
            pos = (self.slots[:n] - self.start[:, None]).clamp(min=0)
            return self._run(self.ids[:, :n], self._visible(0, n, n, self.start), pos, T)
        pos = (self.length - self.start)[:, None] + torch.arange(T, device=self.slots.device)
        kv = self._in_use(self.first + T)
        mask = self._visible(self.first, T, kv, self.length)
        if self.graphs is None:
            return self._run(new_ids_RT, mask, pos, T)
        graph_mask, replay = self.graphs[kv]
        for buf, x in zip((self.step_ids, graph_mask, self.step_pos), (new_ids_RT, mask, pos)):
            buf.copy_(x)
        return replay()

    def decode(self, new_ids_R: torch.Tensor) -> torch.Tensor:
        """One token per row, kept: logits (R, K) after it."""
        logits = self.forward(new_ids_R[:, None])[:, 0]
        self.keep()
        return logits

    def keep(self, n_R: torch.Tensor | None = None) -> None:
        """The tokens of the last forward join their rows: all of them (None), or the first n_R[r] of row r, the rest
        rolled back. The kept keys/values of a row that lagged the longest go down to its length; the cache then
        writes after the new longest row (transformers 5's `StaticLayer` writes at its `cumulative_length`)."""
        T = self.fed
        if n_R is None:
            self.length += T
            self.first = self.first + T
            return
        assert self.cache is not None, "rows without a cache never roll back"
        assert self.graphs is None, "recorded graphs step one kept token at a time"
        src = self.first + torch.arange(T, device=self.slots.device)
        dst = (self.length[:, None] + torch.arange(T, device=self.slots.device))[:, None, :, None]
        for layer in self.cache.layers:
            for buf in (layer.keys, layer.values):  # (R, heads, S, head_dim)
                moved = buf[:, :, src]  # a copy: sources and destinations may overlap
                buf.scatter_(2, dst.expand_as(moved), moved)  # slots past the kept ones get junk the mask hides
        self.length += n_R
        self.first = self.length.max()
        for layer in self.cache.layers:
            layer.cumulative_length.copy_(self.first)

    def select(self, rows: torch.Tensor) -> None:
        """Keep only these rows, in this order: a finished image leaves the batch, and forwards stop paying for it."""
        assert self.graphs is None, "a recorded graph holds the rows it was recorded with"
        self.ids, self.start, self.length = self.ids[rows], self.start[rows], self.length[rows]
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[rows], layer.values[rows]

    def capture(self, recorder) -> None:
        """Record the one-token forward once per length bucket still ahead (after `prefill`, which allocates the cache;
        the rows are level then): each step copies its token, mask and positions into the inputs of its bucket's
        recording and replays the whole body and the head. `recorder`: `CudaGraphs`, or one with its protocol."""
        assert isinstance(self.first, int) and self.cache is not None, "record level rows on the cache, after prefill"
        R, S = self.ids.shape
        dev = self.slots.device
        self.bucket, self.graphs = recorder.bucket, {}
        self.step_ids = torch.zeros((R, 1), dtype=torch.long, device=dev)
        self.step_pos = torch.zeros((R, 1), dtype=torch.long, device=dev)
        for kv in sorted({self._span(end) for end in range(self.first + 1, S + 1)}):
            mask = torch.zeros((R, 1, 1, kv), dtype=torch.bool, device=dev)
            self._in_use(kv)  # what this recording's layers hand attention; fixed in it
            run = lambda mask=mask: self._run(self.step_ids, mask, self.step_pos, 1)  # noqa: E731
            recorder.warm_up(run)  # it writes the next slot, which the first real step writes again
            for layer in self.cache.layers:
                layer.cumulative_length.sub_(1)
            self.graphs[kv] = (mask, recorder.record(run))
