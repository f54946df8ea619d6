"""The demo's report: ``report.json`` (every number), ``report.md`` (what they mean) and PNG plots.

Plots (matplotlib, Agg backend, written next to the report):

* ``pass_at_1.png``: greedy Pass@1 on the test prompts vs RL iteration, one panel per algorithm, one line
  per reward model (iteration 0 is the SFT policy);
* ``reward_models.png``: pairwise accuracy on held-out pairs, and credit localisation vs chance;
* ``token_credits.png``: per-token credits of one correct and one incorrect held-out response (the
  paper's Figure 1), Q-RM and DPO-RM, the first wrong step outlined;
* ``timings.png``: seconds per stage.
"""

from __future__ import annotations

import json
import math
import os
from typing import Optional

from megatron_qrm.demo import task as arith

NAMES = {"qrm": "Q-RM", "orm": "ORM", "dpo": "DPO-RM"}
COLORS = {"qrm": "tab:red", "orm": "tab:blue", "dpo": "tab:green"}
ALGO_NAMES = {"ppo": "PPO", "reinforce": "REINFORCE"}


def _finite(x) -> Optional[float]:
    return float(x) if isinstance(x, (int, float)) and math.isfinite(x) else None


def iterations_to_target(curve: list[float], target: float, start: int = 0) -> Optional[int]:
    """First index >= ``start`` (an iteration; curve[0] = iteration 0) where ``curve`` reaches ``target``;
    None if never."""
    for i, x in enumerate(curve):
        if i >= start and x is not None and x >= target - 1e-9:
            return i
    return None


def build_report(cfg, p, results: dict) -> dict:
    """Collect every stage's numbers into one dict (what ``report.json`` holds)."""
    pairs = results.get("pairs", {})
    sft_pass = pairs.get("sft_pass@1")
    rep: dict = {
        "config": cfg.to_dict(),
        "data": {k: v for k, v in results.get("data", {}).items() if k != "seconds"},
        "sft": {"final_loss": results.get("sft", {}).get("final_loss"), "pass@1": sft_pass,
                "greedy_pass@1": pairs.get("sft_greedy_pass@1")},
        "pairs": {k: pairs.get(k) for k in ("train", "heldout")},
        "reward_models": {},
        "localization": {},
        "rl": {},
        "timings_s": {name: r.get("seconds") for name, r in results.items()},
    }
    for kind in cfg.rm_kinds:
        r = results.get(f"rm-{kind}")
        if r:
            rep["reward_models"][kind] = {k: r.get(k) for k in ("heldout_accuracy", "heldout_pairs", "train_accuracy",
                                                                 "train_pairs", "final_train_loss")}
    loc = results.get("localization", {})
    chance = next((v["chance"] for v in loc.values() if "chance" in v), None)
    for kind in cfg.rm_kinds:
        if kind in loc:
            rep["localization"][kind] = {k: loc[kind].get(k) for k in (
                "hit_rate", "hit_rate_mean", "hit_rate_min", "hit_rate_first_low", "chance", "lowest_at_or_after_error",
                "lowest_at_or_after_error_chance", "profile", "responses", "skipped", "by_first_error")}
        elif kind == "orm" and chance is not None:
            rep["localization"][kind] = {"hit_rate": chance, "hit_rate_mean": chance, "hit_rate_min": chance,
                                         "hit_rate_first_low": chance, "chance": chance,
                                         "note": "an ORM scores the last token only: no step credits, chance level"}
    for algo in cfg.algos:
        rep["rl"][algo] = {}
        for kind in cfg.rm_kinds:
            r = results.get(f"rl-{algo}-{kind}")
            if not r:
                continue
            curve = [sft_pass] + list(r["pass@1"])
            rep["rl"][algo][kind] = {"pass@1": curve, "rollout_accuracy": [None] + list(r["rollout_accuracy"]),
                                     "greedy_pass@1": [pairs.get("sft_greedy_pass@1")] + list(r.get("greedy_pass@1", [])),
                                     "final_pass@1": curve[-1], "best_pass@1": max(x for x in curve if x is not None),
                                     "kl_mean": [None] + list(r.get("kl_mean", []))}
        runs = rep["rl"][algo]
        if "orm" in runs and len(runs["orm"]["pass@1"]) > 1:
            # the paper's convergence claim, at toy scale: RL iterations each method needs to reach the best
            # Pass@1 the ORM reaches in the run; undefined when the ORM never improves on the SFT policy
            target = max(x for x in runs["orm"]["pass@1"][1:] if x is not None)
            improved = sft_pass is not None and target > sft_pass
            for kind, run in runs.items():
                run["target_orm_best"] = target if improved else None
                run["iterations_to_orm_best"] = iterations_to_target(run["pass@1"], target, start=1) if improved else None
    return rep


