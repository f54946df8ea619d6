"""Launch multi-process (torchrun, gloo, CPU) and CLI runs from tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONWARNINGS"] = "ignore"
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    if extra:
        env.update(extra)
    return env


def torchrun(args: list[str], nproc: int = 2, timeout: int = 600, env: dict | None = None,
             check: bool = True, cwd: str | None = None) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node nproc ARGS`` (ARGS: a script path or ``-m module`` and its args)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *args]
    return _run(cmd, timeout, env, check, cwd)


def qrm(args: list[str], nproc: int = 1, timeout: int = 600, env: dict | None = None, check: bool = True,
        cwd: str | None = None) -> subprocess.CompletedProcess:
    """Run the ``qrm`` CLI: one plain process, or ``nproc`` under torchrun."""
    if nproc == 1:
        return _run([sys.executable, "-m", "megatron_qrm", *args], timeout, env, check, cwd)
    return torchrun(["-m", "megatron_qrm", *args], nproc=nproc, timeout=timeout, env=env, check=check, cwd=cwd)


def _run(cmd, timeout, env, check, cwd) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env(env), cwd=cwd or REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"command failed ({proc.returncode}): {' '.join(cmd)}\n--- stdout\n"
                             f"{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-8000:]}")
    return proc


def run_cli_driver(tmp, commands: list[dict], timeout: int = 900) -> dict[str, dict]:
    """Run named ``qrm`` command lines ``{"name", "argv", "env"?, "patch"?, "hash"?}`` one after another in one
    process (``tests/workers/cli_driver.py``: the patches it knows inject faults); returns ``{name: result}``."""
    import json

    runs, results = tmp / "runs.json", tmp / "results.json"
    runs.write_text(json.dumps([{k: ([str(a) for a in v] if k in ("argv", "hash") else v) for k, v in c.items()
                                 if k != "name"} for c in commands]))
    driver = os.path.join(REPO, "tests", "workers", "cli_driver.py")
    proc = subprocess.run([sys.executable, driver, str(runs), str(results)], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=timeout)
    done = json.loads(results.read_text()) if results.exists() else []
    assert len(done) == len(commands), (f"driver stopped after {len(done)}/{len(commands)} (exit {proc.returncode})\n"
                                        f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return {c["name"]: r for c, r in zip(commands, done)}
