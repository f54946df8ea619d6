"""`qrm make-pairs`: sampled responses + gold labels -> deduplicated preference pairs.

The paper built its GSM8K/MATH preference sets this way (``docs/method.md`` §1): sample many
responses per training question, judge each final answer, pair every correct response (chosen) with
every incorrect one (rejected) of the same question, filter and deduplicate.

Input: JSONL rows with ``instruction`` and the responses in ``--response-field`` (a string, or a list of
strings: several samples of one prompt; rows may repeat a prompt). The gold answer is the row's
``label`` or, when it has none, the ``label`` of the row of ``--labels`` with the same instruction.
Judges: any task of :func:`megatron_qrm.evaluation.tasks.task_judges` -- ``gsm8k`` / ``math``
(``--checker reference|strict``, the RL issue's checkers) or a registered task such as the demo's
``arith``.

Output: JSONL ``{instruction, chosen, rejected, label}``, at most ``--max-pairs-per-prompt`` per prompt
(a seeded random subset of all correct x incorrect combinations); responses are deduplicated per prompt
(after stripping surrounding whitespace) before pairing. The summary (counts) is printed as JSON.
"""

from __future__ import annotations

import json
import os
import random
from typing import Optional

from megatron_qrm.errors import UserError


def load_responses(path: str, response_field: str = "responses", instruction_field: str = "instruction",
                   label_field: str = "label", labels: Optional[str] = None) -> dict[str, dict]:
    """``instruction -> {"label", "responses" (in file order, duplicates kept)}``."""
    from megatron_qrm.evaluation.check_answers import AnswerFileError, _label_text, iter_jsonl, load_label_map

    label_map = load_label_map(labels, instruction_field, label_field) if labels else None
    out: dict[str, dict] = {}
    for loc, _, rec in iter_jsonl(path):
        instr = rec.get(instruction_field)
        if not isinstance(instr, str):
            raise AnswerFileError(f"{loc}: no string '{instruction_field}' field")
        if response_field not in rec:
            raise AnswerFileError(f"{loc}: no '{response_field}' field (choose it with --response-field)")
        value = rec[response_field]
        if isinstance(value, str):
            responses = [value]
        elif isinstance(value, list) and all(isinstance(v, str) for v in value):
            responses = list(value)
        else:
            raise AnswerFileError(f"{loc}: '{response_field}' must be a string or a list of strings")
        if rec.get(label_field) is not None:
            label = _label_text(rec[label_field], loc, label_field)
        elif label_map is not None:
            hit = label_map.get(instr) or label_map.get(instr.strip())
            if hit is None:
                raise AnswerFileError(f"{loc}: instruction has no label in {labels}: {instr[:80]!r}")
            label = hit[0]
        else:
            raise AnswerFileError(f"{loc}: no '{label_field}' field; pass --labels FILE to join labels by "
                                  f"'{instruction_field}'")
        entry = out.setdefault(instr, {"label": label, "responses": [], "location": loc})
        if entry["label"] != label:
            raise AnswerFileError(f"{loc}: label {label!r} differs from {entry['label']!r} given at "
                                  f"{entry['location']} for the same instruction")
        entry["responses"].extend(responses)
    return out


def make_pairs(groups: dict[str, dict], task: str, checker: Optional[str] = None,
               max_pairs_per_prompt: Optional[int] = None, seed: int = 0) -> tuple[list[dict], dict]:
    """Pairs and a summary from :func:`load_responses`' groups."""
    from megatron_qrm.evaluation.tasks import task_judges

    judges = task_judges(task)
    if checker is None:
        checker = next(iter(judges))
    if checker not in judges:
        raise UserError(f"--checker {checker!r}: task {task!r} has {', '.join(judges)}")
    judge = judges[checker]
    rng = random.Random(seed)
    stats = {"task": task, "checker": checker, "prompts": len(groups), "responses": 0, "unique_responses": 0,
             "correct": 0, "incorrect": 0, "unparsable": 0, "prompts_with_pairs": 0, "pairs": 0}
    rows: list[dict] = []
    for instr, g in groups.items():
        stats["responses"] += len(g["responses"])
        seen: set[str] = set()
        good: list[str] = []
        bad: list[str] = []
        for r in g["responses"]:
            key = r.strip()
            if not key or key in seen:
                continue
            seen.add(key)
            ok, parsable = judge(r, g["label"])
            stats["unparsable"] += int(not parsable)
            (good if ok else bad).append(r)
        stats["unique_responses"] += len(seen)
        stats["correct"] += len(good)
        stats["incorrect"] += len(bad)
        combos = [(c, r) for c in good for r in bad]
        if max_pairs_per_prompt is not None and len(combos) > max_pairs_per_prompt:
            combos = rng.sample(combos, max_pairs_per_prompt)
        if combos:
            stats["prompts_with_pairs"] += 1
        for c, r in combos:
            rows.append({"instruction": instr, "chosen": c, "rejected": r, "label": g["label"]})
    stats["pairs"] = len(rows)
    return rows, stats


def write_jsonl(path: str, rows: list[dict]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def run_make_pairs(args) -> int:
    groups = load_responses(args.responses, args.response_field, args.instruction_field, args.label_field,
                            args.labels)
    rows, stats = make_pairs(groups, args.task, args.checker, args.max_pairs_per_prompt, args.seed)
    write_jsonl(args.output, rows)
    stats["output"] = args.output
    print(json.dumps(stats), flush=True)
    return 0