# ----------------------------------------------------------------------------- plots
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_pass_at_1_curves(curves: dict[str, dict[str, tuple[list, Optional[list]]]], title: str, ylabel: str,
                          path: str) -> str:
    """One panel per RL algorithm, one line per reward model: ``curves[algo][kind] = (pass@1 per iteration,
    its standard deviation or None)``; a standard deviation is drawn as a band. ``title`` is formatted with
    ``algo`` (the algorithm's display name)."""
    plt = _plt()
    algos = list(curves)
    fig, axes = plt.subplots(1, len(algos), figsize=(5.2 * len(algos), 3.8), squeeze=False, sharey=True)
    for ax, algo in zip(axes[0], algos):
        for kind, (ys, sd) in curves[algo].items():
            ys = [float("nan") if y is None else y for y in ys]
            xs = list(range(len(ys)))
            ax.plot(xs, ys, marker="o", color=COLORS.get(kind), label=NAMES.get(kind, kind))
            if sd is not None:
                ax.fill_between(xs, [a - b for a, b in zip(ys, sd)], [a + b for a, b in zip(ys, sd)],
                                color=COLORS.get(kind), alpha=0.15)
        ax.set_title(title.format(algo=ALGO_NAMES.get(algo, algo)))
        ax.set_xlabel("RL iteration (0 = SFT policy)")
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0][0].set_ylabel(ylabel)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_pass_at_1(rep: dict, path: str) -> str:
    curves = {algo: {kind: (run["pass@1"], None) for kind, run in runs.items()} for algo, runs in rep["rl"].items()}
    return plot_pass_at_1_curves(curves, "{algo}: Pass@1 on test prompts (T = 1)", "Pass@1", path)


def plot_reward_models(rep: dict, path: str) -> str:
    plt = _plt()
    kinds = list(rep["reward_models"])
    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(15, 3.9))
    accs = [rep["reward_models"][k]["heldout_accuracy"] for k in kinds]
    bars = a1.bar([NAMES[k] for k in kinds], accs, color=[COLORS[k] for k in kinds])
    a1.axhline(0.5, color="gray", ls="--", lw=1, label="chance")
    a1.set_ylim(0, 1)
    a1.set_title("pairwise accuracy, held-out pairs")
    a1.bar_label(bars, fmt="%.2f")
    a1.legend(loc="lower right")
    loc = rep["localization"]
    lk = [k for k in kinds if k in loc]
    vals = [loc[k]["hit_rate"] for k in lk]
    bars = a2.bar([NAMES[k] + (" (no token\ncredit)" if k == "orm" else "") for k in lk], vals,
                  color=[COLORS[k] for k in lk])
    if lk:
        a2.axhline(loc[lk[0]]["chance"], color="gray", ls="--", lw=1, label="chance")
        a2.legend(loc="upper right")
    a2.set_ylim(0, 1)
    a2.bar_label(bars, fmt="%.2f")
    a2.set_title("lowest-credit step = first wrong step")
    for k in lk:
        prof = loc[k].get("profile") or {}
        if prof:
            xs = list(prof)
            a3.plot(range(len(xs)), [float("nan") if prof[x] is None else prof[x] for x in xs], marker="o",
                    color=COLORS[k], label=NAMES[k])
            a3.set_xticks(range(len(xs)))
            a3.set_xticklabels([("first wrong\nstep" if x == "0" else x) for x in xs])
    a3.axhline(0, color="gray", lw=0.8)
    a3.set_title("result credit around the first wrong step")
    a3.set_xlabel("step offset from the first wrong step")
    a3.set_ylabel("credit (std units)")
    if any(loc[k].get("profile") for k in lk):
        a3.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _pick_example(dump: str) -> Optional[int]:
    """Index of the first held-out pair whose rejected response goes wrong at a step before the answer
    line (a deterministic choice, made without looking at the credits)."""
    from megatron_qrm.demo.localization import response_text

    with open(dump) as f:
        for line in f:
            row = json.loads(line)
            if row["side"] != "rejected":
                continue
            c = arith.check(row["prompt"], response_text(row["tokens"]))
            if not c.correct and c.first_error is not None and 0 < c.first_error < c.n_steps - 1:
                return row["index"]
    return None


