"""Tests for megatron_qrm.evaluation: answer extraction, the reference and strict checkers, Pass@k and the
`check-answers` command.

Hand-written cases cover every rule of the reference checker (docs/method.md §6); the released pairwise test files (when the
shared data folder is present) check the counts the reference code is documented to give (787/0, 2291/105).
"""

from __future__ import annotations

import itertools
import json
import os
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from megatron_qrm.evaluation import answers as A
from megatron_qrm.evaluation.answers import extract_answer, is_correct, judge_many
from megatron_qrm.evaluation.check_answers import main as check_answers_main
from megatron_qrm.evaluation.passk import mean_pass_at_k, pass_at_k, pass_at_k_from_judgements

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("QRM_SHARED_DATA", str(REPO.parent / "shared" / "data")))


def _rows(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _need_shared(*parts: str) -> Path:
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"shared data not found at {p} (set QRM_SHARED_DATA to the folder holding gsm8k/ and math/)")
    return p


# =========================================================================== GSM8K, reference rule
class TestGsm8kReference:
    def test_number_words_become_digits(self):
        assert A.replace_number_words("One apple, TWELVE pears and eleven plums") == "1 apple, 12 pears and 11 plums"
        # whole words only
        assert A.replace_number_words("someone often tone") == "someone often tone"
        assert extract_answer("She has seven apples left.", "gsm8k") == "7"
        assert is_correct("So she keeps twelve.", "12", "gsm8k")

    def test_last_line_with_a_number_wins(self):
        text = "First 3 + 4 = 7.\nThen 7 * 2 = 14.\nThat is the end, no numbers here."
        assert extract_answer(text, "gsm8k") == "14"

    def test_last_number_of_the_line(self):
        assert extract_answer("He pays 5 + 6 = 11 dollars", "gsm8k") == "11"

    def test_therefore_and_so_lines(self):
        # the numbers after Therefore/So in a line are collected; the line's answer is the last of them
        assert extract_answer("We had 4 boxes.\nTherefore, 4 boxes hold 32 eggs.", "gsm8k") == "32"
        assert extract_answer("so the total is 9", "gsm8k") == "9"
        assert extract_answer("Step 2 gives 8, so 8 + 1 = 9 and that's it", "gsm8k") == "9"
        # a later line without a number does not erase the answer
        assert extract_answer("Therefore the answer is 18.\nSo that's the answer!", "gsm8k") == "18"
        # a later line with a number overwrites it, even after Therefore
        assert extract_answer("Therefore 18.\nCheck: 2 * 9 = 18, 1 extra", "gsm8k") == "1"

    def test_commas_and_trailing_zeros(self):
        assert A.normalize_gsm8k("1,200.00") == "1200"
        assert A.normalize_gsm8k("18.0") == "18"
        assert A.normalize_gsm8k("18.50") == "18.50"  # only a trailing .0…0 goes
        assert is_correct("The total is $1,200.", "1200", "gsm8k")
        assert is_correct("The total is 1200", "1,200", "gsm8k")
        assert is_correct("It costs 25.00 dollars", "25", "gsm8k")
        assert is_correct("It costs 18.0", "18", "gsm8k")

    def test_string_equality_not_numeric(self):
        assert not is_correct("It costs 18.50", "18.5", "gsm8k")
        assert is_correct("It costs $18", "18", "gsm8k")
        assert not is_correct("It costs 19", "18", "gsm8k")

    def test_number_pattern(self):
        assert extract_answer("Temperature drops to -5 degrees", "gsm8k") == "-5"
        assert extract_answer("pay 3.75 each", "gsm8k") == "3.75"
        # at most one ",digits" group: "1,450,000" reads as "1,450" then "000"
        assert extract_answer("costs 1,450,000", "gsm8k") == "000"
        assert not is_correct("costs 1,450,000", "1,450,000", "gsm8k")

    def test_unparsable(self):
        assert extract_answer("I do not know.", "gsm8k") is None
        assert not is_correct("I do not know.", "0", "gsm8k")


