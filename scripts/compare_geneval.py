"""Compare two GenEval results.jsonl files on the same images, e.g. GenEval's own (mmdet) and ours
(simplear.scorers.geneval): each one's task scores, how often they agree on `correct`, and the images where
they do not. Images are matched by `prompt/sample` from GenEval's `{prompt:05d}/samples/{sample:04d}.png`.

    python scripts/compare_geneval.py official/results.jsonl ours/results.jsonl [--json out.json] [--show 20]
"""

from __future__ import annotations

import argparse
import json
import sys

from simplear.scorers.geneval import TASKS, compare_results, read_results


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:6.2f}%"


def report(cmp: dict, show: int) -> str:
    lines = [f"images: {cmp['common']} in both, {cmp['only_a']} only in a, {cmp['only_b']} only in b", "",
             f"{'task':<16}{'a':>9}{'b':>9}{'agree':>9}"]
    tasks = list(TASKS) + [t for t in {**cmp["a"]["categories"], **cmp["b"]["categories"]} if t not in TASKS]
    for t in tasks:
        a, b = cmp["a"]["categories"].get(t, {}).get("mean"), cmp["b"]["categories"].get(t, {}).get("mean")
        lines.append(f"{t:<16}{_pct(a):>9}{_pct(b):>9}{_pct(cmp['agreement_by_task'].get(t)):>9}")
    lines.append(f"{'overall':<16}{_pct(cmp['a']['overall']['mean']):>9}{_pct(cmp['b']['overall']['mean']):>9}"
                 f"{_pct(cmp['agreement']):>9}")
    lines += ["", f"disagreements: {len(cmp['disagreements'])}"]
    for d in cmp["disagreements"][:show]:
        lines.append(f"  {d['image']} [{d['tag']}] {d['prompt']!r}: a={d['a']} b={d['b']}")
        for side in ("a", "b"):
            if d[f"reason_{side}"]:
                lines.append(f"      {side}: " + d[f"reason_{side}"].replace("\n", "; "))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("a", help="results.jsonl")
    parser.add_argument("b", help="results.jsonl")
    parser.add_argument("--json", help="write the full comparison here")
    parser.add_argument("--show", type=int, default=20, help="disagreements to print")
    args = parser.parse_args(argv)
    cmp = compare_results(read_results(args.a), read_results(args.b))
    print(report(cmp, args.show))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(cmp, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
