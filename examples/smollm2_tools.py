#!/usr/bin/env python
"""Helpers of examples/run_qrm_smollm2.sh (data split, token-credit heat map, summary table).

    python examples/smollm2_tools.py split --pairs PAIRS.jsonl --out DIR --heldout-fraction 0.2 [--train-pairs N]
    python examples/smollm2_tools.py heatmap --dump CREDITS.jsonl --out PNG [--index I]
    python examples/smollm2_tools.py summary --out-dir OUT
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys


def _read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _write_jsonl(path: str, rows: list[dict]) -> None:
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def split(args) -> None:
    """Split pairs by QUESTION: a stable hash of the instruction picks the held-out questions, so no
    question (and none of its responses) is in both sets and the held-out accuracy measures how the
    reward model judges responses to questions it has never seen."""
    rows = _read_jsonl(args.pairs)
    held, train = [], []
    for r in rows:
        h = int(hashlib.sha256(r["instruction"].strip().encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
        (held if h < args.heldout_fraction else train).append(r)
    if args.train_pairs:
        train = train[:args.train_pairs]
    if args.heldout_pairs:
        held = held[:args.heldout_pairs]
    os.makedirs(args.out, exist_ok=True)
    _write_jsonl(os.path.join(args.out, "train_pairs.jsonl"), train)
    _write_jsonl(os.path.join(args.out, "heldout_pairs.jsonl"), held)
    overlap = {r["instruction"] for r in train} & {r["instruction"] for r in held}
    assert not overlap
    print(f"split {len(rows)} pairs by question: {len(train)} train, {len(held)} held out (no shared question)")


def heatmap(args) -> None:
    """Token credits of the chosen and the rejected response of one held-out pair, as coloured text."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import colors

    rows = _read_jsonl(args.dump)
    by_index: dict[int, dict[str, dict]] = {}
    for r in rows:
        by_index.setdefault(r["index"], {})[r["side"]] = r
    index = args.index if args.index is not None else min(
        (i for i, s in by_index.items() if len(s) == 2),
        key=lambda i: len(by_index[i]["chosen"]["tokens"]) + len(by_index[i]["rejected"]["tokens"]))
    pair = by_index[index]
    scores = pair["chosen"]["scores"] + pair["rejected"]["scores"]
    lim = max(abs(min(scores)), abs(max(scores))) or 1.0
    norm, cmap = colors.TwoSlopeNorm(vmin=-lim, vcenter=0.0, vmax=lim), plt.get_cmap("RdYlGn")
    per_line = 14
    lines = sum((len(pair[s]["tokens"]) + per_line - 1) // per_line + 2 for s in ("chosen", "rejected"))
    fig, ax = plt.subplots(figsize=(14, 0.32 * lines + 1.2))
    ax.set_axis_off()
    y = 0
    for side in ("chosen", "rejected"):
        row = pair[side]
        ax.text(0, -y, f"{side}: mean credit {row['mean_score']:+.3f}", fontsize=10, fontweight="bold",
                va="top", transform=ax.transData)
        y += 1
        for k, (tok, score) in enumerate(zip(row["tokens"], row["scores"])):
            if k and k % per_line == 0:
                y += 1
            text = tok.replace("\n", "\\n").replace("$", r"\$") or " "
            ax.text((k % per_line) / per_line, -y, text, fontsize=8, va="top", family="monospace",
                    bbox={"facecolor": cmap(norm(score)), "edgecolor": "none", "pad": 1.5})
        y += 2
    ax.set_xlim(0, 1)
    ax.set_ylim(-y, 1)
    fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, fraction=0.02, pad=0.01,
                 label="token credit Z")
    prompt = pair["chosen"]["prompt"]
    fig.suptitle(f"Q-RM token credits, held-out pair {index}: {prompt[-90:]!r}", fontsize=9)
    fig.savefig(args.out, dpi=110, bbox_inches="tight")
    print(f"token-credit heat map of held-out pair {index} -> {args.out}")


def summary(args) -> None:
    out = args.out_dir

    def load(name):
        path = os.path.join(out, name)
        return json.load(open(path)) if os.path.exists(path) else None

    timings = load("timings.json") or {}
    res = {
        "rm_heldout": {k: load(f"eval/{k}_heldout.json") for k in ("qrm", "orm")},
        "pass_at_1": {k: load(f"eval/policy_{k}.json") for k in ("base", "ppo", "reinforce")},
        "timings": timings,
    }
    lines = ["", "== summary (" + os.path.abspath(out) + ")"]
    for k, r in res["rm_heldout"].items():
        if r:
            lines.append(f"{k.upper()} held-out pairwise accuracy: {r['pairwise_accuracy']:.3f} on {r['valid_pairs']} "
                         f"pairs (mean margin {r['mean_margin']:+.3f})")
    for k, r in res["pass_at_1"].items():
        if r:
            lines.append(f"greedy Pass@1 {k:10s}: {r['pass@1']:.3f} on {int(r['eval_prompts'])} GSM8K test prompts "
                         f"({int(r.get('unparsable_gsm8k', r.get('unparsable_reference', 0)))} unparsable)")
    for step, t in timings.items():
        lines.append(f"  {step:22s} {t['seconds']:7.1f} s  peak RSS {t['max_rss_mib']:7.0f} MiB")
    print("\n".join(lines))
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(res, f, indent=2)


def main() -> int:
    ap = argparse.ArgumentParser(prog="smollm2_tools.py")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("split")
    s.add_argument("--pairs", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--heldout-fraction", type=float, default=0.2)
    s.add_argument("--train-pairs", type=int)
    s.add_argument("--heldout-pairs", type=int)
    h = sub.add_parser("heatmap")
    h.add_argument("--dump", required=True)
    h.add_argument("--out", required=True)
    h.add_argument("--index", type=int)
    m = sub.add_parser("summary")
    m.add_argument("--out-dir", required=True)
    args = ap.parse_args()
    {"split": split, "heatmap": heatmap, "summary": summary}[args.cmd](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