# =========================================================================== MATH, reference rule
class TestMathReference:
    def test_last_boxed_with_nested_braces(self):
        text = r"First $\boxed{2}$, finally $\boxed{\frac{\sqrt{3}}{2}}$."
        assert extract_answer(text, "math") == r"\frac{\sqrt{3}}{2}"

    def test_boxed_without_brace_reads_to_dollar(self):
        assert extract_answer(r"so $\boxed 5$.", "math") == " 5"
        assert is_correct(r"so $\boxed 5$.", "5", "math")
        assert extract_answer(r"\boxed 7 at the end", "math") == " 7 at the end"

    def test_unclosed_brace_takes_the_rest(self):
        assert extract_answer(r"answer $\boxed{\frac{7}{5}+i", "math") == r"\frac{7}{5}+i"

    def test_no_boxed(self):
        assert extract_answer("The answer is 5.", "math") is None
        assert not is_correct("The answer is 5.", "5", "math")

    def test_prediction_normalisation(self):
        n = A.normalize_math_prediction
        assert n(r"\dfrac{1}{2}") == r"\frac{1}{2}"
        assert n(r"\tfrac{1}{2}") == r"\frac{1}{2}"
        assert n(r"x = 5") == "5"
        assert n(r"\left( 1, 2 \right)") == "(1,2)"
        assert n(r"5 \text{ cm}") == "5"
        assert n(r"\text{(A)}") == "{(A)}"  # a leading \text goes first, its argument stays
        assert n(r"30^\circ") == "30"
        assert n(r"50\%") == "50"
        assert n(r"\$4.50") == "4.50"
        assert n(r"10\mbox{ inches}") == "10"
        assert n(r"10,\!000") == "10,000"
        assert n(r"\mathbf{v}") == "{v}"
        assert n("a\\\\b") == "a\\b"
        assert n("5\\") == "5"

    def test_label_normalisation(self):
        n = A.normalize_math_label
        assert n(r"\dfrac{3}{ 4 }") == r"\frac{3}{4}"
        assert n(r"10,\!000") == "10,000"
        assert n(r"\left[ 0, 1 \right)") == "[0,1)"
        assert n(r"12\mbox{ feet}") == "12"

    def test_matches(self):
        assert is_correct(r"$\boxed{\dfrac{1}{2}}$", r"\frac{1}{2}", "math")
        assert is_correct(r"$\boxed{\frac{1}{2}}$", r"\tfrac12".replace("12", "{1}{2}"), "math")
        assert is_correct(r"$\boxed{\text{(C)}}$", "{(C)}", "math")
        assert is_correct(r"$\boxed{\left( 2, 3 \right)}$", "(2,3)", "math")
        assert is_correct(r"$\boxed{x = 70}$", "70", "math")
        assert is_correct(r"$\boxed{5 \text{ inches}}$", "5", "math")
        assert not is_correct(r"$\boxed{3}$", "4", "math")

    def test_substring_leniency(self):
        # on purpose: the reference accepts any non-empty prediction that is a substring of the label
        assert is_correct(r"$\boxed{1}$", "10", "math")
        assert is_correct(r"$\boxed{-}$", r"-\frac{3}{2}", "math")
        assert not is_correct(r"$\boxed{10}$", "1", "math")
        assert not is_correct(r"$\boxed{\text{}}$", "10", "math")  # empty after normalisation


