"""Classifier-free guidance inside vLLM: a logits processor that draws each image's token itself.

vLLM has no CFG. Every image with cfg_scale != 1 is two vLLM requests, a conditional one
(`<|t2i|>` caption `<|soi|>`) and an unconditional one (the negative prompt), tagged as a pair
through `SamplingParams.extra_args[EXTRA_KEY]` (`request_spec`); an image without CFG is one
request. At every step the processor finds the rows of each pair, combines them over the visual
ids and draws the token exactly as the torch engine does (`DrawSettings`: CFG, temperature,
top-k/top-p, inverse CDF of uniform t of the request's stream `request_uniforms(seed)`), then
writes it as a one-hot row (0 at the token, -inf elsewhere) into both rows. vLLM samples greedily
(temperature 0), so both rows take that token and the unconditional sequence is fed the image's
tokens, as in the torch engine's batched CFG. vLLM's own sampler must not draw: its noise (the V2
runner's: a hash of seed and position) differs between the two rows, whose prompts differ in
length, and would part the pair. So the same seed gives the torch engine's codes: equal in fp32,
and in bf16 the same uniforms with codes equal up to float differences in the logits. Requests
without our extra_args are left alone.

Lock-step. Both rows of a pair must be sampled at the same step, at the same token index; the
engine admits whole pairs so that they are (`simplear.vllm_engine`). A pair parts at a step where
only one of its rows is sampled, or the two are at different token indices. The processor sees it
at that step: it logs it, writes the request's stop id (a non-visual id, in the requests'
`stop_token_ids`) into the rows it sees, which end there, and keeps the pair parted, so an absent
row ends at the next step it is sampled in; `VLLMSampler.generate_codes` then raises, naming the
image and the token. One case is seen a step late: the V1 interface tells a processor nothing of
prefill progress, so when vLLM chunks one row's prefill, that step's draw uses its partial logits
and the pair parts at the next step, when that row's token index has not advanced (the image fails
all the same). On V2 a row still prefilling counts as not sampled, so the pair parts at once.

Preemption. If vLLM preempts both rows of a pair at one step and resumes them together, the pair
stays in step and the image is the one it would have been (up to float noise): the token is a
function of the pair's logits, the seed and the token index, and the resumed prefill recomputes the
same prefix. If it preempts one row only, or resumes the two at different steps, the row sampled
alone parts the pair, as above.

Both runner interfaces share `PairDraws`: `logits_processor_class()` (V1: the CPU build, and the GPU
engine while it runs with `VLLM_USE_V2_MODEL_RUNNER=0`) and `logits_processor_class_v2()` (V2:
vLLM's default wherever Triton works, i.e. every GPU). The vLLM base classes are attached lazily so
that importing this module (the serve stage's config does, through the engine) imports no vLLM.
"""

from __future__ import annotations

import logging
import itertools
from dataclasses import dataclass, field

import torch

from simplear.sampling.draw import DrawSettings, SamplingParams, request_uniforms, to_device

logger = logging.getLogger(__name__)

EXTRA_KEY = "simplear"  # vllm.SamplingParams.extra_args[EXTRA_KEY]: see `request_spec`
_SERIALS = itertools.count()
_SAMPLING_KEYS = ("cfg_scale", "temperature", "top_k", "top_p", "greedy")


def request_spec(lo: int, hi: int, stop: int, params: SamplingParams, seed: int, pair: str | None = None,
                 role: str | None = None) -> dict:
    """The extra_args entry of one request: visual ids [lo, hi), the id written when its pair parts,
    how to draw, and (with CFG) the pair's id and this row's role."""
    spec = {"visual": [lo, hi], "stop": stop, "seed": seed, "sampling": {k: getattr(params, k) for k in _SAMPLING_KEYS}}
    if pair is not None:
        spec.update(pair=pair, role=role)
    return spec


@dataclass
class _Row:
    lo: int
    hi: int
    stop: int
    params: SamplingParams  # seed resolved
    pair: str | None
    role: str | None  # "cond" | "uncond" | None
    uniforms: torch.Tensor  # (max_tokens,) float64: uniform t draws token t
    output_ids: list[int] | None = None  # V1: vLLM's live list of the request's output tokens
    serial: int = field(default_factory=lambda: next(_SERIALS))  # this request's, never reused (`id` may be)


