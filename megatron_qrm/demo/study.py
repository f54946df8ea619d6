"""`qrm demo --study --seeds N`: the demo's comparison repeated over several seeds, aggregated.

Each seed is a full, independent demo run (its own data, tokenizer, SFT policy, pairs, reward models
and RL runs) under ``OUT/seed_<s>`` (resumable like a single demo). The aggregate, in ``OUT/study.md``,
``OUT/study.json`` and ``OUT/study_pass_at_1.png``, gives mean +- standard deviation over seeds of:
the reward models' held-out pairwise accuracy and credit localisation (vs chance), Pass@1 per RL
iteration for every (algorithm, reward model), and the iterations each method needs to reach the best
Pass@1 the ORM run of the same seed reaches (the paper's "converges 12x faster than ORM", at toy scale).
"""

from __future__ import annotations

import json
import math
import os
import statistics
from typing import Callable, Optional

from megatron_qrm.demo.pipeline import DemoConfig, run_demo, say
from megatron_qrm.demo.report import ALGO_NAMES, NAMES, _sanitize, plot_pass_at_1_curves


def _ms(xs: list) -> tuple[Optional[float], Optional[float], int]:
    v = [x for x in xs if isinstance(x, (int, float)) and math.isfinite(x)]
    if not v:
        return None, None, 0
    return statistics.fmean(v), (statistics.stdev(v) if len(v) > 1 else 0.0), len(v)


def _fmt_ms(xs: list, pct: bool = False) -> str:
    m, s, n = _ms(xs)
    if m is None:
        return "n/a"
    return f"{100 * m:.1f} ± {100 * s:.1f}%" if pct else f"{m:.3f} ± {s:.3f}"


def aggregate(reports: dict[int, dict]) -> dict:
    seeds = sorted(reports)
    first = reports[seeds[0]]
    agg: dict = {"seeds": seeds, "reward_models": {}, "localization": {}, "rl": {}, "sft_pass@1": [],
                 "total_seconds": []}
    for s in seeds:
        r = reports[s]
        agg["sft_pass@1"].append(r["sft"]["pass@1"])
        agg["total_seconds"].append(sum(v for v in r["timings_s"].values() if isinstance(v, (int, float))))
    for kind in first["reward_models"]:
        agg["reward_models"][kind] = {"heldout_accuracy": [reports[s]["reward_models"][kind]["heldout_accuracy"]
                                                           for s in seeds]}
    for kind in first["localization"]:
        agg["localization"][kind] = {k: [reports[s]["localization"][kind][k] for s in seeds]
                                     for k in ("hit_rate", "hit_rate_first_low", "hit_rate_mean", "chance")}
    for algo, runs in first["rl"].items():
        agg["rl"][algo] = {}
        for kind in runs:
            curves = [reports[s]["rl"][algo][kind]["pass@1"] for s in seeds]
            n = min(len(c) for c in curves)
            agg["rl"][algo][kind] = {
                "pass@1_per_seed": curves,
                "pass@1_mean": [_ms([c[i] for c in curves])[0] for i in range(n)],
                "pass@1_std": [_ms([c[i] for c in curves])[1] for i in range(n)],
                "final_pass@1": [c[-1] for c in curves],
                "gain_over_sft": [c[-1] - c[0] for c in curves if c[0] is not None and c[-1] is not None],
                "iterations_to_orm_best": [reports[s]["rl"][algo][kind].get("iterations_to_orm_best") for s in seeds],
                "target_orm_best": [reports[s]["rl"][algo][kind].get("target_orm_best") for s in seeds],
            }
    return agg


def plot_study(agg: dict, path: str) -> str:
    curves = {algo: {kind: (run["pass@1_mean"], run["pass@1_std"]) for kind, run in runs.items()}
              for algo, runs in agg["rl"].items()}
    return plot_pass_at_1_curves(curves, f"{{algo}}: Pass@1, mean ± sd over {len(agg['seeds'])} seeds",
                                 "Pass@1 (T = 1)", path)