# =========================================================================== strict checker
class TestStrict:
    def test_gsm8k_numeric(self):
        assert is_correct("It costs 18.50", "18.5", "gsm8k", checker="strict")
        assert is_correct("It costs $1,450,000.", "1450000", "gsm8k", checker="strict")
        assert is_correct("Total: 2,125", "2,125", "gsm8k", checker="strict")
        assert not is_correct("It costs 19", "18", "gsm8k", checker="strict")
        # integers are never equated by the tolerance
        assert not is_correct("1000001", "1000000", "gsm8k", checker="strict")
        assert A.numbers_close(Fraction("1000000.5"), Fraction("1000000.6"))
        assert not A.numbers_close(Fraction("1.5"), Fraction("1.6"))
        assert extract_answer("costs 1,450,000", "gsm8k", checker="strict") == "1,450,000"

    @pytest.mark.parametrize("backend", ["sympy", "math_verify"])
    def test_math_equivalence(self, backend):
        if backend == "math_verify" and not A.math_verify_available():
            pytest.skip("math-verify is not installed")

        def ok(pred, label):
            return is_correct(rf"Therefore, the answer is $\boxed{{{pred}}}$.", label, "math", "strict", backend)

        assert not ok("1", "10")  # the substring leniency is gone
        assert not ok("0", "10")
        assert ok(r"\dfrac{1}{2}", r"\frac{1}{2}")
        assert ok("0.5", r"\frac{1}{2}")
        assert ok(r"\frac{2}{4}", r"\frac{1}{2}")
        assert ok(r"\frac{1}{\sqrt{2}}", r"\frac{\sqrt{2}}{2}")
        assert ok(r"\frac{4\pi}{3}", r"\frac{4}{3}\pi")
        assert ok("2,450", "2450")
        assert ok(r"x = 5", "5")
        assert ok(r"(1, \frac{9}{2})", r"(1,\frac{9}{2})")
        assert not ok("(1,2)", "(2,1)")
        assert ok(r"[1,3)\cup[3,9]", "[1,9]")
        assert not ok("[1,9)", "[1,9]")
        assert ok("7(x-3)(x+3)", "7(x+3)(x-3)")
        assert not ok("7(x-3)(x+2)", "7(x+3)(x-3)")
        assert ok(r"\begin{pmatrix} 7 \\ -2 \end{pmatrix}", r"\begin{pmatrix}7\-2\end{pmatrix}")
        assert not ok(r"\begin{pmatrix} 7 \\ 2 \end{pmatrix}", r"\begin{pmatrix}7\-2\end{pmatrix}")
        assert not ok("19941993", "19941989")
        assert not ok(r"1\frac{11}{15}", r"\frac{11}{15}")  # a mixed number is 1 + 11/15

    def test_math_builtin_parser_details(self):
        eq = A.sympy_equivalent
        assert eq(r"1\frac{1}{4}", r"\frac{5}{4}")
        assert not eq("1/4", r"1\frac{1}{4}")
        assert eq(r"\sin3x", r"\sin(3x)")
        assert eq("-2,6", "6,-2")  # a list of solutions is unordered
        assert eq("(C)", "C") and not eq("FCA", "ACF")
        assert eq(r"\sqrt[3]{8}", "2")
        assert eq("2^{10}", "1024")
        assert eq("5!", "120")
        assert not eq(r"10^{10^{10}}", "1")  # refused, not evaluated
        assert not eq(r"\unknown{3}", "3")
        assert eq(r"(-\infty,0)\cup(0,\infty)", r"(-\infty,0)\cup(0,\infty)")

    def test_strict_normalisation(self):
        n = A.normalize_math_strict
        assert n(r"9\text{p.m.}") == "9"
        assert n(r"2 \text{ radians}") == "2"
        assert n(r"\text{(A)}") == "(A)"
        assert n(r"15,000") == "15000"
        assert n("2.50") == "2.5"
        assert n(r"34{,}650") == "34650"
        assert n(r"x \in [-2,7]") == "[-2,7]"
        assert n(r"\frac12") == r"\frac{1}{2}"


# =========================================================================== API
def test_judge_many_counts_unparsable():
    res = judge_many(["So 5.", "no idea", "So 7."], ["5", "5", "5"], "gsm8k")
    assert res.correct == [True, False, False]
    assert res.predictions == ["5", None, "7"]
    assert (res.total, res.num_correct, res.unparsable) == (3, 1, 1)
    assert res.summary()["accuracy"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError):
        judge_many(["a"], [], "gsm8k")
    with pytest.raises(ValueError):
        is_correct("1", "1", "svamp")
    with pytest.raises(ValueError):
        is_correct("1", "1", "gsm8k", checker="loose")


