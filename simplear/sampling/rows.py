"""The model's rows on a preallocated KV cache: prompts, then what each row accepts, with no host round trip per step.

Every engine step is a forward of T new tokens per row (1 for plain decoding, the window for speculative Jacobi
decoding) on transformers' static cache layers (`StaticLayer`) sized for the whole image, so nothing grows or is
copied as an image is decoded, and the attention mask, the positions and the cache's write slot are device tensors
computed from two per-row vectors (where a row starts, how many slots it holds): no step reads anything back to the
host, and on CUDA the one-token step is recorded once as a CUDA graph and replayed (`capture`). Uncaptured, attention
covers only the slots in use (on CPU at 1,024 tokens, half the keys/values GQA copies per step).

Slots are shared: a forward writes every row's T tokens at the same slots (the cache's write slot), after the longest
row. A row that keeps fewer than T of them (rejected drafts) or lags the longest has its kept keys and values moved
down to its own length (`keep`): a row's tokens are always the slots [start, length), whatever the other rows did.
Keys carry their position (RoPE of the row's own position ids), so a moved key is the same key.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, StaticLayer


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


class KVRows:
    """Left-padded prompts in slots [start, L), then each row's kept tokens; `capacity` slots for them after the prompts.

    `use_cache=False` (the benchmark's baseline) keeps no cache and runs every slot again at each forward."""

    def __init__(self, model, head: VisualHead, prompts: list[list[int]], pad_id: int, capacity: int,
                 use_cache: bool = True):
        assert model.config._attn_implementation == "sdpa", "the masks are SDPA's (TorchSampler checks)"
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
        self.graph = None

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

    def _in_use(self, end) -> int:
        """Slots a forward writing up to `end` attends to: those up to its own while the rows are level (`end` is a host
        int then), else all (after a per-row rollback, and in a captured graph, whose shapes are fixed)."""
        kv = end if isinstance(end, int) and self.graph is None else self.ids.shape[1]
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
        mask = self._visible(self.first, T, self._in_use(self.first + T), self.length)
        if self.graph is None:
            return self._run(new_ids_RT, mask, pos, T)
        for buf, x in zip(self.graph_inputs, (new_ids_RT, mask, pos)):
            buf.copy_(x)
        self.graph.replay()
        return self.graph_output

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
        assert self.graph is None, "a captured graph holds the rows it was recorded with"
        self.ids, self.start, self.length = self.ids[rows], self.start[rows], self.length[rows]
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[rows], layer.values[rows]

    def capture(self) -> None:
        """Record the one-token forward as a CUDA graph (after `prefill`, which allocates the cache): each step then
        copies its token, mask and positions into the graph's inputs and replays the whole body and the head."""
        R, S = self.ids.shape
        dev = self.slots.device
        self.graph = torch.cuda.CUDAGraph()
        self._in_use(None)  # with a graph, every slot: its shapes are fixed
        self.graph_inputs = (torch.zeros((R, 1), dtype=torch.long, device=dev),
                             torch.zeros((R, 1, 1, S), dtype=torch.bool, device=dev),
                             torch.zeros((R, 1), dtype=torch.long, device=dev))
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):  # warm-up outside the graph (cuBLAS workspaces); its write goes to the next slot
            self._run(*self.graph_inputs, 1)
        torch.cuda.current_stream(dev).wait_stream(side)
        for layer in self.cache.layers:
            layer.cumulative_length.sub_(1)  # the warm-up's slot is written again by the first real step
        with torch.cuda.graph(self.graph):
            self.graph_output = self._run(*self.graph_inputs, 1)