def _spec_params(vparams) -> tuple[dict, SamplingParams] | None:
    """The request's spec and SamplingParams (None: not our request); a ValueError names the bad field."""
    spec = (vparams.extra_args or {}).get(EXTRA_KEY)
    if spec is None:
        return None
    where = f"extra_args[{EXTRA_KEY!r}]"
    if not isinstance(spec, dict):
        raise ValueError(f"{where} must be a dict, got {type(spec).__name__}")
    visual = spec.get("visual")
    if not (isinstance(visual, (list, tuple)) and len(visual) == 2 and 0 <= visual[0] < visual[1]):
        raise ValueError(f"{where}['visual'] must be [lo, hi) with 0 <= lo < hi, got {visual!r}")
    stop = spec.get("stop")
    if not isinstance(stop, int) or stop < 0 or visual[0] <= stop < visual[1]:
        raise ValueError(f"{where}['stop'] must be a non-visual token id, got {stop!r}")
    if not isinstance(spec.get("seed"), int):
        raise ValueError(f"{where}['seed'] must be an int, got {spec.get('seed')!r}")
    sampling = spec.get("sampling")
    if not isinstance(sampling, dict) or set(sampling) - set(_SAMPLING_KEYS):
        raise ValueError(f"{where}['sampling'] must be a dict with keys among {_SAMPLING_KEYS}, got {sampling!r}")
    params = SamplingParams(**sampling, seed=spec["seed"])  # its own ValueErrors name the field
    guided = params.cfg_scale != 1.0
    if guided != (spec.get("pair") is not None):
        raise ValueError(f"{where}: a request has a 'pair' iff its cfg_scale != 1, got cfg_scale "
                         f"{params.cfg_scale} and pair {spec.get('pair')!r}")
    if guided and spec.get("role") not in ("cond", "uncond"):
        raise ValueError(f"{where}['role'] must be 'cond' or 'uncond' for a pair, got {spec.get('role')!r}")
    if not isinstance(vparams.max_tokens, int) or vparams.max_tokens < 1:
        raise ValueError(f"max_tokens must be set for a request with {where}, got {vparams.max_tokens!r}")
    return spec, params


def _row(vparams, device, output_ids: list[int] | None = None) -> _Row | None:
    parsed = _spec_params(vparams)
    if parsed is None:
        return None
    spec, params = parsed
    lo, hi = spec["visual"]
    return _Row(int(lo), int(hi), int(spec["stop"]), params, spec.get("pair"), spec.get("role"),
                to_device(request_uniforms(params.seed, vparams.max_tokens), torch.float64, device), output_ids)


@dataclass
class _Group:
    """The draws of one visual range while the batch keeps the same requests at the same logits rows: everything on
    the device, built once when the batch changes; a step then copies nothing from the host (it only advances
    `t`, the token indices, on the device)."""

    key: tuple  # ((cond logits row, request serial, uncond logits row or None), ...) in draw order
    t_host: list[int]  # the token indices of the last step, to tell a next step from a change
    settings: DrawSettings
    rows: torch.Tensor  # conditional rows, then the unconditional rows of the guided ones
    uniforms: torch.Tensor  # (B, max tokens) float64
    t: torch.Tensor  # (B,) long: token indices


class PairDraws:
    """What both runner interfaces share: the check that each pair is in step, the draw, the one-hot rows."""

    def __init__(self):
        self.parted: set[str] = set()  # pairs that went out of step: their rows only get the stop id from then on
        self.groups: dict[tuple[int, int], _Group] = {}  # by visual range: the last step's

    def apply(self, logits: torch.Tensor, sampled: list[tuple[int, _Row, int]]) -> torch.Tensor:
        """`sampled`: (logits row, its request, token index) of each of our requests that vLLM samples this step."""
        draws = []  # (cond logits row, request, token index, uncond logits row or None)
        by_pair: dict[str, dict[str, tuple[int, _Row, int]]] = {}
        for r, row, t in sampled:
            if row.pair is None:
                draws.append((r, row, t, None))
            else:
                by_pair.setdefault(row.pair, {})[row.role] = (r, row, t)
        for pair, members in by_pair.items():
            c, u = members.get("cond"), members.get("uncond")
            if pair not in self.parted and c is not None and u is not None and c[2] == u[2]:
                draws.append((c[0], c[1], c[2], u[0]))
                continue
            if pair not in self.parted:
                self.parted.add(pair)
                seen = ", ".join(f"{role} row at token {t}" for role, (_, _, t) in sorted(members.items()))
                logger.error("CFG pair %s parted in vLLM: sampled this step: %s (a row preempted, or the pair "
                             "admitted apart); its rows stop", pair, seen)
            rows = [(r, row.stop) for r, row, _ in members.values()]
            self._one_hot(logits, *torch.tensor(rows, dtype=torch.long, device=logits.device).T)
        by_range: dict[tuple[int, int], list] = {}
        for entry in draws:
            by_range.setdefault((entry[1].lo, entry[1].hi), []).append(entry)
        for (lo, hi), group in by_range.items():
            self._draw(logits, lo, hi, group)
        return logits

    def _draw(self, logits: torch.Tensor, lo: int, hi: int, group: list) -> None:
        g = self._group(logits.device, lo, hi, group)
        d = g.settings
        final = d.final_logprobs(logits[g.rows, lo:hi])
        u = g.uniforms.gather(1, g.t[:, None])[:, 0]
        tok = d.draw(final, u) + lo
        self._one_hot(logits, g.rows, torch.cat([tok, tok[d.cfg_idx]]))

    def _group(self, dev, lo: int, hi: int, group: list) -> _Group:
        """The step's `_Group`: the last one advanced by a token where the same requests sit at the same rows one
        token further on (the steady state), else built anew (a request came, went or moved)."""
        key = tuple((r, row.serial, ur) for r, row, _, ur in group)
        ts = [t for _, _, t, _ in group]
        last = self.groups.get((lo, hi))
        if last is not None and last.key == key and all(t == s + 1 for t, s in zip(ts, last.t_host)):
            last.t.add_(1)
            last.t_host = ts
            return last
        d = DrawSettings.of([row.params for _, row, _, _ in group], hi - lo, dev)
        uncond = [group[i][3] for i in d.guided]
        assert None not in uncond, "a guided request without its unconditional row"  # _spec_params: pair iff guided
        uniforms = torch.nn.utils.rnn.pad_sequence([row.uniforms for _, row, _, _ in group], batch_first=True)
        g = _Group(key, ts, d, to_device([r for r, _, _, _ in group] + uncond, torch.long, dev), uniforms,
                   to_device(ts, torch.long, dev))
        self.groups[(lo, hi)] = g
        return g

    @staticmethod
    def _one_hot(logits: torch.Tensor, rows: torch.Tensor, ids: torch.Tensor) -> None:
        """Leave greedy sampling `ids` alone to take: every other entry -inf, whatever vLLM's masks left there."""
        logits[rows] = float("-inf")
        logits[rows, ids] = 0.0


