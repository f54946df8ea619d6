"""The configuration of a PPO / REINFORCE run; ``qrm train-ppo`` / ``train-reinforce`` flags are generated
from it (:mod:`megatron_qrm.options`), so each default and help text exists once, here."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from megatron_qrm.config import ParallelConfig
from megatron_qrm.data import PromptDataConfig
from megatron_qrm.models import LoRAConfig
from megatron_qrm.options import option
from megatron_qrm.rl.rollout import SamplingConfig
from megatron_qrm.training.engine import OptimConfig

#: the actor's default learning rate per algorithm (the paper's settings)
ACTOR_LR = {"ppo": 5e-6, "reinforce": 1e-6}
#: RL runs clip no gradients by default (the reference does not)
RL_CLIP_GRAD = 0.0
CRITIC_LR = 1e-5

PPO = ("ppo",)
REINFORCE = ("reinforce",)


@dataclass
class RLConfig:
    """One RL run. Nested configs (``prompts``, ``parallel``, ``sampling``, optimizers, ``critic_lora``) have
    flags of their own; the fields below with a help text are flags named after the field."""

    algo: str = option(help="ppo | reinforce (fixed by the command)", cli=False)
    """``ppo`` | ``reinforce``."""
    prompts: PromptDataConfig = option(help="RL prompts", cli=False)
    """The prompt set (``--prompt-data`` ...)."""
    reward_model: Optional[str] = option(
        help="Q-RM / ORM / DPO-RM checkpoint (qrm train-rm or convert_hf)")
    """Checkpoint of the frozen reward model; None with a rule-based ``reward_fn``."""
    actor: Optional[str] = option(None, flag="--actor-checkpoint",
                                  help="initial policy (e.g. SFT) checkpoint; the reference starts from it")
    """Initial policy; the reference (PPO with KL) starts from it too."""
    load: Optional[str] = option(None, help="resume this RL run (its --save)")
    """An RL run's ``--save`` to resume (actor/ and critic/ inside)."""
    save: Optional[str] = option(None, help="checkpoint directory (actor/ and critic/ inside)")
    """Where checkpoints go."""
    tokenizer: Optional[str] = option(None, help="default: the actor checkpoint's")
    """The actor's tokenizer (HF directory or SentencePiece model)."""
    dpo_reference: Optional[str] = option(None, flag="--reference-checkpoint", deprecated=("--dpo-reference",),
                                          help="reference model of a fully fine-tuned DPO-RM")
    """The reference of a DPO-RM trained without LoRA (with LoRA: its base)."""
    critic_init: str = option("reward", choices=("reward", "actor", "checkpoint"), algos=PPO,
                              help="critic backbone: the reward model's (fresh value head, as the paper), the "
                                   "actor's, or --critic-checkpoint")
    """Where the critic's backbone comes from."""
    critic_checkpoint: Optional[str] = option(None, algos=PPO, help="critic checkpoint for --critic-init checkpoint")
    """A critic checkpoint (value head kept)."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """TP / PP layout and seed."""
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    """Rollout sampling settings."""
    rollout_batch_size: int = option(3072, help="prompts per iteration (all DP ranks)")
    """Prompts per iteration, over every data-parallel rank."""
    samples_per_prompt: int = option(1, help="responses sampled per prompt")
    """Responses sampled per prompt."""
    generation_batch_size: int = option(64, help="sequences per generation call per rank")
    """Sequences per ``generate`` call on a rank."""
    forward_micro_batch_size: int = option(8, help="sequences per scoring pass")
    """Sequences per forward pass when scoring a rollout."""
    micro_batch_size: int = option(2, help="sequences per update micro-batch")
    """Update: sequences per micro-batch."""
    global_batch_size: int = option(16, help="sequences per optimizer step (all DP ranks)")
    """Update: sequences per optimizer step, over every data-parallel rank."""
    ppo_epochs: int = option(1, help="passes over each rollout")
    """Update passes over each rollout."""
    train_iters: int = option(12, help="RL iterations (rollout + update)")
    """RL iterations."""
    advantage: Optional[str] = option(None, choices=("qrm", "qrm-reference", "gae"), algos=PPO,
                                      help="default: qrm for a Q-RM, gae for ORM / DPO-RM")
    """PPO's advantage estimator (:mod:`megatron_qrm.rl.estimators`); resolved per run."""
    kl_coef: float = option(0.01, algos=PPO,
                            help="beta of A_t = Z_std - beta*KL - V (REINFORCE: no KL term)")
    """Weight of the per-state KL to the reference. REINFORCE runs have none (0)."""
    kl_estimator: str = option("full", choices=("full", "k1", "k3", "abs"), algos=PPO,
                               help="full: KL of the full next-token distributions (vocab-parallel)")
    """How the per-state KL is computed."""
    clip_eps: float = option(0.2, algos=PPO, help="PPO ratio clipping range")
    """PPO ratio clipping range."""
    value_clip: Optional[float] = option(None, algos=PPO,
                                         help="PPO value clipping range around the rollout-time values "
                                              "(default: none, as the reference)")
    """Value clipping range; None: unclipped."""
    value_coef: float = option(0.01, algos=PPO, help="qrm-reference advantage only")
    """c_V of the reference code's advantage."""
    entropy_coef: float = option(0.0, help="entropy bonus weight")
    """Entropy bonus weight (0: entropy is only logged)."""
    gamma: float = option(0.9, algos=PPO, help="GAE discount (gae advantage only)")
    """GAE discount."""
    lam: float = option(0.8, algos=PPO, help="GAE lambda (gae advantage only)")
    """GAE lambda."""
    eos_rescore: bool = option(False, algos=REINFORCE, help="the reference's EOS re-scoring")
    """REINFORCE: re-score each response's last action with its mean credit (the reference's)."""
    reinforce_center: bool = option(True, flag="--reward-centering", algos=REINFORCE,
                                    help="standardise the returns; --no-reward-centering: as the reference, Q-RM "
                                         "Z/sigma, ORM the broadcast reward / sigma over tokens (docs/rl.md)")
    """REINFORCE: subtract the batch mean before dividing by sigma."""
    actor_optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=ACTOR_LR["ppo"], clip_grad=RL_CLIP_GRAD))
    """The actor's optimizer (``--lr``, ``--clip-grad``, ``--weight-decay``)."""
    critic_optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=CRITIC_LR, clip_grad=RL_CLIP_GRAD))
    """The critic's optimizer (``--critic-lr``)."""
    critic_lora: LoRAConfig = field(default_factory=LoRAConfig)
    """LoRA adapters of the critic (``--critic-lora-rank``)."""
    eval_data: Optional[str] = option(None, help="test prompts with `label` for Pass@1 after iterations")
    """Prompts with gold labels for Pass@1."""
    eval_interval: int = option(1, help="evaluate every N iterations (and at the end)")
    """Evaluate every N iterations."""
    eval_max_prompts: Optional[int] = option(None, help="evaluate on the first N prompts only")
    """Evaluation subset size."""
    task: Optional[str] = option(None, help="answer checker: gsm8k | math | a registered task")
    """Answer checker for Pass@1."""
    save_interval: int = option(1, help="checkpoint every N iterations (and at the end)")
    """Checkpoint every N iterations."""
    log_interval: int = option(1, help="log metrics every N iterations (and the last)")
    """Log every N iterations."""
    log_dir: Optional[str] = option(None, help="metrics.jsonl + TensorBoard (default: --save)")
    """Where metrics go (default: ``save``)."""
    tensorboard: bool = option(True, help="write TensorBoard event files")
    """TensorBoard event files beside metrics.jsonl."""
    wandb_project: Optional[str] = option(None, help="also log to this Weights & Biases project")
    """Weights & Biases project."""
    wandb_run_name: Optional[str] = option(None, help="Weights & Biases run name")
    """Weights & Biases run name."""
    offload: bool = option(False, help="move frozen models off the GPU between phases")
    """Move the frozen models (reference, reward) off the GPU between phases."""
    allow_retokenize: bool = option(False, help="accept a reward model whose tokenizer differs from the actor's")
    """Score re-tokenised responses when the reward model's tokenizer differs."""
    exit_interval: Optional[int] = option(None, help="save and exit at this iteration")
    """Save and exit at a multiple of this iteration."""
    bf16: bool = option(False, help="bf16 (from --bf16 / --fp32)", cli=False)
    """bf16 parameters and compute (GPU)."""
    transformer_impl: str = option("auto", choices=("auto", "te", "local"),
                                   help="Transformer Engine spec (te), megatron-core local spec, or te when available")
    """Layer spec."""
    local_attention: str = option("auto", choices=("auto", "sdpa", "unfused"),
                                  help="core attention of the local spec (unfused: megatron-core's, for parity checks)")
    """Core attention of the local spec."""
    max_nonfinite_steps: int = option(3,
                                      help="update steps with a non-finite loss or gradient are skipped; this many "
                                           "in a row stop the run (exit 3) without saving")
    """Skipped non-finite update steps in a row before the run stops."""
    pack_sequences: bool = option(True, help="pack update micro-batches into THD streams (no compute on padding)")
    """Actor / critic updates on packed sequences (:mod:`megatron_qrm.rl.update_batching`)."""
    pack_tokens: Optional[int] = option(None,
                                        help="tokens per packed update micro-batch (default: --micro-batch-size x "
                                             "the rollout's padded length)")
    """Capacity of a packed update micro-batch."""
    allow_tokenizer_change: bool = option(False, help="accept a tokenizer other than the checkpoint's "
                                                      "(recorded in the new checkpoints)")
    """Accept a tokenizer other than the actor checkpoint's."""
    rollout_engine: str = option("megatron", cli=False, help="--rollout-engine (rl/cli.py)")
    """Sampling engine (:mod:`megatron_qrm.rl.rollout_engine`): ``megatron`` (the project's KV-cache decoder
    on the actor) or ``vllm`` (an in-process vLLM engine refitted from the actor after every update)."""
    vllm: Optional[object] = option(None, cli=False, help="the --vllm-* flags (rl/cli.py)")
    """vLLM engine settings (:class:`megatron_qrm.rl.vllm_engine.VLLMEngineConfig`; None: its defaults)."""
    rollout_is_correction: bool = option(False, cli=False, help="--rollout-is-correction (rl/cli.py)")
    """Multiply each token's policy loss by ``min(exp(logp_old - behaviour_logp), cap)``
    (:func:`megatron_qrm.rl.losses.truncated_is_weights`): corrects for the rollout engine's distribution
    differing from the trainer's. Off: the update treats the engine's samples as the trainer's own."""
    rollout_is_cap: float = option(2.0, cli=False, help="--rollout-is-cap (rl/cli.py)")
    """Cap of the truncated importance weights."""
