"""`qrm check-answers`: judge the final answers of an existing JSONL file of responses against gold labels.

    qrm check-answers --task gsm8k --data test_pairwise.jsonl --labels gsm8k/test.jsonl --field rejected
    qrm check-answers --task math --data samples.jsonl --checker strict --output judged.jsonl

The response text is read from ``--field`` (a string, or a list of strings: several samples of one prompt,
each judged; ``--pass-at-k`` then adds unbiased Pass@k). The label is the row's ``label`` field or, when the
row has none, the label of the row of ``--labels`` with the same ``instruction``. The last line printed is a
JSON object: ``task``, ``checker``, ``total``, ``correct``, ``unparsable``, ``accuracy`` (counts are over
responses). ``--output`` writes one JSON line per input row with its predictions and judgements.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
from typing import Iterator, Optional

from megatron_qrm.errors import UserError, UserFileNotFoundError
from megatron_qrm.evaluation.answers import CHECKERS, MATH_BACKENDS, TASKS, judge, math_verify_available

COMMAND = "check-answers"


class AnswerFileError(UserError):
    """Malformed input; the message starts with ``file:line``."""


def _open_text(path: str):
    if not os.path.exists(path):
        raise UserFileNotFoundError(f"{path}: no such file")
    if path.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def iter_jsonl(path: str) -> Iterator[tuple[str, int, dict]]:
    """``(location, line number, record)`` for every non-blank line of a JSONL (or .jsonl.gz) file."""
    with _open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            loc = f"{path}:{lineno}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise AnswerFileError(f"{loc}: invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(rec, dict):
                raise AnswerFileError(f"{loc}: expected a JSON object, got {type(rec).__name__}")
            yield loc, lineno, rec


def _label_text(value, loc: str, field: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise AnswerFileError(f"{loc}: '{field}' must be a string or a number, got {type(value).__name__}")
    text = str(value)
    if not text.strip():
        raise AnswerFileError(f"{loc}: empty '{field}'")
    return text


def load_label_map(path: str, instruction_field: str = "instruction", label_field: str = "label"
                   ) -> dict[str, tuple[str, str]]:
    """``instruction -> (label, location)`` from a JSONL file; conflicting duplicates are an error."""
    out: dict[str, tuple[str, str]] = {}
    for loc, _, rec in iter_jsonl(path):
        if instruction_field not in rec:
            raise AnswerFileError(f"{loc}: no '{instruction_field}' field")
        if rec.get(label_field) is None:
            raise AnswerFileError(f"{loc}: no '{label_field}' field")
        instr = rec[instruction_field]
        if not isinstance(instr, str):
            raise AnswerFileError(f"{loc}: '{instruction_field}' must be a string")
        label = _label_text(rec[label_field], loc, label_field)
        if instr in out and out[instr][0] != label:
            raise AnswerFileError(f"{loc}: instruction already labelled {out[instr][0]!r} at {out[instr][1]}, "
                                  f"here {label!r}")
        out.setdefault(instr, (label, loc))
    return out


def _responses(value, loc: str, field: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return value
    raise AnswerFileError(f"{loc}: '{field}' must be a string or a non-empty list of strings")


def check_answers(data: str, task: str, field: str = "chosen", checker: str = "reference",
                  labels: Optional[str] = None, output: Optional[str] = None, math_backend: str = "auto",
                  pass_at_k: Optional[list[int]] = None, instruction_field: str = "instruction",
                  label_field: str = "label") -> dict:
    """Judge every response of ``data``; returns the summary dict (see the module doc)."""
    if task not in TASKS:
        raise UserError(f"--task must be one of {', '.join(TASKS)}")
    if checker not in CHECKERS:
        raise UserError(f"--checker must be one of {', '.join(CHECKERS)}")
    if math_backend not in MATH_BACKENDS:
        raise UserError(f"--math-backend must be one of {', '.join(MATH_BACKENDS)}")
    if math_backend == "math_verify" and not math_verify_available():
        raise UserError("--math-backend math_verify: the package math-verify is not importable")
    label_map = load_label_map(labels, instruction_field, label_field) if labels else None
    stripped_map = {k.strip(): v for k, v in label_map.items()} if label_map else None

    rows_out: list[dict] = []
    per_row: list[list[bool]] = []
    total = correct = unparsable = 0
    for loc, lineno, rec in iter_jsonl(data):
        if field not in rec:
            raise AnswerFileError(f"{loc}: no '{field}' field (choose the response field with --field)")
        responses = _responses(rec[field], loc, field)
        instr = rec.get(instruction_field)
        if rec.get(label_field) is not None:
            label = _label_text(rec[label_field], loc, label_field)
        elif label_map is None:
            raise AnswerFileError(f"{loc}: no '{label_field}' field; pass --labels FILE to join labels by "
                                  f"'{instruction_field}'")
        elif not isinstance(instr, str):
            raise AnswerFileError(f"{loc}: no '{label_field}' field and no '{instruction_field}' to join on")
        else:
            hit = label_map.get(instr) or stripped_map.get(instr.strip())
            if hit is None:
                raise AnswerFileError(f"{loc}: instruction has no label in {labels}: {instr[:80]!r}")
            label = hit[0]
        js = [judge(r, label, task, checker, math_backend) for r in responses]
        flags = [j.correct for j in js]
        per_row.append(flags)
        total += len(js)
        correct += sum(flags)
        unparsable += sum(not j.parsable for j in js)
        if output:
            single = isinstance(rec[field], str)
            rows_out.append({"line": lineno, "instruction": instr, "label": label,
                             "prediction": js[0].prediction if single else [j.prediction for j in js],
                             "correct": flags[0] if single else flags})
    if total == 0:
        raise AnswerFileError(f"{data}: no records")

    summary = {"task": task, "checker": checker, "field": field, "data": data, "rows": len(per_row),
               "total": total, "correct": correct, "unparsable": unparsable, "accuracy": correct / total}
    if task == "math" and checker == "strict":
        summary["math_backend"] = ("math_verify" if math_verify_available() else "sympy") \
            if math_backend == "auto" else math_backend
    if pass_at_k:
        from megatron_qrm.evaluation.passk import pass_at_k_from_judgements

        fewest = min(len(r) for r in per_row)
        bad = [k for k in pass_at_k if not 1 <= k <= fewest]
        if bad:
            raise UserError(f"--pass-at-k {bad[0]}: every row needs at least k responses (fewest: {fewest})")
        summary["pass_at_k"] = {str(k): v for k, v in pass_at_k_from_judgements(per_row, pass_at_k).items()}
    if output:
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
        with open(output, "w", encoding="utf-8") as f:
            for row in rows_out:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return summary


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``check-answers`` on an ``argparse`` subparsers object."""
    p = subparsers.add_parser(COMMAND, help="judge the final answers of a JSONL file of responses (GSM8K/MATH)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", required=True, choices=TASKS)
    p.add_argument("--data", required=True, help="JSONL (or .jsonl.gz) with the responses")
    p.add_argument("--labels", help="JSONL with 'instruction' and 'label', joined by instruction to rows of "
                                    "--data that have no label")
    p.add_argument("--field", default="chosen", help="field holding the response text (default: chosen)")
    p.add_argument("--checker", choices=CHECKERS, default="reference",
                   help="reference: the Q-RM code's rules (MATH: lenient substring test); strict: numeric / "
                        "mathematical equivalence (default: reference)")
    p.add_argument("--math-backend", choices=MATH_BACKENDS, default="auto",
                   help="strict MATH equivalence: math_verify, the built-in sympy parser, or auto (math_verify "
                        "when importable)")
    p.add_argument("--pass-at-k", type=int, nargs="+", metavar="K",
                   help="also report unbiased Pass@K over the responses of each row (field holds lists)")
    p.add_argument("--instruction-field", default="instruction")
    p.add_argument("--label-field", default="label")
    p.add_argument("--output", help="write per-row judgements here as JSONL")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    summary = check_answers(args.data, args.task, field=args.field, checker=args.checker, labels=args.labels,
                            output=args.output, math_backend=args.math_backend, pass_at_k=args.pass_at_k,
                            instruction_field=args.instruction_field, label_field=args.label_field)
    print(json.dumps(summary), flush=True)
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    """Standalone entry: ``python -m megatron_qrm.evaluation.check_answers --task ... --data ...``."""
    parser = argparse.ArgumentParser(prog="qrm")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args([COMMAND] + list(sys.argv[1:] if argv is None else argv))
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        from megatron_qrm.errors import print_error_line

        print_error_line(f"qrm {COMMAND}: error: {e}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
