"""The wall between the GPU path and the CPU kernels (megatron_qrm/cpu/, models/backend.py).

* Statically: no module under models/, rl/ or training/ imports ``megatron_qrm.cpu`` except
  ``models/backend.py`` (the one place that chooses the CPU kernels for a CPU run).
* Dynamically: a fresh interpreter with ``megatron_qrm.cpu`` made unimportable (a meta-path finder that raises)
  imports every GPU-path module and builds the GPU path's models (local spec: SDPA core attention, megatron-core's
  fused SwiGLU; policy with LoRA, reward, critic). megatron-core itself needs CUDA to run a forward pass
  (``RotaryEmbedding`` moves its table to ``torch.cuda.current_device()``), so the forward pass on this path is
  checked by ``benchmarks/gpu_step.py`` on a GPU; here the builder's choices and the imports are what can fail.
"""

from __future__ import annotations

import ast
import os
import pathlib
import subprocess
import sys

from launch import REPO, _env, free_port

PKG = pathlib.Path(REPO) / "megatron_qrm"
GPU_PATH = ("models", "rl", "training")

_SCRIPT = r'''
import importlib, importlib.abc, os, pkgutil, sys

class Wall(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "megatron_qrm.cpu" or name.startswith("megatron_qrm.cpu."):
            raise ImportError(f"the GPU path imported {name}")

sys.meta_path.insert(0, Wall())
import torch, torch.distributed as dist
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1], RANK="0", WORLD_SIZE="1")
dist.init_process_group("gloo")
from megatron.core import parallel_state as ps
ps.initialize_model_parallel(1, 1)

import megatron_qrm
for folder in ("models", "rl", "training"):
    pkg = importlib.import_module(f"megatron_qrm.{folder}")
    for info in pkgutil.iter_modules(pkg.__path__):
        importlib.import_module(f"megatron_qrm.{folder}.{info.name}")

from megatron_qrm.models import backend
backend.is_cpu_run = lambda: False  # choose the GPU path's kernels on this CUDA-less machine
from megatron_qrm.config import ModelConfig
from megatron_qrm.models.attention import SDPAttention
from megatron_qrm.models.builder import build_model
from megatron_qrm.models.lora import LoRAAdapter, LoRAConfig

cfg = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128,
                  vocab_size=100, max_position_embeddings=64)
for role, lora in (("policy", LoRAConfig(rank=4)), ("reward", None), ("critic", None)):
    m = build_model(cfg, role, transformer_impl="local", lora=lora)
    layer = m.decoder.layers[0]
    assert isinstance(layer.self_attention.core_attention, SDPAttention), type(layer.self_attention.core_attention)
    assert m.config.bias_activation_fusion and not m.config.use_te_activation_func, "GPU path: fused SwiGLU"
    assert (lora is not None) == any(isinstance(x, LoRAAdapter) for x in m.modules())
leaked = sorted(k for k in sys.modules if k.startswith("megatron_qrm.cpu"))
assert not leaked, leaked
print("GPU-PATH-OK")
'''


def _imports_cpu(tree: ast.AST) -> list[int]:
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        if any(n == "megatron_qrm.cpu" or n.startswith("megatron_qrm.cpu.") for n in names):
            lines.append(node.lineno)
    return lines


def test_gpu_path_modules_import_the_cpu_package_only_in_backend():
    offenders = {}
    for folder in GPU_PATH:
        for path in sorted((PKG / folder).rglob("*.py")):
            lines = _imports_cpu(ast.parse(path.read_text()))
            if lines and path.relative_to(PKG).as_posix() != "models/backend.py":
                offenders[path.relative_to(PKG).as_posix()] = lines
    assert not offenders, f"GPU-path modules importing megatron_qrm.cpu: {offenders}"
    assert _imports_cpu(ast.parse((PKG / "models" / "backend.py").read_text())), "backend.py is the one place"


def test_gpu_path_builds_with_the_cpu_package_unimportable():
    env = _env()
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, str(free_port())], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "GPU-PATH-OK" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_the_cpu_path_does_reach_the_cpu_kernels():
    """The same builder on a CPU run plugs in the CPU kernels (so the test above is not vacuous)."""
    from megatron_qrm.models import backend
    from megatron_qrm.cpu.kernels import CpuPackedLinear

    assert backend.is_cpu_run()
    assert isinstance(backend.decode_linear(__import__("torch").device("cpu")), CpuPackedLinear)
    assert os.path.exists(PKG / "cpu" / "emulation.py")
