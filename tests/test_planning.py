"""The memory / FLOPs planner (`qrm plan`, megatron_qrm.planning): parameter counts against the published
ones, every term against numbers derived by hand for a tiny model, the known 70B figures, the fit / no-fit
decisions of the issue, the layout search, the CLI (JSON, exit status) and the trainers' start-up check.

Pure Python, no torch: the planner's activation terms are checked against the tensors autograd really
saves in tests/test_scaleout.py.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import sys

import pytest

from megatron_qrm.config import MODEL_PRESETS, ModelConfig, preset
from megatron_qrm.planning import (
    GPUS,
    PlanDoesNotFit,
    PlanInput,
    check_fits,
    estimate,
    make_plan,
    stage_parameters,
    total_parameters,
)
from megatron_qrm.planning import check as plan_check
from megatron_qrm.planning.cli import build_parser, main
from megatron_qrm.planning.memory import (
    candidate_layouts,
    forward_flops_per_token,
    layer_activation_bytes_per_token,
    training_flops_per_token,
)
from megatron_qrm.planning.params import lora_layer_params

GiB = 2**30

# the tiny model of the hand derivations: h=64, 4 heads of d=16, 2 KV groups (kv=32), f=160, V=96 (padded
# to 128 at TP=1, 256 at TP=2)
TINY = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=160,
            vocab_size=96, max_position_embeddings=128)


def tiny() -> ModelConfig:
    return ModelConfig(**TINY)


# ----------------------------------------------------------------------------- parameters
@pytest.mark.parametrize("name,billions,tol", [
    ("llama3-8b", 8.03, 0.005), ("llama3-70b", 70.55, 0.01), ("qwen2.5-7b", 7.62, 0.005),
    ("llama3.2-3b", 3.21, 0.005), ("llama3.2-1b", 1.24, 0.005), ("llama2-7b", 6.74, 0.005),
    ("qwen2.5-0.5b", 0.494, 0.001), ("qwen2.5-72b", 72.71, 0.01), ("llama3.1-405b", 405.85, 0.05),
])
def test_parameter_counts_match_the_published_ones(name, billions, tol):
    assert abs(total_parameters(preset(name)) / 1e9 - billions) < tol


def test_tiny_parameters_by_hand():
    m = tiny()
    # per layer: qkv 64*(64+2*32)=8192, proj 64*64=4096, fc1 64*2*160=20480, fc2 160*64=10240, norms 2*64
    layer = 8192 + 4096 + 20480 + 10240 + 128
    assert layer == 43136
    assert total_parameters(m) == 96 * 64 + 2 * layer + 64 + 96 * 64  # published: unpadded vocabulary
    p = stage_parameters(m, "policy", 1, 1, 0)
    assert p.total == p.trainable == 128 * 64 + 2 * layer + 64 + 128 * 64 == 102720
    assert stage_parameters(m, "reward", 1, 1, 0).total == 128 * 64 + 2 * layer + 64 + 64  # token head h -> 1
    # TP=2: vocabulary padded to 256 and split, linears split, norms replicated
    assert stage_parameters(m, "policy", 2, 1, 0).total == 256 * 64 // 2 + 2 * (43008 // 2 + 128) + 64 + 8192
    # PP=2: embedding on the first stage, final norm + head on the last
    assert stage_parameters(m, "policy", 1, 2, 0).total == 8192 + layer
    assert stage_parameters(m, "policy", 1, 2, 1).total == layer + 64 + 8192
    # tied embeddings: one matrix at PP=1, a copy on the last stage at PP=2
    tied = ModelConfig(**TINY, tie_word_embeddings=True)
    assert stage_parameters(tied, "policy", 1, 1, 0).total == 102720 - 8192
    assert stage_parameters(tied, "policy", 1, 2, 1).total == layer + 64 + 8192


def test_lora_parameters_by_hand():
    m = tiny()
    # r=8: qkv A 8x64 + B 128x8; proj A 8x64 + B 64x8; fc1 A 8x64 + B 320x8; fc2 A 8x160 + B 64x8
    split, repl = lora_layer_params(m, 8, tp=1)
    assert split + repl == 512 + 1024 + 512 + 512 + 512 + 2560 + 1280 + 512 == 7424
    # TP=2: B of column targets and A of row targets split; the rest replicated
    split2, repl2 = lora_layer_params(m, 8, tp=2)
    assert repl2 == 512 + 512 + 512 + 512 and split2 == (1024 + 512 + 2560 + 1280) // 2
    p = stage_parameters(m, "reward", 1, 1, 0, lora_rank=8)
    assert p.lora == 2 * 7424 and p.trainable == 2 * 7424 + 64  # adapters + token head


# ----------------------------------------------------------------------------- memory terms by hand
def tiny_input(**kw) -> PlanInput:
    base = dict(model=tiny(), role="policy", seq_length=48, micro_batch_size=3, bf16=False,
                transformer_impl="local", attention="unfused", fused_activation=False, gpu="a100-80gb",
                reserve_bytes=0)
    base.update(kw)
    return PlanInput(**base)


def test_tiny_memory_by_hand_fp32_local_unfused():
    plan = estimate(tiny_input())
    m = plan.memory
    assert m.weights == 102720 * 4 and m.grads == 102720 * 4
    assert m.optimizer == 102720 * 8  # fp32 params: Adam moments only, no master copy
    # per token per layer (e=4): norms 6h*4 = 1536; attention 4h*4 + a*s*4 = 1024 + 768; MLP (the project's
    # SwiGLU function: fc1 output 2f, silu(gate) f, fc2 input f) 4f*4 = 2560
    per_token_layer = 1536 + 1024 + 4 * 48 * 4 + 2560
    assert layer_activation_bytes_per_token(tiny(), tiny_input()) == per_token_layer == 5888
    tokens = 3 * 48
    assert m.activations == 2 * per_token_layer * tokens + 3 * 64 * 4 * tokens  # + final norm
    # logits (e) + the cross-entropy's fp32 copy (its saved softmax) + the logits' gradient (e), padded vocabulary
    assert m.logits == (4 + 2 * 4) * 128 * tokens
    assert m.workspace == per_token_layer * tokens + 3 * 4 * 48 * 48 * 4  # one layer + unfused score buffer
    assert m.kv_cache == 0 and m.reserve == 0
    assert m.total == sum(v for k, v in m.to_dict().items() if k != "total")


def test_tiny_memory_by_hand_bf16_variants():
    h, kv, f, a = 64, 32, 160, 4
    # flash/SDPA attention: Q, K, fused QKV output (V is a view), output: (3h + 3kv) * e, + fp32 LSE 4a
    flash = tiny_input(attention="flash")
    assert layer_activation_bytes_per_token(tiny(), flash) == 6 * h * 4 + (3 * h + 3 * kv) * 4 + 4 * a + 4 * f * 4
    # bf16, TE spec, fused SwiGLU, TP=2 with sequence parallelism: everything / 2
    te = tiny_input(bf16=True, transformer_impl="te", fused_activation=True, tensor_parallel=2,
                    sequence_parallel=True, num_gpus=2)
    split = ((3 * h + 3 * kv) * 2 + 4 * a + 3 * f * 2) / 2  # attention + MLP, split over TP
    assert layer_activation_bytes_per_token(tiny(), te) == (4 * h * 2) / 2 + split
    # without SP the norm terms stay whole
    te_nosp = tiny_input(bf16=True, transformer_impl="te", fused_activation=True, tensor_parallel=2, num_gpus=2)
    assert layer_activation_bytes_per_token(tiny(), te_nosp) == 4 * h * 2 + split
    # bf16 unfused softmax: fp32 probabilities + their bf16 copy = 6 bytes per score
    unf = tiny_input(bf16=True)
    assert layer_activation_bytes_per_token(tiny(), unf) == 6 * h * 2 + 4 * h * 2 + a * 48 * 6 + 4 * f * 2
    # selective recompute of the unfused core keeps its inputs instead; full keeps the layer input
    assert layer_activation_bytes_per_token(tiny(), tiny_input(recompute="selective")) == \
        6 * h * 4 + (3 * h + 3 * kv) * 4 + 4 * f * 4
    assert layer_activation_bytes_per_token(tiny(), tiny_input(recompute="full")) == h * 4
    # bf16 optimizer: fp32 master + 2 moments = 12 B/param, divided over DP by the distributed optimizer
    m = estimate(tiny_input(bf16=True, num_gpus=4)).memory
    assert m.weights == 102720 * 2 and m.grads == 102720 * 4 and m.optimizer == 102720 * 12 // 4
    m = estimate(tiny_input(bf16=True, num_gpus=4, distributed_optimizer=False)).memory
    assert m.optimizer == 102720 * 12


def test_pipeline_in_flight_micro_batches():
    # PP=2: the first stage holds 2 micro-batches in flight, the last one (plus the head)
    one = layer_activation_bytes_per_token(tiny(), tiny_input(pipeline_parallel=2)) * 3 * 48
    first = estimate(tiny_input(pipeline_parallel=2, role="reward", global_batch_size=8, micro_batch_size=1))
    # reward: micro-batch of 1 pair = 2 sequences
    per_layer_reward = layer_activation_bytes_per_token(tiny(), tiny_input(role="reward")) * 2 * 48
    assert first.stage == 0 and first.memory.activations == pytest.approx(2 * 1 * per_layer_reward)
    assert one > 0
    # one micro-batch per step: nothing else in flight
    single = estimate(tiny_input(pipeline_parallel=2, role="reward", global_batch_size=1, micro_batch_size=1))
    assert single.memory.activations < first.memory.activations


def test_kv_cache_by_hand():
    i = tiny_input(role="ppo", bf16=True, generation_batch_size=5, reward_model=tiny())
    plan = estimate(i)
    # 2 (K and V) x layers x KV groups x head dim x full length x batch x 2 bytes
    assert plan.phases["rollout"]["kv_cache"] == 2 * 2 * 2 * 16 * 48 * 5 * 2
    i2 = tiny_input(role="ppo", bf16=True, generation_batch_size=5, reward_model=tiny(), tensor_parallel=2,
                    num_gpus=2)
    assert estimate(i2).phases["rollout"]["kv_cache"] == 2 * 2 * 1 * 16 * 48 * 5 * 2  # groups split over TP


def test_flops_by_hand():
    m = tiny()
    # 2 x (layer matmul weights + LM head) + 4 s h per layer
    fwd = 2 * (2 * 43008 + 96 * 64) + 2 * 4 * 48 * 64
    assert forward_flops_per_token(m, "policy", 48) == fwd
    assert training_flops_per_token(m, "policy", 48, 0, full=True) == 3 * fwd
    # LoRA: frozen base costs forward + input gradients, the adapters 6 FLOPs per parameter
    fwd_r = 2 * (2 * 43008) + 2 * 4 * 48 * 64
    assert training_flops_per_token(m, "reward", 48, 8, full=True) == 2 * fwd_r + 6 * 2 * 7424
    plan = estimate(tiny_input(global_batch_size=6))
    assert plan.tokens_per_step == 6 * 48 and plan.flops_per_step == 6 * 48 * 3 * fwd


# ----------------------------------------------------------------------------- the known 70B figures
def test_llama3_70b_known_figures():
    m = preset("llama3-70b")
    i = PlanInput(model=m, role="policy", tensor_parallel=1, num_gpus=1, gpu="a100-80gb")
    w = estimate(i).memory.weights
    assert 141.0e9 < w < 141.2e9  # 70.55B x 2 bytes: "140 GB in bf16"
    rm = estimate(PlanInput(model=m, role="reward", gpu="a100-80gb")).memory.weights
    assert 138.9e9 < rm < 139.1e9  # no LM head
    tp8 = estimate(PlanInput(model=m, role="policy", tensor_parallel=8, num_gpus=8, gpu="a100-40gb"))
    assert 17.6e9 < tp8.memory.weights < 17.7e9  # / 8
    # full fine-tune, mixed precision: 2 (bf16 weights) + 4 (fp32 grads) + 12 (Adam) = 18 bytes/param
    state = tp8.memory.weights + tp8.memory.grads + tp8.memory.optimizer
    assert state * 8 == pytest.approx(18 * 70.55e9, rel=0.003)
    assert not tp8.fits


def test_refuses_70b_full_finetune_on_8xa100_40gb_and_accepts_lora_rm_on_80gb():
    full = make_plan(PlanInput(model=preset("llama3-70b"), role="policy", lora_rank=0, tensor_parallel=8,
                               num_gpus=8, gpu="a100-40gb", seq_length=1024, micro_batch_size=1))
    assert not full.fits and full.min_gpus and full.min_gpus > 8
    assert full.proposal is not None and full.proposal["num_gpus"] == full.min_gpus
    rm = make_plan(PlanInput(model=preset("llama3-70b"), role="reward", lora_rank=128, tensor_parallel=8,
                             num_gpus=8, gpu="a100-80gb", seq_length=1024, micro_batch_size=1))
    assert rm.fits and rm.per_gpu_bytes < GPUS["a100-80gb"].memory_bytes


def test_proposal_is_the_smallest_fitting_layout():
    i = PlanInput(model=preset("llama3-8b"), role="policy", tensor_parallel=1, num_gpus=8, gpu="a100-40gb",
                  seq_length=2048, micro_batch_size=1)
    plan = make_plan(i)
    assert not plan.fits and plan.proposal
    size = plan.proposal["tensor_model_parallel_size"] * plan.proposal["pipeline_model_parallel_size"]
    layouts = candidate_layouts(i)
    assert layouts == sorted(layouts, key=lambda x: (x[0] * x[1], x[1]))
    for tp, pp in layouts:
        if tp * pp >= size:
            break
        j = PlanInput(**{**i.__dict__, "tensor_parallel": tp, "pipeline_parallel": pp})
        assert not estimate(j).fits, (tp, pp)
    assert all(tp in (1, 2, 4, 8) and 32 % pp == 0 for tp, pp in layouts)


@pytest.mark.parametrize("name", sorted(MODEL_PRESETS))
def test_every_preset_plans(name):
    m = preset(name)
    for role, lora in (("reward", 128), ("policy", 0)):
        tp = 8 if m.num_attention_heads % 8 == 0 and m.num_query_groups % 8 == 0 else 1
        plan = make_plan(PlanInput(model=m, role=role, lora_rank=lora, tensor_parallel=tp, num_gpus=8, gpu="h100-80gb"))
        assert plan.per_gpu_bytes > 0 and plan.flops_per_step > 0


def test_rl_update_logits_and_entropy_by_hand():
    """The actor update holds the logits on the packed stream: output (e) + one fp32 copy (4) + the gradient
    (e); an entropy bonus adds its own gradient (e; its backward recomputes); the entropy is a workspace of one
    chunk of tokens."""
    from megatron_qrm.planning.memory import ENTROPY_CHUNK_TOKENS, training_activations
    from megatron_qrm.rl.kl import ENTROPY_CHUNK_TOKENS as KL_CHUNK

    assert ENTROPY_CHUNK_TOKENS == KL_CHUNK
    tokens = 3 * 48
    for bf16, e in ((False, 4), (True, 2)):
        i = tiny_input(role="reinforce", bf16=bf16)
        _, logits, _ = training_activations(tiny(), i, "policy", 0, 0, 3)
        assert logits == (4 + 2 * e) * 128 * tokens
        _, logits_bonus, _ = training_activations(tiny(), tiny_input(role="reinforce", bf16=bf16, entropy_coef=0.01),
                                                  "policy", 0, 0, 3)
        assert logits_bonus == (4 + 3 * e) * 128 * tokens
    big = ModelConfig(**dict(TINY, vocab_size=128_256))
    _, _, work = training_activations(big, tiny_input(model=big, role="reinforce", seq_length=4096), "policy", 0, 0, 1)
    assert work >= 9 * ENTROPY_CHUNK_TOKENS * 128_256


def test_ppo_phases_offload_and_reinforce():
    actor, rm = preset("llama3.2-3b"), preset("llama3-70b")
    kw = dict(model=actor, reward_model=rm, reward_lora_rank=128, critic_lora_rank=128, tensor_parallel=8,
              num_gpus=8, gpu="a100-80gb", sequence_parallel=True, micro_batch_size=2)
    ppo = estimate(PlanInput(role="ppo", **kw))
    assert set(ppo.phases) == {"startup", "rollout", "scoring", "actor_update", "critic_update"}
    assert ppo.phase in ppo.phases and ppo.per_gpu_bytes == ppo.phases[ppo.phase]["total"]
    assert ppo.fits and set(ppo.params_total) == {"actor", "reward", "critic", "reference"}
    off = estimate(PlanInput(role="ppo", offload=True, **kw))
    assert off.phases["actor_update"]["total"] < ppo.phases["actor_update"]["total"]
    # start-up still holds every model (the trainer builds them all before offloading)
    assert off.phases["startup"]["total"] == ppo.phases["startup"]["total"]
    rf = estimate(PlanInput(role="reinforce", **kw))
    assert "critic_update" not in rf.phases and rf.per_gpu_bytes < ppo.per_gpu_bytes


# ----------------------------------------------------------------------------- CLI
ISSUE_COMMAND = ["--model", "llama3-70b", "--role", "reward", "--lora-rank", "128", "--tensor-model-parallel-size", "8",
                 "--pipeline-model-parallel-size", "1", "--num-gpus", "8", "--gpu", "a100-80gb", "--seq-length",
                 "1024", "--micro-batch-size", "1", "--json"]


def run_cli(argv):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(argv)
    return rc, out.getvalue()


def test_cli_json_and_exit_status():
    rc, out = run_cli(ISSUE_COMMAND)
    d = json.loads(out)
    assert rc == 0 and d["fits"] is True and isinstance(d["per_gpu_bytes"], int)
    assert d["memory"]["total"] == d["per_gpu_bytes"] and d["layout"]["tensor_model_parallel_size"] == 8
    full = [a if a != "reward" else "policy" for a in ISSUE_COMMAND]
    full[full.index("--lora-rank") + 1] = "0"
    full[full.index("a100-80gb")] = "a100-40gb"
    rc, out = run_cli(full)
    d = json.loads(out)
    assert rc == 3 and d["fits"] is False and d["proposal"]["num_gpus"] > 8
    rc, out = run_cli(full[:-1])  # human-readable
    assert rc == 3 and "DOES NOT FIT" in out and "smallest layout that fits" in out


def test_cli_ppo_and_errors(capsys):
    rc, out = run_cli(["--model", "llama3.2-3b", "--role", "ppo", "--reward-model", "llama3-70b", "--reward-lora-rank",
                       "128", "--critic-lora-rank", "128", "--tensor-model-parallel-size", "8", "--num-gpus", "8",
                       "--sequence-parallel", "--micro-batch-size", "2", "--json"])
    assert rc == 0 and json.loads(out)["phases"]["rollout"]["kv_cache"] > 0
    assert main(["--model", "no-such-model"]) == 2
    assert main(["--model", "llama3-70b", "--tensor-model-parallel-size", "3", "--num-gpus", "3"]) == 2
    assert "qrm plan: error" in capsys.readouterr().err
    # wired as a subcommand: the same flags through add_plan_parser
    import argparse

    from megatron_qrm.planning import add_plan_parser

    parser = argparse.ArgumentParser()
    add_plan_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["plan", *ISSUE_COMMAND])
    assert args.func is not None and args.lora_rank == 128
    assert build_parser().parse_args(ISSUE_COMMAND).tensor_model_parallel_size == 8


def test_planning_does_not_import_torch():
    import subprocess

    code = "import sys, megatron_qrm.planning; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


# ----------------------------------------------------------------------------- the trainers' check
def test_check_fits_logs_only_on_cpu(monkeypatch, caplog):
    monkeypatch.setattr(plan_check, "detect_gpu", lambda: (None, None))
    monkeypatch.setattr(plan_check, "_cpu_note_logged", [])
    with caplog.at_level(logging.INFO, logger="megatron_qrm"):
        for _ in range(2):
            plan = check_fits(preset("llama3-70b"), "policy", tensor_parallel=1, pipeline_parallel=1, world_size=1,
                              micro_batch_size=1, seq_length=1024)
    assert not plan.fits  # does not fit, but a CPU run only logs it, once per process
    assert caplog.text.count("memory check: skipped on CPU") == 1


def test_check_fits_refuses_on_gpu_unless_skipped(monkeypatch, caplog):
    monkeypatch.setattr(plan_check, "detect_gpu", lambda: ("a100-40gb", GPUS["a100-40gb"].memory_bytes))
    kw = dict(tensor_parallel=8, pipeline_parallel=1, world_size=8, micro_batch_size=1, seq_length=1024,
              transformer_impl="te")
    with pytest.raises(PlanDoesNotFit, match="--skip-memory-check"):
        check_fits(preset("llama3-70b"), "policy", **kw)
    with caplog.at_level(logging.INFO, logger="megatron_qrm"):
        plan = check_fits(preset("llama3-70b"), "policy", skip=True, **kw)
    assert not plan.fits and "starting anyway" in caplog.text
    monkeypatch.setattr(plan_check, "detect_gpu", lambda: ("a100-80gb", GPUS["a100-80gb"].memory_bytes))
    ok = check_fits(preset("llama3-70b"), "reward", lora_rank=128, **kw)
    assert ok.fits
    # RL: the actor plus the models passed by keyword
    ppo = check_fits(preset("llama3.2-3b"), "ppo", reward_model=preset("llama3-70b"), reward_lora_rank=128,
                     critic_lora_rank=128, sequence_parallel=True, **{**kw, "micro_batch_size": 2})
    assert ppo.fits and ppo.phases
