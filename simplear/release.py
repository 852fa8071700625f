"""Released SimpleAR checkpoints as published: a plain `Qwen2ForCausalLM` folder with its tokenizer files, the
reference code's specials and `len(tokenizer) + codebook` embedding rows, and no word on which visual tokenizer
decodes its codes. Given that tokenizer, such a folder is read as a checkpoint (`describe_release`), and
`import_release` writes a self-describing copy with `simplear.json`.

The checks are the ones a wrong pairing would otherwise fail late on (or never: a model whose rows do not match
draws codes a tokenizer of another size decodes into other images): the specials present and the embedding rows
equal to the text ids plus the visual tokenizer's codes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from simplear.sampling.spec import REFERENCE_SAMPLING
from simplear.visual_tokenizers import VisualTokenizerConfig
from simplear.vocab import META_FILE, Vocabulary

RELEASE_FILES = (".safetensors", ".json", ".txt", ".model", ".jinja")  # weights, configs, tokenizer files, template


def visual_tokenizer_arg(value: str | VisualTokenizerConfig | dict) -> VisualTokenizerConfig:
    """What `--visual-tokenizer` and `visual_tokenizer:` take: a Cosmos tokenizer's folder (encoder.jit,
    decoder.jit), or a visual tokenizer config (a mapping, or its JSON)."""
    if isinstance(value, VisualTokenizerConfig):
        return value
    if isinstance(value, dict):
        return VisualTokenizerConfig.model_validate(value)
    text = str(value).strip()
    if text.startswith("{"):
        return VisualTokenizerConfig.model_validate(json.loads(text))
    return VisualTokenizerConfig(kind="cosmos", path=text)


def describe_release(folder: str | Path, visual_tokenizer: VisualTokenizerConfig) -> dict:
    """The `simplear.json` a release folder lacks, for `visual_tokenizer`: refused (ValueError naming both
    numbers) when its embedding rows are not its tokenizer's ids plus the visual tokenizer's codes."""
    from transformers import AutoTokenizer

    d = Path(folder)
    config_file = d / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{d}: no config.json (not a Hugging Face model folder)")
    config = json.loads(config_file.read_text())
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(d))
    except (OSError, ValueError) as e:
        raise ValueError(f"{d}: its tokenizer files do not load: {e}") from None
    vocab = Vocabulary(tokenizer, codebook_size=visual_tokenizer.codebook_size, add_specials=False)
    vocab.text_tokenizer_source = str(d)
    rows = config.get("vocab_size")
    if rows != vocab.size:
        raise ValueError(f"{d}: the model has {rows} embedding rows, but its tokenizer's {vocab.visual_offset} ids + the "
                         f"visual tokenizer's {vocab.codebook_size} codes make {vocab.size}: another visual tokenizer?")
    from simplear.model import FORMAT, FORMAT_VERSION

    return {"format": FORMAT, "version": FORMAT_VERSION, "vocab": vocab.metadata(),
            "visual_tokenizer": visual_tokenizer.model_dump(mode="json"),
            # a release is drawn as its reference code draws it, with its generation_config's repetition penalty (used
            # in the reference mode, the one that draws as Hugging Face's generate does)
            "sampling": REFERENCE_SAMPLING.model_copy(update={"repetition_penalty": _repetition_penalty(d)}).model_dump(mode="json"),
            "extra": {"release": {"source": str(d), "architectures": config.get("architectures"),
                                  "torch_dtype": config.get("torch_dtype", config.get("dtype"))}}}


def _repetition_penalty(folder: Path) -> float:
    try:
        value = json.loads((folder / "generation_config.json").read_text()).get("repetition_penalty", 1.0)
    except (OSError, ValueError, AttributeError):
        return 1.0
    return float(value) if isinstance(value, (int, float)) and value > 0 else 1.0


def import_release(folder: str | Path, visual_tokenizer: VisualTokenizerConfig, out: str | Path) -> Path:
    """A copy of the release's files in `out` with its `simplear.json` (written last: the folder is then a
    checkpoint); the weights are copied byte for byte."""
    src, dst = Path(folder), Path(out)
    if visual_tokenizer.kind == "cosmos" and visual_tokenizer.sha256 is None:  # the copy records which files it goes with
        from simplear.visual_tokenizers import cosmos_digest

        visual_tokenizer = visual_tokenizer.model_copy(update={"sha256": cosmos_digest(visual_tokenizer.path)})
    meta = describe_release(src, visual_tokenizer)
    new_folder(dst)
    for f in sorted(src.iterdir()):
        if f.is_file() and f.name != META_FILE and f.name.endswith(RELEASE_FILES):
            shutil.copy2(f, dst / f.name)
    (dst / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
    return dst


def new_folder(dst: Path) -> None:
    """The folder import and export write: new or empty, never merged into (nor over) what is there."""
    if dst.exists() and any(dst.iterdir()):
        raise FileExistsError(f"{dst} is not empty")
    dst.mkdir(parents=True, exist_ok=True)


def export_release(checkpoint: str | Path, out: str | Path, report: str | Path | None = None) -> Path:
    """A project checkpoint in the release's format, for the reference code and the model hub: bf16 weights, the
    tokenizer files, config.json with the 4.x keys the reference code's transformers reads, no `simplear.json`
    (its visual tokenizer goes in the model card), and a model card (README.md) with the recipe, the visual
    tokenizer and, given the eval stage's report.json, its figures. Refused for a checkpoint whose vocabulary is
    not the reference layout (the two-specials layout of older checkpoints)."""
    import torch

    from simplear.model import load_checkpoint
    from simplear.vocab import SPECIALS

    src, dst = Path(checkpoint), Path(out)
    ck = load_checkpoint(src)
    tok, vocab = ck.vocab.text_tokenizer, ck.vocab
    first = vocab.t2i_id
    laid = tok.convert_ids_to_tokens(list(range(first, vocab.visual_offset)))
    if laid != list(SPECIALS):
        raise ValueError(f"{src}: its specials are {laid} after the text tokens, not the reference code's {list(SPECIALS)}: "
                         "a checkpoint of the older two-specials layout does not load in the reference code")
    new_folder(dst)
    ck.model.to(torch.bfloat16).save_pretrained(str(dst))
    tok.save_pretrained(str(dst))
    config_file = dst / "config.json"
    config = json.loads(config_file.read_text())
    config["torch_dtype"] = "bfloat16"  # the key 4.x reads (5.x writes `dtype` and still reads this one)
    config.pop("dtype", None)
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True))
    (dst / "README.md").write_text(model_card(ck, src, report), encoding="utf-8")
    return dst


def model_card(ck, source: Path, report: str | Path | None) -> str:
    """The model hub's card: what the weights are, what decodes them, how they were trained, the eval figures."""
    vt = ck.visual_tokenizer_config
    lines = ["---", "library_name: transformers", "pipeline_tag: text-to-image", "tags: [simplear, autoregressive, text-to-image]",
             "---", "", f"# {source.name}", "",
             "An autoregressive text-to-image model in the SimpleAR format: a `Qwen2ForCausalLM` that continues "
             "`<|t2i|>` caption `<|soi|>` with visual tokens (visual token id = code + "
             f"{ck.vocab.visual_offset}; {ck.vocab.size} embedding rows).", "",
             "## Visual tokenizer", "",
             f"`{vt.kind}`" + (f" ({Path(vt.path).name})" if vt.path else f" (levels {vt.levels})")
             + f": {vt.codebook_size} codes, {vt.downsample} px per code. The weights do not name it: give it when "
             "loading (`--visual-tokenizer`).", "",
             "## Training", ""]
    extra = ck.extra or {}
    lines += [f"- {k}: {json.dumps(v, default=str)}" for k, v in sorted(extra.items())] or ["- (no record)"]
    if report:
        data = json.loads(Path(report).read_text())
        lines += ["", "## Evaluation", "", "| set | score | " + " | ".join(c["name"] for c in data["checkpoints"]) + " |",
                  "|---|---|" + "---|" * len(data["checkpoints"])]
        for set_name, s in data["sets"].items():
            for scorer, by_ck in s["scores"].items():
                cells = []
                for c in data["checkpoints"]:
                    mean = ((by_ck.get(c["name"]) or {}).get("overall") or {}).get("mean")
                    cells.append("–" if mean is None else f"{mean:.3f}")
                lines.append(f"| {set_name} | {scorer} | " + " | ".join(cells) + " |")
        lines += ["", *data.get("notes", [])]
    return "\n".join(lines) + "\n"
