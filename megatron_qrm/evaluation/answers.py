"""Final-answer extraction and correctness checks for GSM8K and MATH.

Two checkers:

``reference``
    The rules of the Q-RM reference code, reproduced from their description (``docs/method.md`` §6)
    (not from its source). GSM8K: the last number of the last line that holds a number, compared as a string
    after deleting commas and a trailing ``.0…0``. MATH: the content of the last ``boxed``, lightly normalised,
    judged correct when it is a *substring* of the lightly normalised label. The substring test is lenient on
    purpose (a prediction ``1`` matches the label ``10``); use it to reproduce the paper's numbers.

``strict``
    GSM8K: the same "last number" extraction, with full thousands groups (``1,450,000``), compared numerically
    (relative tolerance 1e-6, so ``18.50`` equals ``18.5``). MATH: the same ``boxed`` extraction, a fuller
    normalisation of both sides, then exact equality of the normalised strings, else mathematical equivalence
    with `math_verify` when it is importable (package ``math-verify``), else with a small built-in LaTeX parser
    on SymPy (integers, decimals, ``\\frac``, ``\\sqrt``, ``\\pi``, powers, simple polynomials, tuples,
    intervals, unions, comma lists, ``pmatrix`` vectors). Never a substring test.

Public API: :func:`extract_answer`, :func:`is_correct`, :func:`judge`, :func:`judge_many`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Iterable, Optional, Sequence

from megatron_qrm.errors import UserError

TASKS = ("gsm8k", "math")
CHECKERS = ("reference", "strict")
MATH_BACKENDS = ("auto", "math_verify", "sympy")


def _check_task(task: str) -> str:
    t = task.lower()
    if t not in TASKS:
        raise UserError(f"unknown task {task!r}: expected one of {', '.join(TASKS)}")
    return t


def _check_checker(checker: str) -> str:
    if checker not in CHECKERS:
        raise UserError(f"unknown checker {checker!r}: expected one of {', '.join(CHECKERS)}")
    return checker


# ============================================================================ GSM8K
_NUMBER_WORDS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve")
_NUMBER_WORD_RE = re.compile(r"\b(" + "|".join(_NUMBER_WORDS) + r")\b", re.IGNORECASE)
# reference number pattern: optional minus, digits, at most one ",digits" group, optional decimal part
_GSM8K_NUMBER_RE = re.compile(r"-?\d+(?:,\d+)?(?:\.\d+)?")
# strict pattern: any number of thousands groups ("1,450,000"), else plain digits
_GSM8K_STRICT_NUMBER_RE = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
_CONCLUSION_RE = re.compile(r"(?:Therefore|therefore|So|so)")
_TRAILING_ZEROS_RE = re.compile(r"\.0+$")


def replace_number_words(text: str) -> str:
    """``one`` … ``twelve`` (any case, whole words) → ``1`` … ``12``."""
    return _NUMBER_WORD_RE.sub(lambda m: str(_NUMBER_WORDS.index(m.group(1).lower()) + 1), text)


def _gsm8k_last_number(text: str, number_re: re.Pattern) -> Optional[str]:
    answer = None
    for line in replace_number_words(text).split("\n"):
        numbers: list[str] = []
        m = _CONCLUSION_RE.search(line)
        if m is not None:  # the numbers after the first Therefore/So of the line ...
            numbers = number_re.findall(line[m.end():])
        if not numbers:  # ... else every number of the line
            numbers = number_re.findall(line)
        if numbers:
            answer = numbers[-1]
    return answer


def normalize_gsm8k(answer: str) -> str:
    """Reference normalisation: delete commas and a trailing ``.0…0`` (``"1,200.00"`` → ``"1200"``)."""
    return _TRAILING_ZEROS_RE.sub("", answer.replace(",", ""))


def _parse_number(s: str) -> Optional[Fraction]:
    """A GSM8K answer or label as an exact number ("1,450,000", "$18", "18.50", "-3"), or None."""
    s = s.strip().replace(",", "").lstrip("$").strip()
    if not re.fullmatch(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)", s):
        return None
    return Fraction(s)


def numbers_close(a, b, rel_tol: float = 1e-6) -> bool:
    """Equal within ``rel_tol`` relative, except that two integers must be exactly equal (no tolerance may
    equate 1000000 and 1000001)."""
    a, b = Fraction(a), Fraction(b)
    if a == b:
        return True
    if a.denominator == 1 and b.denominator == 1:
        return False
    return abs(a - b) <= rel_tol * max(abs(a), abs(b))


# ============================================================================ MATH: extraction
def _match_brace(s: str, open_idx: int) -> int:
    """Index of the ``}`` closing the ``{`` at ``open_idx``, or -1."""
    depth = 0
    for i in range(open_idx, len(s)):
        c = s[i]
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i
    return -1


def last_boxed(text: str) -> Optional[str]:
    """Content after the last ``boxed``: the braced group (nested braces kept) or, without a brace, the text up
    to the next ``$`` (or the end). An unclosed brace (a truncated response) yields everything after it, as
    the reference code does. ``None`` without any ``boxed``."""
    idx = text.rfind("boxed")
    if idx < 0:
        return None
    rest = text[idx + len("boxed"):]
    if rest.startswith("{"):
        end = _match_brace(rest, 0)
        return rest[1:] if end < 0 else rest[1:end]
    dollar = rest.find("$")
    return rest if dollar < 0 else rest[:dollar]


# ============================================================================ MATH: reference normalisation
def _remove_braced_command(s: str, command: str) -> str:
    """Delete every ``\\command{…}`` (with its brace-matched argument)."""
    out, i = [], 0
    while True:
        j = s.find(command + "{", i)
        if j < 0:
            out.append(s[i:])
            return "".join(out)
        end = _match_brace(s, j + len(command))
        if end < 0:  # unclosed: leave the rest alone
            out.append(s[i:])
            return "".join(out)
        out.append(s[i:j])
        i = end + 1


_LEADING_ASSIGNMENT_RE = re.compile(r"^[A-Za-z]=")


def normalize_math_prediction(pred: str) -> str:
    """Reference normalisation of an extracted MATH prediction (the reference's steps, in this order)."""
    s = pred.replace(" ", "")
    s = s.replace("\\mathbf", "")
    if s.startswith("\\text"):
        s = s[len("\\text"):]
    s = _LEADING_ASSIGNMENT_RE.sub("", s)
    for token in ("\\left", "\\right", "\\!", "\\%", "\\$"):
        s = s.replace(token, "")
    s = _remove_braced_command(s, "\\text")
    s = s.replace("^\\circ", "").replace("^{\\circ}", "")
    s = _remove_braced_command(s, "\\mbox")
    s = s.replace("\\\\", "\\")
    if s.endswith("\\"):
        s = s[:-1]
    return s.replace("dfrac", "frac").replace("tfrac", "frac")


_MBOX_WORD_RE = re.compile(r"\\mbox\{[^{}]*\}")


def normalize_math_label(label: str) -> str:
    """Reference normalisation of a MATH label (the reference's steps)."""
    s = re.sub(r"\s+", "", label).replace("\\!", "")
    s = s.replace("dfrac", "frac").replace("tfrac", "frac")
    s = _MBOX_WORD_RE.sub("", s)
    return s.replace("\\left", "").replace("\\right", "")


# ============================================================================ MATH: strict normalisation
_UNIT_WORDS = (
    "degrees", "degree", "cm", "centimeters", "meters", "meter", "m", "km", "inches", "inch", "feet", "foot",
    "ft", "units", "unit", "square", "sq", "cubic", "dollars", "dollar", "cents", "cent", "hours", "hour",
    "minutes", "minute", "seconds", "second", "days", "day", "miles", "mile", "mph", "pounds", "ounces",
)


def _unwrap_braced_command(s: str, command: str) -> str:
    """Replace every ``\\command{X}`` by ``X``."""
    while True:
        j = s.find(command + "{")
        if j < 0:
            return s
        end = _match_brace(s, j + len(command))
        if end < 0:
            return s
        s = s[:j] + s[j + len(command) + 1:end] + s[end + 1:]


def _strip_outer_braces(s: str) -> str:
    while len(s) >= 2 and s[0] == "{" and _match_brace(s, 0) == len(s) - 1:
        s = s[1:-1]
    return s


def _fix_frac_shorthand(s: str) -> str:
    r"""``\frac12`` → ``\frac{1}{2}``, ``\frac1{2}`` → ``\frac{1}{2}``, ``\sqrt2`` → ``\sqrt{2}``."""
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac(\d)\{", r"\\frac{\1}{", s)
    s = re.sub(r"\\frac\{([^{}]*)\}(\d)", r"\\frac{\1}{\2}", s)
    return re.sub(r"\\sqrt(\d)", r"\\sqrt{\1}", s)


def normalize_math_strict(ans: str) -> str:
    """A fuller, symmetric normalisation for the strict checker (applied to prediction and label alike)."""
    s = ans.strip()
    s = re.sub(r"\\(?:displaystyle|mathrm\b|mathbf\b|boldsymbol\b)", "", s)
    s = s.replace("\\left", "").replace("\\right", "").replace("\\bigl", "").replace("\\bigr", "")
    for token in ("\\!", "\\,", "\\;", "\\:", "\\ ", "~", "\\quad", "\\qquad"):
        s = s.replace(token, " " if token in ("\\quad", "\\qquad") else "")
    s = s.replace("\\%", "").replace("%", "").replace("\\$", "").replace("$", "")
    s = re.sub(r"\^\s*\{?\s*\\circ\s*\}?", "", s).replace("\\circ", "")
    s = re.sub(r"\\[dtc]frac", r"\\frac", s)
    # units written as text after a quantity ("5\text{ cm}", "10 \mbox{ inches}") are dropped, other text
    # is unwrapped ("\text{(A)}" -> "(A)")
    unit_re = r"(?:\\text|\\mbox|\\textbf)\{\s*(?:" + "|".join(_UNIT_WORDS) + r")(?:\^\{?[23]\}?)?\s*\}"
    s = re.sub(unit_re, "", s)
    # any other words in \text after a quantity at the end: "9\text{p.m.}", "2\text{ radians}"
    s = re.sub(r"(?<=[\d}])\s*\\(?:text|mbox|textbf|mathrm)\{\s*[A-Za-z][A-Za-z .]*\}(?:\^\{?[23]\}?)?\s*$", "", s)
    for cmd in ("\\text", "\\textbf", "\\mbox", "\\mathrm", "\\mathbf", "\\operatorname"):
        s = _unwrap_braced_command(s, cmd)
    s = re.sub(r"\s+", "", s).replace("{,}", ",")
    s = s.rstrip(".").rstrip("\\")
    s = _strip_outer_braces(s)
    # a leading "x=" / "x \in" names the variable, not the answer
    s = re.sub(r"^[A-Za-z](?:_\{?\w+\}?)?(?:=|\\in)(?!=)", "", s)
    s = s.replace("\\\\", "\\")  # a double backslash becomes one, as in the MATH labels (matrix rows "7\-2")
    s = _fix_frac_shorthand(s)
    # thousands separators in a lone number: "15,000" -> "15000" (a list "1,2" is left alone)
    if re.fullmatch(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?", s):
        s = s.replace(",", "")
    # trailing zeros of a lone decimal: "2.50" -> "2.5", "3.0" -> "3"
    if re.fullmatch(r"-?\d+\.\d*", s):
        s = s.rstrip("0").rstrip(".") or "0"
    if s.startswith("."):
        s = "0" + s
    return s


# ============================================================================ MATH: small LaTeX -> SymPy parser
class _ParseError(Exception):
    pass


_TOKEN_RE = re.compile(r"\d+\.\d*|\.\d+|\d+|\\[A-Za-z]+|\\[{}]|[A-Za-z]|[-+*/^(){}\[\]!,|]")
_FUNCS = {"sin", "cos", "tan", "cot", "sec", "csc", "ln", "log", "exp", "arcsin", "arccos", "arctan"}
_TIMES = {"*", "\\cdot", "\\times"}
_MAX_EXPR_LEN = 400


class _LatexExprParser:
    """Recursive descent over simple LaTeX: numbers, single-letter symbols, + - * / ^ !, implicit products,
    parentheses, braces, \\frac, \\sqrt[n]{}, \\pi, \\infty, \\e, a few functions. Builds SymPy objects; raises
    :class:`_ParseError` on anything else (never evaluates text)."""

    def __init__(self, text: str):
        import sympy

        self.sp = sympy
        pos, toks = 0, []
        text = text.replace(" ", "")
        while pos < len(text):
            m = _TOKEN_RE.match(text, pos)
            if m is None:
                raise _ParseError(f"unexpected {text[pos]!r}")
            toks.append(m.group(0))
            pos = m.end()
        self.toks, self.i = toks, 0

    def peek(self) -> Optional[str]:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def take(self, expected: Optional[str] = None) -> str:
        t = self.peek()
        if t is None or (expected is not None and t != expected):
            raise _ParseError(f"expected {expected or 'a token'}, got {t!r}")
        self.i += 1
        return t

    def parse(self):
        e = self.expr()
        if self.peek() is not None:
            raise _ParseError(f"trailing {self.peek()!r}")
        return e

    def expr(self):
        if self.peek() in ("+", "-"):
            sign = self.take()
            e = self.term()
            e = -e if sign == "-" else e
        else:
            e = self.term()
        while self.peek() in ("+", "-"):
            op = self.take()
            t = self.term()
            e = e + t if op == "+" else e - t
        return e

    def _starts_atom(self, t: Optional[str]) -> bool:
        if t is None:
            return False
        if t[0].isdigit() or t[0] == "." or t.isalpha() or t in ("(", "{", "["):
            return True
        return t.startswith("\\") and t not in _TIMES and t != "\\div" and t not in ("\\{", "\\}")

    def term(self):
        e = self.unary()
        while True:
            t = self.peek()
            if t in _TIMES:
                self.take()
                e = e * self.unary()
            elif t in ("/", "\\div"):
                self.take()
                e = e / self.unary()
            elif self._starts_atom(t) and t != "[":
                e = e * self.power()  # implicit product: "2x", "3\sqrt{2}", "2(x+1)"
            else:
                return e

    def unary(self):
        if self.peek() == "-":
            self.take()
            return -self.unary()
        if self.peek() == "+":
            self.take()
            return self.unary()
        return self.power()

    def power(self):
        base = self.postfix()
        if self.peek() == "^":
            self.take()
            if self.peek() == "{":
                exp = self.group()
            elif self.peek() == "-":
                self.take()
                exp = -self.postfix()
            else:
                exp = self.postfix()
            if exp.is_Number and abs(exp) > 10000:  # do not let "10^{10^{10}}" evaluate
                raise _ParseError("exponent too large")
            return self.sp.Pow(base, exp)
        return base

    def postfix(self):
        e = self.atom()
        while self.peek() == "!":
            self.take()
            if not e.is_Integer or not 0 <= e <= 10000:
                raise _ParseError("factorial of a large or non-integer number")
            e = self.sp.factorial(e)
        return e

    def _numeric_frac_follows(self) -> bool:
        t = self.toks[self.i:self.i + 7]
        return (len(t) == 7 and t[1] == "{" and t[2].isdigit() and t[3] == "}" and t[4] == "{"
                and t[5].isdigit() and t[6] == "}")

    def group(self):
        self.take("{")
        e = self.expr()
        self.take("}")
        return e

    def atom(self):
        sp = self.sp
        t = self.take()
        if t[0].isdigit() or t[0] == ".":
            value = sp.Rational(t) if "." in t else sp.Integer(t)
            if t.isdigit() and self.peek() == "\\frac" and self._numeric_frac_follows():
                self.take()  # a mixed number: "1\frac{1}{4}" is 1 + 1/4
                return value + self.group() / self.group()
            return value
        if t.isalpha():
            return sp.Symbol(t)
        if t == "(":
            e = self.expr()
            self.take(")")
            return e
        if t == "{":
            e = self.expr()
            self.take("}")
            return e
        if t == "\\frac":
            num = self.group() if self.peek() == "{" else self.atom()
            den = self.group() if self.peek() == "{" else self.atom()
            return num / den
        if t == "\\sqrt":
            if self.peek() == "[":
                self.take("[")
                n = self.expr()
                self.take("]")
                arg = self.group() if self.peek() == "{" else self.atom()
                return sp.root(arg, n)
            return sp.sqrt(self.group() if self.peek() == "{" else self.atom())
        if t == "\\pi":
            return sp.pi
        if t == "\\infty":
            return sp.oo
        if t[1:] in _FUNCS:
            fn = {"ln": sp.log, "log": sp.log, "exp": sp.exp}.get(t[1:]) or getattr(sp, t[1:])
            if self.peek() == "(":
                self.take("(")
                arg = self.expr()
                self.take(")")
            else:  # "\\sin3x" is sin(3x): an implicit product up to the next operator or function
                arg = self.power()
                while self._starts_atom(self.peek()) and self.peek() != "[" and self.peek()[1:] not in _FUNCS:
                    arg = arg * self.power()
            return fn(arg)
        raise _ParseError(f"unsupported {t!r}")


def _split_top_level(s: str, sep: str = ",") -> list[str]:
    parts, depth, cur = [], 0, []
    for c in s:
        if c in "({[":
            depth += 1
        elif c in ")}]":
            depth -= 1
        if c == sep and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(c)
    parts.append("".join(cur))
    return parts


@dataclass
class _Struct:
    """A parsed answer: a scalar, an ordered tuple/interval (with its brackets), a union, or an unordered list."""

    kind: str  # "scalar" | "seq" | "union" | "list"
    value: object = None
    items: list = field(default_factory=list)
    brackets: str = ""


def _parse_struct(s: str) -> _Struct:
    if len(s) > _MAX_EXPR_LEN:
        raise _ParseError("too long")
    m = re.fullmatch(r"\\begin\{[pb]matrix\}(.*)\\end\{[pb]matrix\}", s)
    if m:
        rows = [r for r in re.split(r"\\(?![A-Za-z])", m.group(1)) if r != ""]
        # a matrix is a sequence of rows: a column vector differs from a row vector
        return _Struct("seq", brackets="matrix", items=[
            _Struct("seq", items=[_parse_struct(c) for c in r.split("&")], brackets="row") for r in rows])
    union = s.split("\\cup")
    if len(union) > 1:
        return _Struct("union", items=[_parse_struct(u) for u in union])
    if len(s) >= 2 and s[0] in "([" and s[-1] in ")]":
        inner = s[1:-1]
        parts = _split_top_level(inner)
        balanced = all(p.count("(") + p.count("[") == p.count(")") + p.count("]") for p in parts)
        if len(parts) > 1 and balanced:
            return _Struct("seq", items=[_parse_struct(p) for p in parts], brackets=s[0] + s[-1])
    if s.startswith("\\{") and s.endswith("\\}"):
        return _Struct("list", items=[_parse_struct(p) for p in _split_top_level(s[2:-2])])
    parts = _split_top_level(s)
    if len(parts) > 1:
        return _Struct("list", items=[_parse_struct(p) for p in parts])
    if s == "":
        raise _ParseError("empty")
    return _Struct("scalar", value=_LatexExprParser(s).parse())


def _scalars_equal(a, b, rel_tol: float = 1e-6) -> bool:
    import sympy as sp

    try:
        if a == b:
            return True
        if a.free_symbols or b.free_symbols:
            if a.free_symbols != b.free_symbols:
                return False
            return sp.simplify(sp.expand(a - b)) == 0
        if a.has(sp.oo, -sp.oo, sp.zoo) or b.has(sp.oo, -sp.oo, sp.zoo):
            return False
        if a.is_Rational and b.is_Rational:  # exact numbers: no tolerance ("19941989" != "19941993")
            return False
        va, vb = complex(sp.N(a, 30)), complex(sp.N(b, 30))
        if not (math.isfinite(abs(va)) and math.isfinite(abs(vb))):
            return False
        return abs(va - vb) <= rel_tol * max(abs(va), abs(vb)) or abs(va - vb) <= 1e-12
    except Exception:  # noqa: BLE001 - sympy raises many types on odd input; odd input is "not equal"
        return False


def _to_set(x: _Struct):
    import sympy as sp

    if x.kind == "union":
        return sp.Union(*[_to_set(i) for i in x.items])
    if x.kind == "seq" and len(x.items) == 2 and all(i.kind == "scalar" for i in x.items):
        lo, hi = x.items[0].value, x.items[1].value
        if lo.free_symbols or hi.free_symbols:
            raise _ParseError("symbolic interval")
        return sp.Interval(lo, hi, left_open=x.brackets[0] == "(", right_open=x.brackets[1] == ")")
    raise _ParseError("not a set")


def _structs_equal(a: _Struct, b: _Struct) -> bool:
    if "union" in (a.kind, b.kind):  # compare as sets: "[1,3)\cup[3,9]" is "[1,9]"
        try:
            if _to_set(a) == _to_set(b):
                return True
        except Exception:  # noqa: BLE001 - not intervals: fall through to the structural comparison
            pass
    if a.kind != b.kind:
        return False
    if a.kind == "scalar":
        return _scalars_equal(a.value, b.value)
    if len(a.items) != len(b.items):
        return False
    if a.kind == "seq":
        return a.brackets == b.brackets and all(_structs_equal(x, y) for x, y in zip(a.items, b.items))
    # union and list: order-free matching
    remaining = list(b.items)
    for x in a.items:
        for j, y in enumerate(remaining):
            if _structs_equal(x, y):
                del remaining[j]
                break
        else:
            return False
    return True


_CHOICE_RE = re.compile(r"\(?([A-Z]+)\)?")


def sympy_equivalent(pred: str, label: str) -> bool:
    """Equivalence of two strictly normalised MATH answers with the built-in parser (False when either side
    does not parse)."""
    cp, cl = _CHOICE_RE.fullmatch(pred), _CHOICE_RE.fullmatch(label)
    if cp or cl:  # multiple-choice letters ("(C)", "ACF"): the letters themselves, in order
        return bool(cp and cl) and cp.group(1) == cl.group(1)
    try:
        if pred.count("=") != label.count("="):
            if "=" in label:
                return False
            pred = pred.rsplit("=", 1)[1]  # a worked result "1+7=8": its final value
        return all(_structs_equal(_parse_struct(p), _parse_struct(g))
                   for p, g in zip(pred.split("="), label.split("=")))
    except (_ParseError, RecursionError, ValueError, TypeError, ZeroDivisionError):
        return False
    except Exception:  # noqa: BLE001
        return False


# ---------------------------------------------------------------------------- math_verify (optional)
_MATH_VERIFY = None  # None: not tried; False: unavailable; else the (parse, verify) pair


def math_verify_available() -> bool:
    global _MATH_VERIFY
    if _MATH_VERIFY is None:
        try:
            from math_verify import parse, verify  # type: ignore

            _MATH_VERIFY = (parse, verify)
        except Exception:  # noqa: BLE001 - missing package or a broken install: fall back to sympy
            _MATH_VERIFY = False
    return _MATH_VERIFY is not False


def _math_verify_equivalent(pred: str, label: str) -> bool:
    import threading

    parse, verify = _MATH_VERIFY  # type: ignore[misc]
    # math_verify's timeouts use SIGALRM, which only works in the main thread
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    try:
        gold = parse("$" + label + "$", parsing_timeout=timeout)
        answer = parse("$" + pred + "$", parsing_timeout=timeout)
        if not gold or not answer:
            return False
        return bool(verify(gold, answer, timeout_seconds=timeout))
    except Exception:  # noqa: BLE001
        return False


def math_strict_equivalent(pred: str, label: str, backend: str = "auto") -> bool:
    """Strict MATH equivalence of an extracted prediction and a label (both raw)."""
    if backend not in MATH_BACKENDS:
        raise UserError(f"unknown backend {backend!r}: expected one of {', '.join(MATH_BACKENDS)}")
    p, g = normalize_math_strict(pred), normalize_math_strict(label)
    if not p:
        return False
    if p == g:
        return True
    use_mv = backend == "math_verify" or (backend == "auto" and math_verify_available())
    if use_mv:
        if not math_verify_available():
            raise RuntimeError("backend 'math_verify' requested but the package math-verify is not importable")
        return _math_verify_equivalent(p, g)
    return sympy_equivalent(p, g)


# ============================================================================ public API
def extract_answer(text: str, task: str, checker: str = "reference") -> Optional[str]:
    """The final answer in a response, or ``None`` when none can be found.

    GSM8K: the last number of the last line holding a number (after "Therefore"/"So" when the line has one),
    number words one…twelve read as digits. MATH: the content of the last ``boxed``. ``checker="strict"`` only
    changes the GSM8K number pattern (full thousands groups). The answer is returned as written (not
    normalised)."""
    task = _check_task(task)
    _check_checker(checker)
    if text is None:
        return None
    if task == "gsm8k":
        return _gsm8k_last_number(text, _GSM8K_STRICT_NUMBER_RE if checker == "strict" else _GSM8K_NUMBER_RE)
    return last_boxed(text)


@dataclass
class Judgement:
    prediction: Optional[str]  # the extracted answer, None when unparsable
    correct: bool

    @property
    def parsable(self) -> bool:
        return self.prediction is not None


def judge(response: str, label: str, task: str, checker: str = "reference", math_backend: str = "auto") -> Judgement:
    """Extract the answer of ``response`` and compare it with ``label``."""
    task = _check_task(task)
    _check_checker(checker)
    label = "" if label is None else str(label)
    pred = extract_answer(response, task, checker)
    if pred is None:
        return Judgement(None, False)
    if task == "gsm8k":
        if checker == "reference":
            return Judgement(pred, normalize_gsm8k(pred) == normalize_gsm8k(label))
        a, b = _parse_number(pred), _parse_number(label)
        return Judgement(pred, a is not None and b is not None and numbers_close(a, b))
    if checker == "reference":
        p = normalize_math_prediction(pred)
        return Judgement(pred, bool(p) and p in normalize_math_label(label))
    return Judgement(pred, math_strict_equivalent(pred, label, backend=math_backend))


def is_correct(response: str, label: str, task: str, checker: str = "reference", math_backend: str = "auto") -> bool:
    """Whether ``response`` reaches ``label`` (see the module doc for the two checkers)."""
    return judge(response, label, task, checker, math_backend).correct


@dataclass
class JudgeResult:
    """Per-response judgements and their counts."""

    correct: list[bool]
    predictions: list[Optional[str]]

    # it also reads as the list of booleans
    def __len__(self) -> int:
        return len(self.correct)

    def __iter__(self):
        return iter(self.correct)

    def __getitem__(self, i):
        return self.correct[i]

    @property
    def total(self) -> int:
        return len(self.correct)

    @property
    def num_correct(self) -> int:
        return sum(self.correct)

    @property
    def unparsable(self) -> int:
        return sum(p is None for p in self.predictions)

    @property
    def accuracy(self) -> float:
        return self.num_correct / self.total if self.total else 0.0

    def summary(self) -> dict:
        return {"total": self.total, "correct": self.num_correct, "unparsable": self.unparsable,
                "accuracy": self.accuracy}


def judge_many(responses: Sequence[str], labels: Sequence[str], task: str, checker: str = "reference",
               math_backend: str = "auto") -> JudgeResult:
    """Judge ``responses[i]`` against ``labels[i]``. ``result.correct`` is the list of booleans;
    ``result.unparsable`` counts responses without an extractable answer (they are judged wrong)."""
    if len(responses) != len(labels):
        raise ValueError(f"{len(responses)} responses but {len(labels)} labels")
    js = [judge(r, l, task, checker, math_backend) for r, l in zip(responses, labels)]
    return JudgeResult([j.correct for j in js], [j.prediction for j in js])


def count_correct(judgements: Iterable[bool]) -> int:
    return sum(bool(j) for j in judgements)


__all__ = [
    "TASKS", "CHECKERS", "MATH_BACKENDS", "Judgement", "JudgeResult", "extract_answer", "judge", "is_correct",
    "judge_many", "normalize_gsm8k", "normalize_math_prediction", "normalize_math_label", "normalize_math_strict",
    "last_boxed", "replace_number_words", "math_strict_equivalent", "sympy_equivalent", "math_verify_available",
]