def _rows_of(dump: str, index: int) -> dict[str, dict]:
    out = {}
    with open(dump) as f:
        for line in f:
            row = json.loads(line)
            if row["index"] == index:
                out[row["side"]] = row
    return out


def plot_token_credits(p, kinds: list[str], path: str) -> Optional[dict]:
    """Heatmap of token credits of one held-out pair; returns what it shows (or None: nothing to show)."""
    from megatron_qrm.demo.localization import response_text, token_steps

    dumps = {k: p("rm", f"{k}_tokens_heldout.jsonl") for k in kinds if k != "orm"}
    dumps = {k: v for k, v in dumps.items() if os.path.exists(v)}
    if not dumps:
        return None
    first = next(iter(dumps.values()))
    index = _pick_example(first)
    if index is None:
        return None
    plt = _plt()
    import numpy as np

    rows = []
    for kind, dump in dumps.items():
        pair = _rows_of(dump, index)
        scores = pair["chosen"]["scores"] + pair["rejected"]["scores"]
        mu, sd = float(np.mean(scores)), float(np.std(scores)) or 1.0
        for side in ("chosen", "rejected"):
            r = pair[side]
            rows.append((kind, side, r["tokens"], [(s - mu) / sd for s in r["scores"]], r["prompt"]))
    width = max(len(r[2]) for r in rows)
    fig, ax = plt.subplots(figsize=(max(8, 0.48 * width + 2.2), 0.62 * len(rows) + 1.4))
    grid = np.full((len(rows), width), np.nan)
    for i, (_, _, toks, z, _) in enumerate(rows):
        grid[i, :len(z)] = z
    lim = float(np.nanmax(np.abs(grid))) or 1.0
    im = ax.imshow(grid, cmap="RdYlGn", vmin=-lim, vmax=lim, aspect="auto")
    shown = {"pair_index": index, "rows": []}
    for i, (kind, side, toks, z, prompt) in enumerate(rows):
        c = arith.check(prompt, response_text(toks))
        steps = token_steps(toks)
        for j, t in enumerate(toks):
            label = "⏎" if t == "\n" else ("EOS" if t == "</s>" else t.strip())
            ax.text(j, i, label, ha="center", va="center", fontsize=7)
            if side == "rejected" and c.first_error is not None and steps[j] == c.first_error:
                ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, ec="black", lw=1.6))
        shown["rows"].append({"model": kind, "side": side, "correct": c.correct, "first_error": c.first_error,
                              "text": response_text(toks)})
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([f"{NAMES[k]}: {'correct' if s == 'chosen' else 'incorrect'}" for k, s, *_ in rows])
    ax.set_xticks([])
    prompt = rows[0][4].strip()
    ax.set_title(f"token credits (z-scored per model) for \"{prompt}\"; black boxes: first wrong step", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.025, pad=0.01, label="credit (std units)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    shown["prompt"] = prompt
    return shown


def plot_timings(rep: dict, path: str) -> str:
    plt = _plt()
    items = [(k, v) for k, v in rep["timings_s"].items() if isinstance(v, (int, float))]
    fig, ax = plt.subplots(figsize=(7, 0.32 * len(items) + 1.2))
    ax.barh([k for k, _ in items][::-1], [v for _, v in items][::-1], color="tab:gray")
    ax.set_xlabel("seconds (as first run; a resumed stage keeps its first time)")
    ax.set_title(f"phase timings, total {sum(v for _, v in items):.0f} s")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- markdown
def _fmt(x, pct: bool = False) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{100 * x:.1f}%" if pct else f"{x:.3f}"


def render_markdown(rep: dict, plots: dict, example: Optional[dict]) -> str:
    cfg = rep["config"]
    lines = ["# `qrm demo` report", ""]
    lines += ["Synthetic chained-arithmetic task (`megatron_qrm/demo/task.py`): the prompt lists a start number and "
              f"{cfg['task']['min_steps']}-{cfg['task']['max_steps']} operations, the response writes one step per "
              "line and `Answer: N`. The checker knows the first wrong step of any response.", ""]
    d = rep["data"]
    lines += [f"* Policy: a {cfg['num_layers']}-layer Megatron GPT, hidden {cfg['hidden_size']}, trained from "
              f"scratch by SFT on {d.get('sft_examples')} demonstrations ({d.get('sft_flawed')} of them flawed on "
              f"purpose); Pass@1 of the SFT policy: **{_fmt(rep['sft']['pass@1'])}** (greedy: "
              f"{_fmt(rep['sft']['greedy_pass@1'])}).",
              ]
    for name in ("train", "heldout"):
        s = rep["pairs"].get(name) or {}
        lines.append(f"* Preference pairs ({name}): {s.get('pairs')} pairs from {s.get('prompts')} prompts x "
                     f"{s.get('samples_per_prompt')} SFT samples ({_fmt(s.get('all_samples_accuracy'), True)} of the "
                     f"samples correct), correct = chosen, incorrect = rejected.")
    lines += ["", "## Reward models", "",
              "| reward model | pairwise accuracy (held-out) | (train) | lowest-credit step = first wrong step | chance |",
              "|---|---|---|---|---|"]
    for kind, r in rep["reward_models"].items():
        loc = rep["localization"].get(kind, {})
        lk = _fmt(loc.get("hit_rate"), True) + (" (no token credit)" if kind == "orm" else "")
        lines.append(f"| {NAMES[kind]} | {_fmt(r['heldout_accuracy'], True)} ({r['heldout_pairs']} pairs) | "
                     f"{_fmt(r['train_accuracy'], True)} | {lk} | {_fmt(loc.get('chance'), True)} |")
    q = rep["localization"].get("qrm")
    if q:
        others = [(k, v) for k, v in rep["localization"].items() if k != "orm"]
        lines += ["", f"Localisation is measured on the {q['responses']} incorrect responses of the held-out pairs "
                  f"({q['skipped']} skipped: their first wrong step is not one of their `a op b = c` steps, i.e. only "
                  "the answer line is wrong or a line is missing). A step's credit is the credit of its result, the number "
                  "after `=` (the lowest credit among its tokens): the one thing in a step the policy computes; the "
                  "operands and operator are copies, identical in a pair's two responses, so no reward-model loss pins "
                  "their credit down. Other rules: the first step whose result credit is at or below the midpoint of "
                  "the response's highest and lowest (a Q-function stays low on every step after the first error, so "
                  "its lowest step need not be the first wrong one): "
                  + ", ".join(f"{NAMES[k]} {_fmt(v.get('hit_rate_first_low'), True)}" for k, v in others)
                  + "; the lowest mean credit over all of a step's tokens (copies and newline included): "
                  + ", ".join(f"{NAMES[k]} {_fmt(v.get('hit_rate_mean'), True)}" for k, v in others)
                  + "; the lowest min over them: "
                  + ", ".join(f"{NAMES[k]} {_fmt(v.get('hit_rate_min'), True)}" for k, v in others) + "."]
        lines += ["", "How the credit moves around the first wrong step (mean result credit in standard units, over the "
                  "same responses; 0 = the first wrong step), and how often the lowest step lies at or after it:", "",
                  "| reward model | -2 | -1 | first wrong step | +1 | +2 | lowest step at/after the error | chance |",
                  "|---|---|---|---|---|---|---|---|"]
        for k, v in others:
            prof = v.get("profile") or {}
            lines.append(f"| {NAMES[k]} | " + " | ".join(_fmt(prof.get(o)) for o in ("-2", "-1", "0", "+1", "+2"))
                         + f" | {_fmt(v.get('lowest_at_or_after_error'), True)} | "
                         f"{_fmt(v.get('lowest_at_or_after_error_chance'), True)} |")
    lines += ["", f"![reward models]({os.path.basename(plots['reward_models'])})", ""]
    if plots.get("token_credits"):
        lines += ["## Token credits of one held-out pair", "",
                  "Green = high credit, red = low (z-scored per model over the two responses); the black boxes mark "
                  "the first wrong step of the incorrect response. The pair is the first held-out pair whose "
                  "incorrect response goes wrong before its answer line (chosen without looking at the credits).", "",
                  f"![token credits]({os.path.basename(plots['token_credits'])})", ""]
    lines += ["## RL: Pass@1 after every iteration", "",
              f"{cfg['rl_iters']} iterations of {cfg['rl_rollout']} prompts each (one sample per prompt, T = 1). After "
              f"every iteration, on {d.get('test_prompts')} test prompts: **Pass@1** = the share of correct responses "
              f"among {cfg['eval_samples']} samples per prompt at T = 1 (the unbiased Pass@1 estimate; the same "
              "sampling seed at every evaluation), and greedy Pass@1 (T = 0, the reference code's protocol; at this "
              "scale the SFT policy is often already right greedily: its mistakes are sampled ones, learnt from the "
              "flawed demonstrations). Iteration 0 is the SFT policy.", ""]
    for algo, runs in rep["rl"].items():
        if not runs:
            continue
        n = max(len(r["pass@1"]) for r in runs.values())
        lines += [f"**{ALGO_NAMES.get(algo, algo)}**", "",
                  "| reward model | " + " | ".join(f"it {i}" for i in range(n)) + " | best | iterations to ORM's best |",
                  "|---|" + "---|" * (n + 2)]
        for kind, r in runs.items():
            its = r.get("iterations_to_orm_best")
            its = "n/a" if r.get("target_orm_best") is None else ("not reached" if its is None else str(its))
            lines.append(f"| {NAMES[kind]} | " + " | ".join(_fmt(x) for x in r["pass@1"]) +
                         f" | {_fmt(r['best_pass@1'])} | {its} |")
        t = next(iter(runs.values())).get("target_orm_best")
        lines += ["", "Iterations to ORM's best: the first RL iteration at which a method reaches the best Pass@1 "
                  "the ORM run reaches (" + (f"{t:.3f}" if t is not None else "n/a: the ORM run never beats the SFT "
                  "policy") + ").", ""]
        lines += ["Greedy Pass@1:", "", "| reward model | " + " | ".join(f"it {i}" for i in range(n)) + " |",
                  "|---|" + "---|" * n]
        for kind, r in runs.items():
            lines.append(f"| {NAMES[kind]} | " + " | ".join(_fmt(x) for x in r.get("greedy_pass@1", [])) + " |")
        lines += ["", "Share of correct sampled responses in each iteration's rollout (the reward actually earned):", "",
                  "| reward model | " + " | ".join(f"it {i}" for i in range(1, n)) + " |", "|---|" + "---|" * (n - 1)]
        for kind, r in runs.items():
            lines.append(f"| {NAMES[kind]} | " + " | ".join(_fmt(x) for x in r["rollout_accuracy"][1:]) + " |")
        lines.append("")
    lines += [f"![Pass@1]({os.path.basename(plots['pass_at_1'])})", "", "## Phase timings", "",
              "| stage | seconds |", "|---|---|"]
    for k, v in rep["timings_s"].items():
        lines.append(f"| {k} | {v:.1f} |" if isinstance(v, (int, float)) else f"| {k} | n/a |")
    total = sum(v for v in rep["timings_s"].values() if isinstance(v, (int, float)))
    lines += [f"| **total** | {total:.1f} |", "", f"![timings]({os.path.basename(plots['timings'])})", "",
              "All numbers are also in `report.json`. A toy scale: a few hundred thousand parameters, minutes of CPU; "
              "see `docs/toy-study.md` for what holds over several seeds."]
    return "\n".join(lines) + "\n"


def _sanitize(obj):
    """JSON-safe copy: non-finite floats become None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _sanitize(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_sanitize(v) for v in obj]
    return obj


def write_report(cfg, p, results: dict) -> dict:
    rep = build_report(cfg, p, results)
    plots = {"pass_at_1": plot_pass_at_1(rep, p("pass_at_1.png")),
             "reward_models": plot_reward_models(rep, p("reward_models.png")),
             "timings": plot_timings(rep, p("timings.png"))}
    example = plot_token_credits(p, list(cfg.rm_kinds), p("token_credits.png"))
    if example:
        plots["token_credits"] = p("token_credits.png")
    rep["plots"] = plots
    rep["token_credit_example"] = example
    rep = _sanitize(rep)
    with open(p("report.json"), "w") as f:
        json.dump(rep, f, indent=2)
    with open(p("report.md"), "w") as f:
        f.write(render_markdown(rep, plots, example))
    return rep
