"""A yes/no visual question answerer for DPG-Bench: a Qwen2-VL chat model through transformers.

NOT the official DPG-Bench judge. compute_dpg_bench.py asks mPLUG-large (modelscope,
`damo/mplug_visual-question-answering_coco_large_en`) and counts an answer of exactly "yes"; modelscope and
mPLUG are not installable here. Scores from this judge compare runs with each other, not with published
DPG-Bench numbers.

The answer is read from the logits of the first token the model would write, not from generated text: no
sampling, no parsing of free text, and P(yes) comes with it. Each of yes/no is the first token of its
spellings ("yes", "Yes"); P(yes) = softmax over the two word sets (logsumexp within a set).
"""

from __future__ import annotations

import logging
from typing import Literal, Protocol, Sequence

from pydantic import Field

from simplear.config import StrictModel

log = logging.getLogger("simplear.vqa_judge")

YES_WORDS = ("yes", "Yes")
NO_WORDS = ("no", "No")


class VqaJudgeConfig(StrictModel):
    model: str = "Qwen/Qwen2-VL-7B-Instruct"  # hub id or folder (weights, processor, chat template)
    prompt: str = "{question} Answer yes or no."
    device: str = "auto"
    precision: Literal["fp32", "fp16", "bf16"] = "bf16"
    batch_size: int = Field(8, ge=1, description="(image, question) pairs per forward pass")
    max_pixels: int | None = Field(None, ge=28 * 28, description="cap on a tile's pixels before patching "
                                   "(Qwen2-VL's own default: 1280 * 28 * 28)")


class YesNoJudge(Protocol):
    name: str

    def p_yes(self, images: Sequence, questions: Sequence[str]) -> list[float]: ...


def first_token_ids(tokenizer, words: Sequence[str]) -> list[int]:
    return sorted({tokenizer.encode(w, add_special_tokens=False)[0] for w in words})


def p_yes_from_logits(logits_BV, yes_ids: Sequence[int], no_ids: Sequence[int]):
    """(B,) P(yes) between the two answers, from next-token logits (B, V)."""
    import torch

    yes = logits_BV[:, list(yes_ids)].logsumexp(-1)
    no = logits_BV[:, list(no_ids)].logsumexp(-1)
    return torch.sigmoid(yes - no)


class QwenVlJudge:
    name = "qwen2-vl yes/no logits (not the official mPLUG judge)"

    def __init__(self, config: VqaJudgeConfig):
        import torch
        from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

        from simplear.devices import resolve_device

        self.config = config
        self.device = resolve_device(config.device)
        dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[config.precision]
        self.processor = AutoProcessor.from_pretrained(config.model)
        self.processor.tokenizer.padding_side = "left"  # the last position is then every row's next token
        self.model = Qwen2VLForConditionalGeneration.from_pretrained(config.model, dtype=dtype).to(self.device).eval()
        smallest = dict(self.processor.image_processor.size)["shortest_edge"]
        self.size = {"shortest_edge": min(smallest, config.max_pixels), "longest_edge": config.max_pixels} \
            if config.max_pixels else None  # Qwen2-VL's size: bounds on the pixel count, not on a side
        tokenizer = self.processor.tokenizer
        self.yes_ids, self.no_ids = first_token_ids(tokenizer, YES_WORDS), first_token_ids(tokenizer, NO_WORDS)
        if set(self.yes_ids) & set(self.no_ids):
            raise ValueError(f"{config.model}: yes and no share a first token ({self.yes_ids} / {self.no_ids})")
        log.info("VQA judge %s (%s); not DPG-Bench's official mPLUG judge", config.model, config.precision)

    def chat_text(self, question: str) -> str:
        content = [{"type": "image"}, {"type": "text", "text": self.config.prompt.format(question=question)}]
        return self.processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                  add_generation_prompt=True)

    def p_yes(self, images: Sequence, questions: Sequence[str]) -> list[float]:
        """P(yes) for each (PIL image, question) pair."""
        import torch

        if len(images) != len(questions):
            raise ValueError(f"{len(images)} images but {len(questions)} questions")
        size = {"size": self.size} if self.size else {}
        out: list[float] = []
        step = self.config.batch_size
        for i in range(0, len(images), step):
            texts = [self.chat_text(q) for q in questions[i: i + step]]
            inputs = self.processor(text=texts, images=list(images[i: i + step]), padding=True, return_tensors="pt",
                                    **size).to(self.device)
            with torch.no_grad():
                logits = self.model(**inputs, logits_to_keep=1).logits[:, -1].float()
            out += p_yes_from_logits(logits, self.yes_ids, self.no_ids).tolist()
        return out
