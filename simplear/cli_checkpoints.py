"""The CLI's checkpoint commands: `generate` (draw with a checkpoint's own sampling defaults unless a flag says
otherwise), `import` (a release as published -> a self-describing checkpoint) and `export` (back to the release
format)."""

from __future__ import annotations

import sys

from simplear.visual_tokenizers import DECODE_BATCH

VT_HELP = ("the visual tokenizer a release decodes with (a release does not name it): the Cosmos tokenizer's folder "
           "(encoder.jit, decoder.jit, e.g. Cosmos-1.0-Tokenizer-DV8x16x16), or a visual tokenizer config as JSON")


def cmd_generate(args) -> int:
    from pathlib import Path

    from simplear.devices import resolve_device, resolve_serving_dtype
    from simplear.model import load_checkpoint
    from simplear.sampler import TorchSampler
    from simplear.sampling.spec import SamplingSpec

    from simplear.release import visual_tokenizer_arg

    device = resolve_device(args.device or "auto")
    try:
        vt = visual_tokenizer_arg(args.visual_tokenizer) if args.visual_tokenizer else None
        asked = SamplingSpec(cfg_scale=args.cfg, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                             negative_prompt=args.negative_prompt, prompt_template=args.prompt_template, mode=args.mode,
                             repetition_penalty=args.repetition_penalty)
        ckpt = load_checkpoint(args.model, device=device, dtype=resolve_serving_dtype(args.dtype, device), visual_tokenizer=vt)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    sampler = TorchSampler(ckpt.model, ckpt.vocab, ckpt.load_visual_tokenizer(decode_batch=args.decode_batch))
    n = args.num_images
    seeds = [None if args.seed is None else args.seed + i for i in range(n)]  # one distinct, repeatable seed per image
    sampling = asked.over(ckpt.sampling)
    print(f"sampling: {sampling.model_dump_json()}", file=sys.stderr)
    images = sampler.generate_images([args.prompt] * n, size=args.size, params=[sampling.params(s) for s in seeds])
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = [out] if n == 1 else [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(n)]
    for img, path in zip(images, paths):
        img.save(path)
        print(path)
    return 0


def _write_folder(make) -> int:
    """import / export: print the folder written, or the reason none was."""
    try:
        out = make()
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


def cmd_import(args) -> int:
    from simplear.release import import_release, visual_tokenizer_arg

    return _write_folder(lambda: import_release(args.release, visual_tokenizer_arg(args.visual_tokenizer), args.output))


def cmd_export(args) -> int:
    from simplear.release import export_release

    return _write_folder(lambda: export_release(args.checkpoint, args.output, args.report))


def add_checkpoint_commands(sub) -> None:
    from simplear.sampling.spec import MIN_TEMPERATURE

    p = sub.add_parser("generate", help="generate an image from a prompt with a trained checkpoint")
    p.add_argument("prompt")
    p.add_argument("--model", required=True, help="checkpoint folder (written by save_checkpoint, or a release as published "
                                                  "with --visual-tokenizer)")
    p.add_argument("--visual-tokenizer", help=VT_HELP)
    p.add_argument("-o", "--output", default="out.png", help="image path (with -n > 1: out_0.png, out_1.png, ...)")
    p.add_argument("--cfg", type=float, default=None, help="classifier-free guidance scale (1 = none); every sampling "
                                                          "flag left out: the checkpoint's recorded default")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--size", type=int, default=64, help="image side in pixels (a multiple of the tokenizer's downsample)")
    p.add_argument("--temperature", type=float, default=None, help=f"0 = greedy; otherwise at least {MIN_TEMPERATURE:g}")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--negative-prompt", default=None, help='the unconditional prompt of CFG ("": the dropped caption)')
    p.add_argument("--prompt-template", default=None, help="the text the model sees, with {prompt} where the prompt goes")
    p.add_argument("--mode", choices=["visual", "reference"], default=None,
                   help="reference: draw as the reference code's Hugging Face generate does (simplear.sampling.spec)")
    p.add_argument("--repetition-penalty", type=float, default=None, help="mode reference: HF's repetition penalty")
    p.add_argument("-n", "--num-images", type=int, default=1)
    p.add_argument("--decode-batch", type=int, default=DECODE_BATCH,
                   help="1024x1024 images per decoder call (more of smaller ones): bounds the decoder's memory")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="weights; auto: bfloat16 on a GPU, else the checkpoint's")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("import", help="a released SimpleAR checkpoint as published -> a self-describing checkpoint folder")
    p.add_argument("release", help="the release's folder (config.json, safetensors, tokenizer files)")
    p.add_argument("--visual-tokenizer", required=True, help=VT_HELP)
    p.add_argument("-o", "--output", required=True, help="the checkpoint folder to write (new or empty)")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("export", help="a checkpoint -> the released format (bf16, reference config keys, a model card)")
    p.add_argument("checkpoint", help="a checkpoint folder (e.g. runs/x/grpo/final)")
    p.add_argument("-o", "--output", required=True, help="the folder to write (new or empty)")
    p.add_argument("--report", help="the eval stage's report.json: its figures go in the model card")
    p.set_defaults(func=cmd_export)
