#!/usr/bin/env python3
"""Coverage vs wall-clock from `ouro sample --time-budget` outputs (scripts/experiments/test_time_compute.sh).

usage: ttc_table.py OUT_DIR MODEL[,MODEL...] BUDGET[,BUDGET...] [--svg FILE]

Reads OUT_DIR/{model}-{budget}.jsonl (one run per budget) and prints a markdown table: samples completed,
samples per prompt, pass@1 (mean over prompts of correct/n), coverage = pass@n (a prompt counts if any of
its samples is right), majority-vote accuracy; a prompt with no finished sample counts as wrong. It also
reads the curve off the longest run, cutting its completions at each time t by their `seconds` (the
scheduler does not depend on the budget, so that is what a run with budget t finishes), and with --svg draws
coverage and majority accuracy against seconds for every model.
"""
import json
import sys
from collections import Counter


def score(rows, t=None):
    n_prompts = len(rows)
    samples = pass1 = cover = maj = 0
    for r in rows:
        comps = [c for c in r["completions"] if t is None or c["seconds"] <= t]
        n = len(comps)
        samples += n
        if n == 0:
            continue
        c = sum(1 for x in comps if x.get("correct"))
        pass1 += c / n
        cover += c > 0
        votes = Counter(x["answer"] for x in comps if x["answer"] is not None)
        if votes:
            best = max(votes.values())
            top = next(x["answer"] for x in comps if x["answer"] is not None and votes[x["answer"]] == best)
            maj += top == r["reference"]
    return {"samples": samples, "per_prompt": samples / n_prompts, "pass1": pass1 / n_prompts, "coverage": cover / n_prompts, "majority": maj / n_prompts}


def load(path):
    with open(path) as f:
        return [json.loads(l) for l in f if l.strip()]


def svg(curves, out):
    W, H, L, R, T, B = 900, 380, 60, 20, 30, 45
    pw = (W - L - R - 60) / 2
    tmax = max(t for c in curves.values() for t, _ in c)
    colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"]
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">', f'<rect width="{W}" height="{H}" fill="white"/>']
    for pi, (key, title) in enumerate([("coverage", "coverage (pass@n)"), ("majority", "majority-vote accuracy")]):
        x0 = L + pi * (pw + 60)
        px = lambda t: x0 + pw * t / tmax
        py = lambda v: T + (H - T - B) * (1 - v)
        parts.append(f'<text x="{x0 + pw / 2}" y="18" text-anchor="middle" font-size="14">{title} vs wall-clock</text>')
        parts.append(f'<rect x="{x0}" y="{T}" width="{pw}" height="{H - T - B}" fill="none" stroke="black"/>')
        for v in [0, 0.25, 0.5, 0.75, 1.0]:
            parts.append(f'<line x1="{x0}" x2="{x0 + pw}" y1="{py(v)}" y2="{py(v)}" stroke="#ddd"/><text x="{x0 - 5}" y="{py(v) + 4}" text-anchor="end">{v:.2f}</text>')
        for k in range(6):
            t = tmax * k / 5
            parts.append(f'<text x="{px(t)}" y="{H - B + 16}" text-anchor="middle">{t:.0f}</text>')
        parts.append(f'<text x="{x0 + pw / 2}" y="{H - 8}" text-anchor="middle">seconds (2 CPU cores)</text>')
        for ci, (name, pts) in enumerate(curves.items()):
            col = colors[ci % len(colors)]
            path = " ".join(f"{px(t):.1f},{py(s[key]):.1f}" for t, s in pts)
            parts.append(f'<polyline points="{path}" fill="none" stroke="{col}" stroke-width="2"/>')
            parts.append(f'<text x="{x0 + 8}" y="{T + 16 + 16 * ci}" fill="{col}">{name}</text>')
    parts.append("</svg>")
    with open(out, "w") as f:
        f.write("\n".join(parts) + "\n")


def main():
    args = sys.argv[1:]
    out_svg = None
    if "--svg" in args:
        i = args.index("--svg")
        out_svg = args[i + 1]
        del args[i : i + 2]
    d, models, budgets = args[0], args[1].split(","), [float(b) for b in args[2].split(",")]
    print("| model | budget (s) | samples | samples per prompt | tokens/s | pass@1 | coverage (pass@n) | majority vote |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    curves = {}
    for m in models:
        for b in budgets:
            tag = f"{b:g}"
            rows = load(f"{d}/{m}-{tag}.jsonl")
            s = score(rows)
            try:
                tps = json.load(open(f"{d}/{m}-{tag}.summary.json"))["tokens_per_second"]
            except (OSError, ValueError, KeyError):
                tps = float("nan")
            print(f"| {m} | {tag} | {s['samples']} | {s['per_prompt']:.1f} | {tps:.0f} | {s['pass1']:.3f} | {s['coverage']:.3f} | {s['majority']:.3f} |")
        rows = load(f"{d}/{m}-{max(budgets):g}.jsonl")
        ts = [max(budgets) * k / 40 for k in range(1, 41)]
        curves[m] = [(t, score(rows, t)) for t in ts]
    print(f"\nread off the {max(budgets):g}-s runs (completions finished by t):\n")
    marks = sorted(set([1.0, 2.0] + budgets))
    print("| model | " + " | ".join(f"t = {t:g} s" for t in marks) + " |")
    print("| --- |" + " ---: |" * len(marks))
    for m in models:
        rows = load(f"{d}/{m}-{max(budgets):g}.jsonl")
        cells = []
        for t in marks:
            s = score(rows, t)
            cells.append(f"{s['samples']} / {s['coverage']:.2f} / {s['majority']:.2f}")
        print(f"| {m} (samples / coverage / majority) | " + " | ".join(cells) + " |")
    if out_svg:
        svg(curves, out_svg)
        print(f"\nwrote {out_svg}")


if __name__ == "__main__":
    main()