class _Processor:
    def __init__(self, device):
        self.device = device
        self.rows: dict[int, _Row] = {}  # our requests, by batch index (V1) or slot (V2)
        self.draws = PairDraws()

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        """At admission, so that a bad spec fails its request instead of the engine."""
        _spec_params(sampling_params)


class CFGLogitsProcessor(_Processor):
    """The V1 interface (`vllm.v1.sample.logits_processor.LogitsProcessor`): requests keyed by batch index,
    told through batch updates; the token index is the length of vLLM's live output list."""

    def __init__(self, vllm_config=None, device=None, is_pin_memory: bool = False):
        super().__init__(device if device is not None else torch.device("cpu"))

    def is_argmax_invariant(self) -> bool:
        return False  # it decides the greedy pick

    def update_state(self, batch_update) -> None:
        from vllm.v1.sample.logits_processor.builtin import process_dict_updates

        process_dict_updates(self.rows, batch_update, lambda params, _prompt, out: _row(params, self.device, out))

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return self.draws.apply(logits, [(i, row, len(row.output_ids)) for i, row in self.rows.items()])


class CFGLogitsProcessorV2(_Processor):
    """The V2 interface (`vllm.v1.worker.gpu.sample.logits_processor.LogitsProcessor`): requests keyed by
    their slot, which vLLM recycles without telling (a new `add_request` overwrites); which slots are
    sampled, and at which token, comes from the step's `LogitsContext` and the runner's request state."""

    def __init__(self, vllm_config, req_states):
        super().__init__(req_states.device)
        self.req_states = req_states

    def add_request(self, req_idx: int, sampling_params) -> bool:
        row = _row(sampling_params, self.device)
        if row is None:
            self.rows.pop(req_idx, None)
            return False
        self.rows[req_idx] = row
        return True

    def apply(self, logits: torch.Tensor, ctx) -> torch.Tensor:
        slots = ctx.idx_mapping_np.tolist()
        if logits.shape[0] != len(slots):
            raise RuntimeError("the CFG logits processor needs one logits row per request (no speculative decoding)")
        prompt_len, prefill_len = self.req_states.prompt_len.np, self.req_states.prefill_len.np
        sampled = []
        for b, slot in enumerate(slots):
            row = self.rows.get(slot)
            seq_len = int(ctx.seq_lens_upper_bound_np[b])  # exact without speculative decoding
            if row is not None and seq_len >= prefill_len[slot]:  # else still prefilling: vLLM drops this row's token
                sampled.append((b, row, seq_len - int(prompt_len[slot])))
        return self.draws.apply(logits, sampled)


_CLASSES: dict[str, type] = {}


def _with_base(name: str, mixin: type, base: type) -> type:
    """`mixin` as a subclass of vLLM's `base`, under a name this module resolves (pickling by reference)."""
    if name not in _CLASSES:
        _CLASSES[name] = type(name, (mixin, base), {"__module__": __name__})
    return _CLASSES[name]


def logits_processor_class() -> type:
    """`CFGLogitsProcessor` as a V1 `LogitsProcessor` (what `LLM(logits_processors=...)` wants on the V1 runner)."""
    from vllm.v1.sample.logits_processor import LogitsProcessor

    return _with_base("SimpleARCFGLogitsProcessor", CFGLogitsProcessor, LogitsProcessor)


def logits_processor_class_v2() -> type:
    """`CFGLogitsProcessorV2` as a V2 `LogitsProcessor` (the V2 runner rejects any other class)."""
    from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcessor

    return _with_base("SimpleARCFGLogitsProcessorV2", CFGLogitsProcessorV2, LogitsProcessor)


def __getattr__(name):  # vLLM may load a processor by qualified name: `simplear.vllm_cfg:SimpleARCFGLogitsProcessor`
    if name == "SimpleARCFGLogitsProcessor":
        return logits_processor_class()
    if name == "SimpleARCFGLogitsProcessorV2":
        return logits_processor_class_v2()
    raise AttributeError(name)
