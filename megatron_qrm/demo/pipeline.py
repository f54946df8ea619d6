"""`qrm demo`: the whole method end to end on a laptop CPU, on the synthetic arithmetic task.

Stages (each writes its outputs under ``--out`` and a marker ``stages/<name>.json``; a rerun with the
same ``--out`` skips finished stages, and an interrupted trainer resumes from its checkpoint):

1. ``data``       task data (SFT demonstrations, RL / pair / held-out / test prompts) and a SentencePiece
                  tokenizer trained on the task text;
2. ``sft``        a tiny Megatron GPT trained from scratch on the demonstrations (``train_sft``);
3. ``pairs``      several sampled responses per prompt from the SFT policy, judged by the task checker,
                  paired correct-vs-incorrect (:mod:`megatron_qrm.demo.pairs`, as ``qrm make-pairs``);
                  the SFT policy's Pass@1 (iteration 0 of every RL curve);
4. ``rm-<kind>``  Q-RM, ORM and DPO-RM trained from the SFT checkpoint (``train_reward_model``), then
                  scored on the held-out pairs (``evaluate_reward_model``, token credits dumped);
5. ``rl-<algo>-<kind>``  PPO and REINFORCE with each reward model (``RLTrainer``), Pass@1 on the test
                  prompts after every iteration (sampled at T = 1, the main curve, and greedy);
6. ``localization``  on held-out incorrect responses: how often the lowest-credit step is the first
                  wrong step (Q-RM, DPO-RM; chance for ORM);
7. ``report``     ``report.md``, ``report.json`` and PNG plots (:mod:`megatron_qrm.demo.report`).

Everything runs in this one process (world size 1, TP = PP = 1) through the same entry points the
``qrm`` commands use.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from megatron_qrm.errors import UserError
from megatron_qrm.demo import task as arith

log = logging.getLogger("megatron_qrm")

RM_KINDS = ("qrm", "orm", "dpo")
RM_NAMES = {"qrm": "Q-RM", "orm": "ORM", "dpo": "DPO-RM"}
ALGOS = ("ppo", "reinforce")


@dataclass
class DemoConfig:
    """Sizes of every stage. :func:`default_config` / :func:`quick_config` are the two presets."""

    seed: int = 1
    task: arith.TaskConfig = field(default_factory=arith.TaskConfig)
    # data
    n_sft: int = 12000
    n_rl_prompts: int = 2048  # RL prompts; the preference pairs are sampled on these too
    n_heldout_prompts: int = 128  # prompts of the held-out pairs (RM accuracy, localisation)
    n_test: int = 192  # test prompts (Pass@1)
    vocab_size: int = 400
    # model
    num_layers: int = 2
    hidden_size: int = 128
    num_attention_heads: int = 4
    ffn_hidden_size: int = 512
    seq_length: int = 64
    # SFT
    sft_iters: int = 1000
    sft_batch: int = 32
    sft_lr: float = 2e-3
    # preference pairs
    pair_prompts: int = 2048  # of the RL prompts
    samples_per_prompt: int = 4
    heldout_samples_per_prompt: int = 8
    max_pairs_per_prompt: int = 4
    sample_temperature: float = 1.0
    # reward models
    rm_iters: int = 700
    rm_batch: int = 32
    rm_lr: float = 1e-3  # ORM and DPO-RM
    # the Q-RM's own learning rate: at 1e-3 its credits saturate (about +-27) and a doomed chain is equally low
    # on every later step; 3e-4 localised the first error better on average over 3 seeds (docs/toy-study.md)
    qrm_lr: float = 3e-4
    # Q-RM loss: the paper's gamma; beta 1 instead of 0.2 (with 0.2 the loss stays in its linear regime for a
    # model this small: it needs mean-credit margins of gamma/beta = 10 and barely learns; see docs/toy-study.md)
    qrm_beta: float = 1.0
    qrm_gamma: float = 2.0
    # RL
    rl_iters: int = 8
    rl_rollout: int = 64
    rl_global_batch: int = 16
    rl_micro_batch: int = 16
    ppo_lr: float = 5e-5
    reinforce_lr: float = 5e-5
    critic_lr: float = 1e-4
    kl_coef: float = 0.01
    # PPO with the Q-RM: "qrm-reference" is the reference code's estimator (r = Z / std(Z) - KL,
    # A = r - 0.01 V / std(V)); "qrm" the paper's Algorithm 1 (A = Z_std - KL - V). In 8 iterations the critic
    # stays untrained and Algorithm 1's A inherits its noise: PPO + Q-RM gained +2.0 Pass@1 points with it and
    # +6.5 with the reference estimator over 4 seeds (docs/toy-study.md)
    ppo_qrm_advantage: str = "qrm-reference"
    rl_temperature: float = 1.0
    algos: tuple[str, ...] = ALGOS
    rm_kinds: tuple[str, ...] = RM_KINDS
    generation_batch: int = 128
    max_new_tokens: int = 40
    eval_samples: int = 2  # sampled responses per test prompt for Pass@1 (T = 1); greedy is reported too

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DemoConfig":
        d = dict(d)
        d["task"] = arith.TaskConfig(**d.get("task", {}))
        for k in ("algos", "rm_kinds"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)


def default_config(seed: int = 1) -> DemoConfig:
    return DemoConfig(seed=seed)


def quick_config(seed: int = 1) -> DemoConfig:
    """About 4 minutes on 2 CPU cores: an easier task (2-3 steps, values up to 20), fewer iterations."""
    return DemoConfig(seed=seed, task=arith.TaskConfig(max_steps=3, max_operand=5, max_value=20), n_sft=8000,
                      n_rl_prompts=768, n_heldout_prompts=64, n_test=64, sft_iters=500, pair_prompts=768,
                      rm_iters=200, qrm_lr=1e-3, rl_iters=3)  # a short RM schedule: the higher Q-RM lr


# ----------------------------------------------------------------------------- small helpers
def _write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def _read_json(path: str):
    with open(path) as f:
        return json.load(f)


def _write_jsonl(path: str, rows) -> str:
    from megatron_qrm.demo.pairs import write_jsonl

    write_jsonl(path, list(rows))
    return path


def _read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def say(msg: str) -> None:
    print(f"[qrm demo] {msg}", flush=True)


class Paths:
    def __init__(self, out: str):
        self.out = os.path.abspath(out)

    def __call__(self, *parts: str) -> str:
        return os.path.join(self.out, *parts)

    @property
    def tokenizer(self) -> str:
        return self("tokenizer", "tokenizer.model")

    @property
    def sft(self) -> str:
        return self("sft")

    def rm(self, kind: str) -> str:
        return self("rm", kind)

    def rl(self, algo: str, kind: str) -> str:
        return self("rl", f"{algo}_{kind}")


# ----------------------------------------------------------------------------- stages
def stage_data(cfg: DemoConfig, p: Paths) -> dict:
    from megatron_qrm.demo.tokenizer import train_tokenizer

    t = cfg.task
    sft = arith.sft_examples(cfg.n_sft, cfg.seed * 7919 + 1, t)
    test = arith.prompts(cfg.n_test, cfg.seed * 7919 + 2, t)
    heldout = arith.prompts(cfg.n_heldout_prompts, cfg.seed * 7919 + 3, t,
                            exclude={r["instruction"] for r in test})
    rl = arith.prompts(cfg.n_rl_prompts, cfg.seed * 7919 + 4, t,
                       exclude={r["instruction"] for r in test + heldout})
    _write_jsonl(p("data", "sft.jsonl"), sft)
    _write_jsonl(p("data", "rl_prompts.jsonl"), rl)
    _write_jsonl(p("data", "heldout_prompts.jsonl"), heldout)
    _write_jsonl(p("data", "test.jsonl"), test)
    tok = train_tokenizer(arith.tokenizer_corpus(t, cfg.seed), p("tokenizer"), cfg.vocab_size)
    flawed = sum(r["flawed"] for r in sft)
    return {"sft_examples": len(sft), "sft_flawed": flawed, "rl_prompts": len(rl), "heldout_prompts": len(heldout),
            "test_prompts": len(test), "tokenizer": tok}


def _model_config(cfg: DemoConfig):
    from megatron_qrm.config import ModelConfig

    return ModelConfig(num_layers=cfg.num_layers, hidden_size=cfg.hidden_size,
                       num_attention_heads=cfg.num_attention_heads, ffn_hidden_size=cfg.ffn_hidden_size,
                       max_position_embeddings=max(cfg.seq_length, 64))


def stage_sft(cfg: DemoConfig, p: Paths) -> dict:
    from megatron_qrm.config import ParallelConfig
    from megatron_qrm.data.sft import SFTDataConfig
    from megatron_qrm.training.engine import OptimConfig
    from megatron_qrm.training.sft_trainer import SFTTrainConfig, train_sft

    last = train_sft(SFTTrainConfig(
        model=_model_config(cfg), data=SFTDataConfig(path=p("data", "sft.jsonl"), seq_length=cfg.seq_length),
        tokenizer=p.tokenizer, parallel=ParallelConfig(seed=cfg.seed),
        optim=OptimConfig(lr=cfg.sft_lr, min_lr=cfg.sft_lr / 10, lr_warmup_iters=min(50, cfg.sft_iters // 10),
                          lr_decay_style="cosine", clip_grad=1.0),
        micro_batch_size=cfg.sft_batch, global_batch_size=cfg.sft_batch, train_iters=cfg.sft_iters,
        load=p.sft, save=p.sft, save_interval=max(cfg.sft_iters // 3, 1), keep_last=1,
        log_interval=max(cfg.sft_iters // 10, 1), tensorboard=False))
    return {"checkpoint": p.sft, "final_loss": last.get("loss")}


def _load_policy(path: str, seed: int):
    from megatron_qrm import checkpointing, parallel
    from megatron_qrm.config import ModelConfig, ParallelConfig
    from megatron_qrm.data import load_tokenizer
    from megatron_qrm.models import PrecisionConfig, build_model

    parallel.initialize(ParallelConfig(seed=seed))
    saved = checkpointing.read_config(path)
    tok = load_tokenizer(saved["tokenizer"])
    model = build_model(ModelConfig.from_dict(saved["model"]), "policy", precision=PrecisionConfig(bf16=False))
    checkpointing.load_checkpoint(path, model, load_rng=False, model_key_filter=lambda k: ".lora." not in k)
    model.eval()
    return model, tok, saved


def sample_responses(model, tok, prompts_file: str, n_prompts: int, k: int, cfg: DemoConfig, seed: int,
                     temperature: Optional[float] = None) -> list[dict]:
    """``k`` sampled responses for each of the first ``n_prompts`` prompts: [{instruction, label, responses}]."""
    from megatron_qrm.data import PromptDataConfig, PromptDataset
    from megatron_qrm.evaluation.policy_eval import generate_responses
    from megatron_qrm.rl.rollout import SamplingConfig

    ds = PromptDataset(PromptDataConfig(path=prompts_file, seq_length=cfg.seq_length, max_prompts=n_prompts), tok)
    idx = [i for i in range(len(ds)) for _ in range(k)]
    texts = generate_responses(model, tok, ds, idx, SamplingConfig(temperature=cfg.sample_temperature if temperature is None else temperature,
                                                                   max_new_tokens=cfg.max_new_tokens),
                               cfg.seq_length, cfg.generation_batch, seed=seed)
    rows = []
    for i in range(len(ds)):
        rows.append({"instruction": ds.instructions[i], "label": ds.labels[i], "responses": texts[i * k:(i + 1) * k]})
    return rows


def evaluate_policy_now(model, tok, cfg: DemoConfig, test_file: str, dump: Optional[str] = None) -> dict:
    """Pass@1 of a policy on the test prompts: ``pass@1`` = mean correctness of ``eval_samples`` samples per
    prompt at temperature 1 (the unbiased Pass@1 estimate; the same seed at every evaluation), and
    ``greedy_pass@1`` (temperature 0, the reference code's protocol)."""
    from megatron_qrm.evaluation.policy_eval import evaluate_pass_at_1

    g = evaluate_pass_at_1(model, tok, test_file, arith.TASK_NAME, seq_length=cfg.seq_length, chat_template=False,
                           max_new_tokens=cfg.max_new_tokens, batch_size=cfg.generation_batch, dump=dump)
    rows = sample_responses(model, tok, test_file, cfg.n_test, cfg.eval_samples, cfg, seed=cfg.seed * 7 + 12345,
                            temperature=cfg.rl_temperature)
    n = sum(len(r["responses"]) for r in rows)
    ok = sum(arith.judge(t, r["label"])[0] for r in rows for t in r["responses"])
    return {"pass@1": ok / max(n, 1), "greedy_pass@1": g["pass@1"], "eval_prompts": g["eval_prompts"]}


def stage_pairs(cfg: DemoConfig, p: Paths) -> dict:
    from megatron_qrm.demo.pairs import make_pairs

    model, tok, _ = _load_policy(p.sft, cfg.seed)
    out = {}
    for name, src, n in (("train", p("data", "rl_prompts.jsonl"), cfg.pair_prompts),
                         ("heldout", p("data", "heldout_prompts.jsonl"), cfg.n_heldout_prompts)):
        t0 = time.time()
        k = cfg.samples_per_prompt if name == "train" else cfg.heldout_samples_per_prompt
        rows = sample_responses(model, tok, src, n, k, cfg, seed=cfg.seed * 31 + len(name))
        _write_jsonl(p("samples", f"{name}_responses.jsonl"), rows)
        groups = {r["instruction"]: {"label": r["label"], "responses": r["responses"]} for r in rows}
        pairs, stats = make_pairs(groups, arith.TASK_NAME, max_pairs_per_prompt=cfg.max_pairs_per_prompt,
                                  seed=cfg.seed)
        if not pairs:
            raise UserError(f"no preference pairs from the {name} samples ({stats}): the SFT policy is always "
                               f"right or always wrong; change the sizes")
        _write_jsonl(p("pairs", f"{name}.jsonl"), pairs)
        stats["sampled_accuracy"] = stats["correct"] / max(stats["unique_responses"], 1)
        stats["all_samples_accuracy"] = sum(arith.judge(t, r["label"])[0] for r in rows for t in r["responses"]) / max(
            sum(len(r["responses"]) for r in rows), 1)
        stats["seconds"] = time.time() - t0
        out[name] = stats
        stats["samples_per_prompt"] = k
        say(f"pairs ({name}): {stats['pairs']} pairs from {stats['prompts']} prompts x {k} "
            f"samples; {stats['all_samples_accuracy']:.1%} of samples correct")
    res = evaluate_policy_now(model, tok, cfg, p("data", "test.jsonl"), dump=p("samples", "sft_test_greedy.jsonl"))
    out["sft_pass@1"] = res["pass@1"]
    out["sft_greedy_pass@1"] = res["greedy_pass@1"]
    say(f"SFT policy on {int(res['eval_prompts'])} test prompts: Pass@1 {res['pass@1']:.3f} (T=1, "
        f"{cfg.eval_samples} samples each), greedy {res['greedy_pass@1']:.3f}")
    return out


def stage_rm(cfg: DemoConfig, p: Paths, kind: str) -> dict:
    from megatron_qrm.config import ParallelConfig
    from megatron_qrm.data import PreferenceDataConfig
    from megatron_qrm.evaluation.rm_eval import RMEvalConfig, evaluate_reward_model
    from megatron_qrm.rewards.scoring import RewardLossConfig
    from megatron_qrm.training.engine import OptimConfig
    from megatron_qrm.training.reward_trainer import RewardTrainConfig, train_reward_model

    save = p.rm(kind)
    n_pairs = sum(1 for _ in open(p("pairs", "train.jsonl")))
    last = train_reward_model(RewardTrainConfig(
        model=None, data=PreferenceDataConfig(path=p("pairs", "train.jsonl"), seq_length=cfg.seq_length),
        tokenizer=p.tokenizer, loss=RewardLossConfig(kind, qrm_beta=cfg.qrm_beta, qrm_gamma=cfg.qrm_gamma), parallel=ParallelConfig(seed=cfg.seed),
        optim=OptimConfig(lr=cfg.qrm_lr if kind == "qrm" else cfg.rm_lr, clip_grad=1.0), micro_batch_size=cfg.rm_batch,
        global_batch_size=cfg.rm_batch, train_iters=cfg.rm_iters, load=save, pretrained_checkpoint=p.sft, save=save,
        save_interval=cfg.rm_iters, log_interval=max(cfg.rm_iters // 10, 1), tensorboard=False))
    out = {"checkpoint": save, "train_pairs": n_pairs, "final_train_loss": last.get("loss"),
           "final_train_accuracy": last.get("accuracy")}
    for name in ("heldout", "train"):
        res = evaluate_reward_model(RMEvalConfig(
            load=save, data=p("pairs", f"{name}.jsonl"), seq_length=cfg.seq_length, micro_batch_size=32,
            output=p("rm", f"{kind}_eval_{name}.json"), parallel=ParallelConfig(seed=cfg.seed),
            dump_token_scores=p("rm", f"{kind}_tokens_{name}.jsonl") if name == "heldout" else None,
            reference_checkpoint=p.sft if kind == "dpo" else None))
        out[f"{name}_accuracy"] = res["pairwise_accuracy"]
        out[f"{name}_pairs"] = res["valid_pairs"]
    say(f"{RM_NAMES[kind]}: pairwise accuracy held-out {out['heldout_accuracy']:.3f} "
        f"({out['heldout_pairs']} pairs), train {out['train_accuracy']:.3f}")
    return out


def _demo_rl_trainer_class(demo_cfg: DemoConfig):
    from megatron_qrm.rl.trainer import RLTrainer

    class DemoRLTrainer(RLTrainer):
        """The RL trainer, plus the share of correct sampled responses per iteration (``rollout_accuracy``),
        judged by the task checker: the training reward the policy actually earns."""

        def rollout(self):
            exp = super().rollout()
            n, ok = exp["tokens"].shape[0], 0
            for j in range(n):
                pl, rl = int(exp["prompt_lens"][j]), int(exp["response_lens"][j])
                ids = [t for t in exp["tokens"][j, pl:pl + rl].tolist() if t != self.tokenizer.eos_id]
                label = self.prompts.labels[int(exp["prompt_index"][j])] or ""
                ok += arith.judge(self.tokenizer.decode(ids), label)[0]
            self._rollout_accuracy = ok / max(n, 1)
            return exp

        def evaluate(self):
            # the trainer's own evaluation (greedy Pass@1, evaluate_pass_at_1) plus the sampled Pass@1
            out = evaluate_policy_now(self.roles.actor.module, self.tokenizer, demo_cfg, self.cfg.eval_data)
            out["rollout_accuracy"] = getattr(self, "_rollout_accuracy", float("nan"))
            return out

    return DemoRLTrainer


def stage_rl(cfg: DemoConfig, p: Paths, algo: str, kind: str) -> dict:
    from megatron_qrm.config import ParallelConfig
    from megatron_qrm.data import PromptDataConfig
    from megatron_qrm.rl.rollout import SamplingConfig
    from megatron_qrm.rl.trainer import RLConfig
    from megatron_qrm.training.engine import OptimConfig
    from megatron_qrm.training.metrics_log import read_metrics

    save = p.rl(algo, kind)
    lr = cfg.ppo_lr if algo == "ppo" else cfg.reinforce_lr
    rl_cfg = RLConfig(
        algo=algo, prompts=PromptDataConfig(path=p("data", "rl_prompts.jsonl"), seq_length=cfg.seq_length),
        reward_model=p.rm(kind), actor=p.sft, load=save, save=save,
        dpo_reference=p.sft if kind == "dpo" else None, parallel=ParallelConfig(seed=cfg.seed),
        sampling=SamplingConfig(temperature=cfg.rl_temperature, max_new_tokens=cfg.max_new_tokens),
        rollout_batch_size=cfg.rl_rollout, generation_batch_size=cfg.generation_batch,
        forward_micro_batch_size=32, micro_batch_size=cfg.rl_micro_batch, global_batch_size=cfg.rl_global_batch,
        train_iters=cfg.rl_iters, kl_coef=cfg.kl_coef if algo == "ppo" else 0.0,
        actor_optim=OptimConfig(lr=lr, clip_grad=1.0), critic_optim=OptimConfig(lr=cfg.critic_lr, clip_grad=1.0),
        eval_data=p("data", "test.jsonl"), task=arith.TASK_NAME, eval_interval=1, save_interval=cfg.rl_iters,
        tensorboard=False, advantage=cfg.ppo_qrm_advantage if (algo, kind) == ("ppo", "qrm") else None)
    trainer = _demo_rl_trainer_class(cfg)(rl_cfg)
    trainer.train()
    by_step: dict[int, dict] = {}
    for rec in read_metrics(save):
        if "train/pass@1" in rec:
            by_step[int(rec["step"])] = rec
    steps = sorted(by_step)
    curve = [by_step[s]["train/pass@1"] for s in steps]
    sampled = [by_step[s].get("train/rollout_accuracy") for s in steps]
    greedy = [by_step[s].get("train/greedy_pass@1") for s in steps]
    say(f"{algo.upper()} + {RM_NAMES[kind]}: Pass@1 by iteration " + " ".join(f"{x:.3f}" for x in curve))
    return {"checkpoint": save, "iterations": steps, "pass@1": curve, "greedy_pass@1": greedy,
            "rollout_accuracy": sampled,
            "kl_mean": [by_step[s].get("train/kl_mean") for s in steps]}


def stage_localization(cfg: DemoConfig, p: Paths) -> dict:
    from megatron_qrm.demo.localization import localization_from_dumps

    out = {}
    for kind in cfg.rm_kinds:
        dump = p("rm", f"{kind}_tokens_heldout.jsonl")
        if kind == "orm" or not os.path.exists(dump):
            continue
        res = localization_from_dumps(dump, cfg.task)
        _write_json(p("localization", f"{kind}.json"), res)
        out[kind] = {k: v for k, v in res.items() if k != "examples"}
        say(f"{RM_NAMES[kind]}: lowest-credit step (credit of its result) = first wrong step in "
            f"{res['hit_rate']:.1%} of {res['responses']} held-out incorrect responses (chance {res['chance']:.1%}; "
            f"first-low rule {res['hit_rate_first_low']:.1%}; mean over all the step's tokens "
            f"{res['hit_rate_mean']:.1%})")
    return out


# ----------------------------------------------------------------------------- driver
def stage_list(cfg: DemoConfig) -> list[tuple[str, Callable[[DemoConfig, Paths], dict]]]:
    stages: list[tuple[str, Callable]] = [("data", stage_data), ("sft", stage_sft), ("pairs", stage_pairs)]
    for kind in cfg.rm_kinds:
        stages.append((f"rm-{kind}", lambda c, p, k=kind: stage_rm(c, p, k)))
    for algo in cfg.algos:
        for kind in cfg.rm_kinds:
            stages.append((f"rl-{algo}-{kind}", lambda c, p, a=algo, k=kind: stage_rl(c, p, a, k)))
    stages.append(("localization", stage_localization))
    return stages


def run_demo(cfg: DemoConfig, out: str, *, force_report: bool = True) -> dict:
    """Run (or resume) every stage under ``out``; returns the report dict. Writes ``report.md``."""
    from megatron_qrm.demo.report import write_report

    p = Paths(out)
    os.makedirs(p.out, exist_ok=True)
    cfg_path = p("demo_config.json")
    if os.path.exists(cfg_path):
        saved = _read_json(cfg_path)
        if saved != json.loads(json.dumps(cfg.to_dict())):
            diff = sorted(k for k in set(saved) | set(cfg.to_dict())
                          if saved.get(k) != json.loads(json.dumps(cfg.to_dict())).get(k))
            raise UserError(f"--out {out} holds a demo run with other settings ({', '.join(diff)}); "
                            f"use a new --out (or the same flags) to resume")
    else:
        _write_json(cfg_path, cfg.to_dict())
    stages = stage_list(cfg)
    results: dict[str, dict] = {}
    t_all = time.time()
    for i, (name, fn) in enumerate(stages, 1):
        marker = p("stages", f"{name}.json")
        if os.path.exists(marker):
            results[name] = _read_json(marker)
            say(f"({i}/{len(stages)}) {name}: done earlier ({results[name]['seconds']:.0f} s), skipped")
            continue
        say(f"({i}/{len(stages)}) {name} ...")
        t0 = time.time()
        res = fn(cfg, p)
        res["seconds"] = time.time() - t0
        _write_json(marker, res)
        results[name] = res
        say(f"({i}/{len(stages)}) {name}: done in {res['seconds']:.0f} s")
    from megatron_qrm import parallel

    parallel.destroy()
    report = write_report(cfg, p, results)
    say(f"all stages done in {time.time() - t_all:.0f} s (this invocation)")
    say(f"report: {p('report.md')}")
    return report