# =========================================================================== released pairwise files
def _gsm8k_pairs():
    labels = {r["instruction"]: r["label"] for r in _rows(_need_shared("gsm8k", "test.jsonl"))}
    pairs = _rows(_need_shared("gsm8k", "test_pairwise.jsonl"))
    return pairs, [labels[p["instruction"]] for p in pairs]


@pytest.mark.parametrize("checker", ["reference", "strict"])
def test_gsm8k_pairwise_file(checker):
    pairs, labels = _gsm8k_pairs()
    assert len(pairs) == 787
    chosen = judge_many([p["chosen"] for p in pairs], labels, "gsm8k", checker)
    rejected = judge_many([p["rejected"] for p in pairs], labels, "gsm8k", checker)
    assert chosen.num_correct == 787 and chosen.unparsable == 0
    assert rejected.num_correct == 0


def test_math_pairwise_file_reference():
    pairs = _rows(_need_shared("math", "test_pairwise.jsonl"))
    labels = [p["label"] for p in pairs]
    assert len(pairs) == 2291
    assert judge_many([p["chosen"] for p in pairs], labels, "math").num_correct == 2291
    assert judge_many([p["rejected"] for p in pairs], labels, "math").num_correct == 105


def test_math_pairwise_file_strict():
    pairs = _rows(_need_shared("math", "test_pairwise.jsonl"))
    labels = [p["label"] for p in pairs]
    chosen = judge_many([p["chosen"] for p in pairs], labels, "math", "strict", math_backend="sympy")
    rejected = judge_many([p["rejected"] for p in pairs], labels, "math", "strict", math_backend="sympy")
    assert chosen.num_correct == 2291
    # 54 with sympy 1.14: "rejected" answers equal in value to the label ("2,450" vs "2450", "1/sqrt(2)" vs
    # "sqrt(2)/2", unreduced fractions); the file's pairs were split by string match, not by value
    assert 30 <= rejected.num_correct < 105
    ref = judge_many([p["rejected"] for p in pairs], labels, "math")
    lenient_only = sum(r and not s for r, s in zip(ref.correct, rejected.correct))
    assert lenient_only >= 50  # the substring matches ("1" for "12", truncated "(2" for "(2,4)") are gone


# =========================================================================== Pass@k
def _brute_pass_at_k(n: int, c: int, k: int) -> Fraction:
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return Fraction(sum(any(samples[i] for i in s) for s in subsets), len(subsets))


def test_pass_at_k_matches_brute_force():
    cases = [(n, c, k) for n in range(1, 9) for c in range(n + 1) for k in range(1, n + 1)]
    got = pass_at_k([x[0] for x in cases], [x[1] for x in cases], [x[2] for x in cases])
    want = np.array([float(_brute_pass_at_k(*x)) for x in cases])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


def test_pass_at_k_shapes_and_helpers():
    assert float(pass_at_k(10, 3, 1)) == pytest.approx(0.3)
    assert float(pass_at_k(200, 0, 100)) == 0.0 and float(pass_at_k(200, 101, 100)) == 1.0
    out = pass_at_k(np.array([[4, 4], [8, 8]]), np.array([[1, 2], [0, 8]]), 2)
    assert out.shape == (2, 2)
    assert mean_pass_at_k([4, 4], [1, 0], 1) == pytest.approx(0.125)
    assert pass_at_k_from_judgements([[1, 0, 0, 0], [0, 0]], [1, 2]) == {1: pytest.approx(0.125),
                                                                      2: pytest.approx(0.25)}
    for bad in [(3, 4, 1), (3, 1, 4), (3, 1, 0), (3, -1, 1)]:
        with pytest.raises(ValueError):
            pass_at_k(*bad)