def render_study(agg: dict, command: str) -> str:
    seeds = agg["seeds"]
    L = [f"# `qrm demo --study`: {len(seeds)} seeds ({', '.join(map(str, seeds))})", "",
         f"Command: `{command}`", "", "Mean ± standard deviation over seeds.", "",
         f"* SFT policy Pass@1: {_fmt_ms(agg['sft_pass@1'])}",
         f"* wall time per seed: {_fmt_ms(agg['total_seconds'])} s", "",
         "## Reward models", "",
         "Localisation: how often the step with the lowest credit (of its result, the number after `=`) is the first "
         "wrong step of a held-out incorrect response; first-low: the first step whose result credit is at or below "
         "the midpoint of the response's highest and lowest; mean rule: the lowest mean credit over all of a "
         "step's tokens. See `megatron_qrm/demo/localization.py`.", "",
         "| reward model | held-out pairwise accuracy | localisation | (first-low rule) | (mean rule) | chance |",
         "|---|---|---|---|---|---|"]
    for kind, r in agg["reward_models"].items():
        loc = agg["localization"].get(kind, {})
        L.append(f"| {NAMES[kind]} | {_fmt_ms(r['heldout_accuracy'], True)} | "
                 f"{_fmt_ms(loc.get('hit_rate', []), True)}{' (chance: no token credit)' if kind == 'orm' else ''} | "
                 f"{_fmt_ms(loc.get('hit_rate_first_low', []), True)} | {_fmt_ms(loc.get('hit_rate_mean', []), True)} | "
                 f"{_fmt_ms(loc.get('chance', []), True)} |")
    L += ["", "## RL", ""]
    for algo, runs in agg["rl"].items():
        n = min(len(r["pass@1_mean"]) for r in runs.values())
        L += [f"**{ALGO_NAMES.get(algo, algo)}**: Pass@1 by iteration (mean ± sd)", "",
              "| reward model | " + " | ".join(f"it {i}" for i in range(n)) + " | final - SFT |",
              "|---|" + "---|" * (n + 1)]
        for kind, r in runs.items():
            cells = [f"{m:.3f} ± {s:.3f}" if m is not None else "n/a" for m, s in zip(r["pass@1_mean"], r["pass@1_std"])]
            L.append(f"| {NAMES[kind]} | " + " | ".join(cells) + f" | {_fmt_ms(r['gain_over_sft'])} |")
        L += ["", "Iterations to reach the ORM run's best Pass@1 (per seed; `-` = not reached, n/a = the ORM run never "
              "beat the SFT policy):", "", "| reward model | " + " | ".join(f"seed {s}" for s in seeds) + " |",
              "|---|" + "---|" * len(seeds)]
        for kind, r in runs.items():
            cells = []
            for its, tgt in zip(r["iterations_to_orm_best"], r["target_orm_best"]):
                cells.append("n/a" if tgt is None else ("-" if its is None else str(its)))
            L.append(f"| {NAMES[kind]} | " + " | ".join(cells) + " |")
        L.append("")
    L += ["![Pass@1 over seeds](study_pass_at_1.png)", ""]
    return "\n".join(L)


def run_study(cfg_for_seed: Callable[[int], DemoConfig], out: str, seeds: list[int], command: str = "") -> dict:
    reports = {}
    for i, s in enumerate(seeds, 1):
        say(f"study: seed {s} ({i}/{len(seeds)})")
        reports[s] = run_demo(cfg_for_seed(s), os.path.join(out, f"seed_{s}"))
    agg = aggregate(reports)
    agg["plot"] = plot_study(agg, os.path.join(out, "study_pass_at_1.png"))
    agg["command"] = command
    with open(os.path.join(out, "study.json"), "w") as f:
        json.dump(_sanitize(agg), f, indent=2)
    with open(os.path.join(out, "study.md"), "w") as f:
        f.write(render_study(agg, command))
    say(f"study report: {os.path.join(os.path.abspath(out), 'study.md')}")
    return agg
