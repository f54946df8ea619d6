#!/usr/bin/env bash
# Check the project against a newer megatron-core than CI's (CI: Python 3.11, torch 2.13.0 CPU,
# megatron-core 0.16.1). Builds -- or reuses -- a Python 3.12 virtual environment with megatron-core
# MCORE_VERSION, installs the project into it (editable, with the test extra) and runs the chosen subset
# of the suite under it:
#
#   model builder + token head against a hand-written forward, TP=2 / PP=2 invariance of loss, gradients
#   and one DistributedOptimizer step (tests/test_model_parallel.py); the reward losses (test_losses.py);
#   checkpoint save -> load -> resume, one process and under torchrun (test_train_rm.py, resume tests);
#   KV-cache sampling equal to recomputation (test_rollout.py); Hugging Face import / export / verify
#   (test_convert.py); PPO / REINFORCE iterations, exit + resume (test_rl.py); and test_compat.py, whose
#   cross-release test writes a checkpoint under each release and resumes it under the other (needs
#   BASELINE_PYTHON, below).
#
# Not run by CI (it installs several GB of wheels). Usage, from anywhere:
#
#   tools/check_mcore_compat.sh                     # the subset above
#   tools/check_mcore_compat.sh -x -k resume        # extra arguments go to pytest
#
# Environment:
#   MCORE_VERSION    megatron-core to test (default 0.19.2)
#   TORCH_VERSION    torch to install beside it (default 2.13.0; the registry's build, CUDA or not: runs on CPU)
#   PYTHON312        interpreter that creates the environment (default python3.12)
#   COMPAT_VENV      environment directory (default ~/.cache/megatron-qrm/venv-mcore-$MCORE_VERSION);
#                    reused when it already has these versions
#   BASELINE_PYTHON  interpreter with the other megatron-core for the cross-release checkpoint test
#                    (default: the repository's .venv/bin/python, CI's environment); "none" skips that test
#   COMPAT_TESTS     the test selection, space-separated pytest node ids (default: the subset above)
#
# Prints the versions used and the pytest summary; exits with pytest's status.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MCORE_VERSION="${MCORE_VERSION:-0.19.2}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
PYTHON312="${PYTHON312:-python3.12}"
COMPAT_VENV="${COMPAT_VENV:-${HOME}/.cache/megatron-qrm/venv-mcore-${MCORE_VERSION}}"
BASELINE_PYTHON="${BASELINE_PYTHON:-${REPO}/.venv/bin/python}"
DEFAULT_TESTS="tests/test_model_parallel.py tests/test_losses.py
 tests/test_train_rm.py::test_resume_after_exit_matches_uninterrupted
 tests/test_train_rm.py::test_resume_after_sigkill_matches_uninterrupted
 tests/test_train_rm.py::test_resume_skips_interrupted_checkpoint
 tests/test_train_rm.py::test_resolve_checkpoint_never_picks_incomplete
 tests/test_train_rm.py::test_resume_under_torchrun
 tests/test_rollout.py tests/test_convert.py tests/test_rl.py tests/test_compat.py"
read -r -a TESTS <<< "$(echo "${COMPAT_TESTS:-${DEFAULT_TESTS}}" | tr '\n' ' ')"

say() { echo "check_mcore_compat: $*"; }
die() { echo "check_mcore_compat: error: $*" >&2; exit 2; }

PY="${COMPAT_VENV}/bin/python"
VERSIONS_CODE='from megatron_qrm import compat; v = compat.versions(); print(", ".join(f"{k} {v[k]}" for k in v))'

# 1. the environment: created once, reused while it holds the requested versions
if [[ ! -x "${PY}" ]]; then
    command -v "${PYTHON312}" > /dev/null || die "${PYTHON312} not found (set PYTHON312 to a Python 3.12 interpreter)"
    say "creating ${COMPAT_VENV} with $("${PYTHON312}" --version)"
    mkdir -p "$(dirname "${COMPAT_VENV}")"
    "${PYTHON312}" -m venv "${COMPAT_VENV}"
fi
have="$("${PY}" -c 'import megatron.core, torch; print(megatron.core.__version__, torch.__version__.split("+")[0])' \
        2> /dev/null || true)"
if [[ "${have}" != "${MCORE_VERSION} ${TORCH_VERSION}" ]]; then
    say "installing torch==${TORCH_VERSION} megatron-core==${MCORE_VERSION} (several GB the first time)"
    "${PY}" -m pip install --quiet "torch==${TORCH_VERSION}" "megatron-core==${MCORE_VERSION}"
fi
# the project and its other dependencies; the pins above already satisfy its requirements
"${PY}" -m pip install --quiet -e "${REPO}[test]" "torch==${TORCH_VERSION}" "megatron-core==${MCORE_VERSION}"

# 2. the other release, for the cross-release checkpoint test
if [[ "${BASELINE_PYTHON}" != "none" && -x "${BASELINE_PYTHON}" ]]; then
    export QRM_OTHER_PYTHON="${BASELINE_PYTHON}"
    baseline="$(cd "${REPO}" && "${BASELINE_PYTHON}" -c "${VERSIONS_CODE}" 2> /dev/null)" \
        || die "${BASELINE_PYTHON} cannot import megatron_qrm (set BASELINE_PYTHON, or BASELINE_PYTHON=none)"
else
    unset QRM_OTHER_PYTHON
    baseline="none (cross-release checkpoint test skipped)"
fi
tested="$(cd "${REPO}" && "${PY}" -c "${VERSIONS_CODE}" 2> /dev/null)" \
    || die "${PY} cannot import megatron_qrm; run: cd ${REPO} && ${PY} -c 'import megatron_qrm.compat'"

# 3. the tests
log="$(mktemp "${TMPDIR:-/tmp}/check_mcore_compat.XXXXXX")"
say "tested:   ${tested}"
say "baseline: ${baseline}"
set +e
(cd "${REPO}" && "${PY}" -m pytest -p no:cacheprovider -q -rs "${TESTS[@]}" "$@") 2>&1 | tee "${log}"
status="${PIPESTATUS[0]}"
set -e
echo
say "tested:   ${tested}"
say "baseline: ${baseline}"
say "pytest:   $(grep -E '(passed|failed|errors?|skipped).* in [0-9.]+s' "${log}" | tail -n 1 | tr -d '=' | sed 's/^ *//')"
say "exit status ${status} (full log: ${log})"
exit "${status}"