# =========================================================================== check-answers command
def _write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def _last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_cli_labels_joined_and_output(tmp_path, capsys):
    labels = _write_jsonl(tmp_path / "test.jsonl", [{"instruction": "q1", "label": "18"},
                                                   {"instruction": "q2", "label": "1,200"}])
    data = _write_jsonl(tmp_path / "pairs.jsonl", [
        {"instruction": "q1", "chosen": "Therefore she makes $18.", "rejected": "She makes 20."},
        {"instruction": "q2", "chosen": "It is 1,200.", "rejected": "I cannot tell."},
    ])
    out = tmp_path / "judged.jsonl"
    assert check_answers_main(["--task", "gsm8k", "--data", str(data), "--labels", str(labels),
                               "--output", str(out)]) == 0
    s = _last_json(capsys)
    assert (s["total"], s["correct"], s["unparsable"], s["accuracy"], s["checker"], s["task"]) == \
        (2, 2, 0, 1.0, "reference", "gsm8k")
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert rows[0] == {"line": 1, "instruction": "q1", "label": "18", "prediction": "18", "correct": True}
    assert check_answers_main(["--task", "gsm8k", "--data", str(data), "--labels", str(labels),
                               "--field", "rejected", "--checker", "strict"]) == 0
    s = _last_json(capsys)
    assert (s["total"], s["correct"], s["unparsable"], s["checker"]) == (2, 0, 1, "strict")


def test_cli_label_field_lists_and_pass_at_k(tmp_path, capsys):
    data = _write_jsonl(tmp_path / "samples.jsonl", [
        {"instruction": "a", "label": "10", "samples": [r"$\boxed{1}$", r"$\boxed{10}$", "none"]},
        {"instruction": "b", "label": r"\frac{1}{2}", "samples": [r"$\boxed{0.5}$", r"$\boxed{2}$", r"$\boxed{3}$"]},
    ])
    args = ["--task", "math", "--data", str(data), "--field", "samples", "--pass-at-k", "1", "3"]
    assert check_answers_main(args) == 0
    s = _last_json(capsys)
    # the lenient rule: "1" is in "10", and "2" is in "\frac{1}{2}"
    assert (s["total"], s["correct"], s["unparsable"]) == (6, 3, 1)
    assert s["pass_at_k"]["1"] == pytest.approx((2 / 3 + 1 / 3) / 2)
    assert check_answers_main(args + ["--checker", "strict", "--math-backend", "sympy"]) == 0
    s = _last_json(capsys)
    assert (s["correct"], s["math_backend"]) == (2, "sympy")  # 10 and 0.5
    assert s["pass_at_k"] == {"1": pytest.approx(1 / 3), "3": pytest.approx(1.0)}


def test_cli_errors_name_file_and_line(tmp_path, capsys):
    labels = _write_jsonl(tmp_path / "labels.jsonl", [{"instruction": "q1", "label": "3"}])
    cases = [
        ([{"instruction": "q1", "label": "3", "chosen": "3"}, "{not json"], [], ":2: invalid JSON"),
        ([{"instruction": "q1", "chosen": "3"}], [], ":1: no 'label' field; pass --labels"),
        ([{"instruction": "q1", "chosen": "3"}, {"instruction": "q9", "chosen": "3"}], ["--labels", str(labels)],
         ":2: instruction has no label"),
        ([{"instruction": "q1", "label": "3"}], [], ":1: no 'chosen' field"),
        ([{"instruction": "q1", "label": "", "chosen": "3"}], [], ":1: empty 'label'"),
        ([[1, 2]], [], ":1: expected a JSON object"),
    ]
    for i, (rows, extra, message) in enumerate(cases):
        data = _write_jsonl(tmp_path / f"bad{i}.jsonl", rows)
        assert check_answers_main(["--task", "gsm8k", "--data", str(data)] + extra) == 2
        err = capsys.readouterr().err
        assert f"bad{i}.jsonl{message}" in err, err
    assert check_answers_main(["--task", "gsm8k", "--data", str(tmp_path / "missing.jsonl")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_cli_on_released_gsm8k_file(capsys):
    data, labels = _need_shared("gsm8k", "test_pairwise.jsonl"), _need_shared("gsm8k", "test.jsonl")
    assert check_answers_main(["--task", "gsm8k", "--data", str(data), "--labels", str(labels)]) == 0
    s = _last_json(capsys)
    assert (s["total"], s["correct"], s["unparsable"]) == (787, 787, 0)
