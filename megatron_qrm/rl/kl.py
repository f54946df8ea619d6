"""Per-token KL divergences between the policy and the reference (SFT) model, and the entropy.

See ``docs/method.md`` §5 "PPO" (Algorithm 1 uses the KL between the *full* next-token distributions) and
``docs/rl.md`` "Differences from the reference code" (the reference code uses the absolute log-ratio of the
sampled token).

Conventions
-----------
Every per-token quantity is aligned to actions: column ``t`` of a ``[N, T]`` tensor belongs to the state
``s_t`` whose action ``a_t`` was sampled; ``logits[:, t]`` is the next-token distribution *at* ``s_t``
(i.e. the logits that produced ``a_t``), and ``logp[:, t] = log pi(a_t | s_t)``.

Two families of estimators:

* **Full-distribution KL** ``KL(pi_theta(.|s_t) || pi_ref(.|s_t)) = sum_v p_v (log p_v - log q_v)`` from
  logits ``[N, T, V]`` — exact, needs both models' logits. :func:`vocab_parallel_full_kl` computes the same
  quantity when every tensor-parallel rank holds a vocabulary slice ``[N, T, V/tp]``; it only all-reduces
  ``[N, T]`` tensors (a max and three sums), never the vocabulary.
* **Sampled-token estimators** from the log-probs of the sampled action only (Schulman's k1/k3 and the
  reference code's absolute log-ratio). They are single-sample estimates of ``KL(pi || pi_ref)`` with the
  action drawn from ``pi`` (k1 unbiased but signed, k3 unbiased and non-negative, abs biased upwards).

All functions return float32 (float64 stays float64): bf16 logits are up-cast before the softmax because
``p log p`` summed over ~10^5 entries in bf16 loses the small KL values this penalty is about.
None of them applies an action mask; the advantage code masks (with ``torch.where``) afterwards.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

__all__ = [
    "KL_KINDS",
    "entropy_from_logits",
    "full_kl",
    "kl_abs",
    "kl_k1",
    "kl_k3",
    "kl_penalty",
    "vocab_parallel_entropy",
    "vocab_parallel_entropy_no_grad",
    "vocab_parallel_entropy_recomputed",
    "vocab_parallel_full_kl",
]

#: Names accepted by :func:`kl_penalty`.
KL_KINDS: tuple[str, ...] = ("full", "k1", "k3", "abs")


def _upcast(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


# --------------------------------------------------------------------------------------------------
# collectives (vocab-parallel helpers)
# --------------------------------------------------------------------------------------------------


#: ``group`` of the unsharded functions (:func:`full_kl`, :func:`entropy_from_logits`): no collective at all. (With
#: ``group=None`` torch.distributed means the whole world: in a multi-process run they summed over every rank.)
_UNSHARDED = object()


def _group_size(group) -> int:
    if group is _UNSHARDED or not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


class _AllReduceSumIdentityBackward(torch.autograd.Function):
    """Sum over the group in the forward, identity in the backward (Megatron's "reduce from TP region").

    Why identity and not ``torch.distributed.nn.all_reduce`` (whose backward all-reduces the gradient):
    every rank of a tensor-parallel group goes on to compute the *same* replicated loss from the reduced
    value, so ``dL/d(partial_r) = dL/d(total)`` is already complete on each rank. Summing the gradients
    over the group would multiply it by the group size. This is only correct because every function below
    uses the reduced quantities in a replicated way (no rank-local use of a reduced value — see
    :func:`vocab_parallel_entropy`).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Optional[dist.ProcessGroup]) -> torch.Tensor:  # type: ignore[override]
        y = x.clone()
        dist.all_reduce(y, op=dist.ReduceOp.SUM, group=group)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return grad, None


def _all_reduce_sum(x: torch.Tensor, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    if _group_size(group) == 1:
        return x
    return _AllReduceSumIdentityBackward.apply(x, group)


def _global_max(local_logits: torch.Tensor, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """``[N, T, 1]`` max over the full vocabulary, detached.

    Detached on purpose: the max is only a shift for numerical stability and every quantity computed from
    it is exactly invariant to that shift, so its true derivative is zero.
    """
    m = local_logits.detach().amax(dim=-1, keepdim=True)
    if _group_size(group) > 1:
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    # a row of all -inf logits would give -inf - -inf = NaN below; such rows are degenerate anyway, use 0
    return torch.where(torch.isfinite(m), m, torch.zeros_like(m))


def _shifted_exp(logits: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(d, e)`` with ``d = logits - m`` and ``e = exp(d)``, both ``[N, T, V_local]``.

    Entries whose logit is ``-inf`` (e.g. masked or padded vocabulary slots) get ``d = 0``: their
    probability ``e`` is exactly 0, so ``e * d`` must be ``0`` rather than ``0 * -inf = NaN`` — in the
    forward *and* in the backward (masking the product instead would still route a NaN gradient through
    the unselected branch). Finite but very negative logits keep their ``d`` (``exp`` underflows to 0 and
    ``0 * d`` is 0 anyway).
    """
    d = logits - m
    e = torch.exp(d)
    d = torch.where(torch.isfinite(d), d, torch.zeros((), dtype=d.dtype, device=d.device))
    return d, e


# --------------------------------------------------------------------------------------------------
# full-distribution KL and entropy
# --------------------------------------------------------------------------------------------------


def _kl_from_parts(
    logits_actor: torch.Tensor, logits_ref: torch.Tensor, group: Optional[dist.ProcessGroup]
) -> torch.Tensor:
    """Shared body of :func:`full_kl` and :func:`vocab_parallel_full_kl`.

    With ``d_v = z_v - m_z`` (actor), ``g_v = y_v - m_y`` (reference), ``S_z = sum_v exp(d_v)``,
    ``S_y = sum_v exp(g_v)``:

        KL = sum_v p_v (log p_v - log q_v) = B / S_z - log S_z + log S_y,
        B  = sum_v exp(d_v) (d_v - g_v).

    ``B``, ``S_z``, ``S_y`` are sums over the vocabulary, so each rank sums its slice and one all-reduce
    gives the total. The KL is then a function of the three *reduced* quantities only, which is what makes
    the identity backward of the all-reduce exact. A fourth reduced count flags rows where the reference
    gives probability 0 (logit ``-inf``) to a token the policy can emit: their KL is ``+inf``.
    """
    z = _upcast(logits_actor)
    y = _upcast(logits_ref).to(z.dtype)
    d, e_z = _shifted_exp(z, _global_max(z, group))
    g, e_y = _shifted_exp(y, _global_max(y, group))
    b_local = (e_z * (d - g)).sum(dim=-1)  # [N, T]
    # p_v > 0 where q_v == 0 exactly; counted in the detached flag, not folded into B, to keep grads finite
    impossible = ((e_z.detach() > 0) & torch.isneginf(y.detach())).sum(dim=-1).to(z.dtype)
    parts = torch.stack([b_local, e_z.sum(dim=-1), e_y.sum(dim=-1), impossible])  # [4, N, T]: one collective
    b, s_z, s_y, n_impossible = _all_reduce_sum(parts, group).unbind(0)
    kl = b / s_z - torch.log(s_z) + torch.log(s_y)
    return torch.where(n_impossible > 0, torch.full_like(kl, float("inf")), kl)


def full_kl(logits_actor: torch.Tensor, logits_ref: torch.Tensor) -> torch.Tensor:
    """Exact per-position ``KL(pi_theta(.|s_t) || pi_ref(.|s_t))`` over the full next-token distribution.

    Args:
        logits_actor: ``[N, T, V]`` policy logits at each state.
        logits_ref: ``[N, T, V]`` reference-model logits at the same states.

    Returns:
        ``[N, T]`` float32 KL (>= 0 up to rounding). Differentiable w.r.t. both inputs; Algorithm 1 treats
        it as a constant in the advantage, so callers computing rewards should detach / use ``no_grad``.
    """
    if logits_actor.shape != logits_ref.shape:
        raise ValueError(f"full_kl: shape mismatch {tuple(logits_actor.shape)} vs {tuple(logits_ref.shape)}")
    return _kl_from_parts(logits_actor, logits_ref, group=_UNSHARDED)


def vocab_parallel_full_kl(
    local_logits_actor: torch.Tensor,
    local_logits_ref: torch.Tensor,
    group: Optional[dist.ProcessGroup] = None,
) -> torch.Tensor:
    """:func:`full_kl` when each rank of ``group`` holds a vocabulary slice (tensor-parallel LM head).

    The log-softmax normaliser is assembled from an all-reduce(MAX) of the per-row max and an
    all-reduce(SUM) of the per-row sum-exp; ``sum_v p_v (log p_v - log q_v)`` is summed over the local slice
    and all-reduced. Only ``[N, T]``-sized tensors travel (one MAX per model, one stacked SUM); the
    vocabulary is never gathered. Both models' slices must cover the same vocabulary ids on a rank.

    Gradients: the all-reduce has an identity backward (Megatron convention), so backpropagating a loss
    that is *replicated* over the group yields, on each rank, the exact gradient w.r.t. its local logits.

    Args:
        local_logits_actor: ``[N, T, V/tp]`` this rank's slice of the policy logits.
        local_logits_ref: ``[N, T, V/tp]`` the same slice of the reference logits.
        group: the tensor-parallel process group (``None`` = default group). With a group of size 1 (or no
            initialised process group) this is exactly :func:`full_kl`.

    Returns:
        ``[N, T]`` float32 KL, identical on every rank of the group.
    """
    if local_logits_actor.shape != local_logits_ref.shape:
        raise ValueError(
            f"vocab_parallel_full_kl: shape mismatch {tuple(local_logits_actor.shape)} vs "
            f"{tuple(local_logits_ref.shape)}"
        )
    return _kl_from_parts(local_logits_actor, local_logits_ref, group)


def _entropy_from_parts(logits: torch.Tensor, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """``H = log S - A / S`` with ``S = sum_v exp(d_v)``, ``A = sum_v exp(d_v) d_v``, ``d = z - max z``.

    Written as a function of the two vocabulary sums only (instead of ``-sum_v p_v log p_v`` with ``p_v``
    using the reduced ``S`` locally) so that the identity-backward all-reduce gives exact gradients.
    """
    z = _upcast(logits)
    d, e = _shifted_exp(z, _global_max(z, group))
    parts = torch.stack([(e * d).sum(dim=-1), e.sum(dim=-1)])  # [2, N, T]
    a, s = _all_reduce_sum(parts, group).unbind(0)
    return torch.log(s) - a / s


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Per-position entropy ``H(pi(.|s_t)) = -sum_v p_v log p_v`` of the softmax of ``logits``.

    Args:
        logits: ``[..., V]`` (typically ``[N, T, V]``).

    Returns:
        ``[...]`` float32 entropy; differentiable.
    """
    return _entropy_from_parts(logits, group=_UNSHARDED)


def vocab_parallel_entropy(local_logits: torch.Tensor, group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """:func:`entropy_from_logits` with the vocabulary sharded over ``group``.

    Args:
        local_logits: ``[N, T, V/tp]`` this rank's vocabulary slice.
        group: tensor-parallel process group (``None`` = default group).

    Returns:
        ``[N, T]`` float32 entropy, identical on every rank; exact gradients for a replicated loss (see
        :func:`vocab_parallel_full_kl`).
    """
    return _entropy_from_parts(local_logits, group)


#: Tokens per chunk of the chunked entropy (:func:`vocab_parallel_entropy_no_grad`,
#: :func:`vocab_parallel_entropy_recomputed`): at a 128k vocabulary one chunk's two fp32 temporaries are ~0.25 GB
#: each (512 x 128,256 x 4 bytes), a fixed bound instead of a multiple of the logits.
ENTROPY_CHUNK_TOKENS = 512


def _chunk_parts(chunk: torch.Tensor, vocab_size: int, group) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(d, e, S)`` of ``chunk [c, V/tp]``: the shifted fp32 logits ``d = z - max z`` (padded vocabulary masked;
    -inf entries set to 0), ``e = exp(d)`` (0 where the logit was -inf) and the global ``S = sum e`` ``[c]``."""
    from megatron_qrm.models.logits import fp32_masked_copy, mask_padded_vocab

    if chunk.dtype == torch.float64:
        d = mask_padded_vocab(chunk, vocab_size).clone()
    else:
        d = fp32_masked_copy(chunk, vocab_size)
    d.sub_(_global_max(d, group))
    e = torch.exp(d)  # exp(-inf) = 0 ...
    d.masked_fill_(~torch.isfinite(d), 0.0)  # ... and 0 * d must be 0, not NaN (see _shifted_exp)
    return d, e, _all_reduce_sum(e.sum(-1), group)


@torch.no_grad()
def vocab_parallel_entropy_no_grad(local_logits: torch.Tensor, vocab_size: int,
                                   group: Optional[dist.ProcessGroup] = None,
                                   chunk_tokens: int = ENTROPY_CHUNK_TOKENS) -> torch.Tensor:
    """:func:`vocab_parallel_entropy` ``[...]`` of logits ``[..., V/tp]`` (any dtype; padded vocabulary columns,
    global id >= ``vocab_size``, masked) for logging: no autograd graph, ``chunk_tokens`` positions at a time, two
    fp32 temporaries per chunk: ``H = log S - A / S`` with ``S = sum exp(d)``, ``A = sum exp(d) d``. Every rank of
    ``group`` runs the same chunks (the chunking depends on the shape only), so the collectives match."""
    flat = local_logits.reshape(-1, local_logits.shape[-1])
    out = torch.empty(flat.shape[0], dtype=torch.float64 if flat.dtype == torch.float64 else torch.float32,
                      device=flat.device)
    for start in range(0, flat.shape[0], chunk_tokens):
        d, e, s = _chunk_parts(flat[start:start + chunk_tokens], vocab_size, group)
        a = _all_reduce_sum(e.mul_(d).sum(-1), group)
        out[start:start + chunk_tokens] = torch.log(s) - a / s
    return out.reshape(local_logits.shape[:-1])


class _RecomputedEntropy(torch.autograd.Function):
    """Entropy whose backward recomputes the softmax from the logits a chunk at a time: nothing of vocabulary
    size is saved but the logits themselves (alive anyway as the model output). ``dH/dz_v = -p_v (log p_v + H)``
    with ``p`` the global softmax; ``H`` is replicated over the group, so each rank's slice of the gradient is
    exact without a reduction (as for :func:`vocab_parallel_entropy`)."""

    @staticmethod
    def forward(ctx, local_logits, vocab_size, group, chunk_tokens):  # type: ignore[override]
        h = vocab_parallel_entropy_no_grad(local_logits, vocab_size, group, chunk_tokens)
        ctx.save_for_backward(local_logits, h)
        ctx.vocab_size, ctx.group, ctx.chunk_tokens = vocab_size, group, chunk_tokens
        return h

    @staticmethod
    def backward(ctx, grad_h):  # type: ignore[override]
        local_logits, h = ctx.saved_tensors
        flat = local_logits.reshape(-1, local_logits.shape[-1])
        gh, hf = grad_h.reshape(-1), h.reshape(-1)
        grad = torch.empty_like(flat)
        with torch.no_grad():
            for start in range(0, flat.shape[0], ctx.chunk_tokens):
                stop = start + ctx.chunk_tokens
                d, e, s = _chunk_parts(flat[start:stop], ctx.vocab_size, ctx.group)
                # -p (log p + H) with p = e / S, log p = d - log S; entries with p = 0 (masked, -inf) get 0
                d.sub_((torch.log(s) - hf[start:stop]).unsqueeze(-1))
                g = e.div_(s.unsqueeze(-1)).mul_(d).mul_(-gh[start:stop].unsqueeze(-1))
                grad[start:stop] = g.to(grad.dtype)
        return grad.reshape(local_logits.shape), None, None, None


def vocab_parallel_entropy_recomputed(local_logits: torch.Tensor, vocab_size: int,
                                      group: Optional[dist.ProcessGroup] = None,
                                      chunk_tokens: int = ENTROPY_CHUNK_TOKENS) -> torch.Tensor:
    """:func:`vocab_parallel_entropy` ``[...]`` of logits ``[..., V/tp]`` (padded vocabulary masked) with autograd,
    holding no vocabulary-sized tensor between forward and backward (an entropy bonus at a 128k vocabulary
    otherwise keeps four fp32 copies of the logits); forward and backward work ``chunk_tokens`` positions at a
    time."""
    return _RecomputedEntropy.apply(local_logits, vocab_size, group, chunk_tokens)


# --------------------------------------------------------------------------------------------------
# sampled-token estimators
# --------------------------------------------------------------------------------------------------


def _check_pair(logp: torch.Tensor, logp_ref: torch.Tensor, what: str) -> None:
    if logp.shape != logp_ref.shape:
        raise ValueError(f"{what}: shape mismatch {tuple(logp.shape)} vs {tuple(logp_ref.shape)}")


def kl_k1(logp: torch.Tensor, logp_ref: torch.Tensor) -> torch.Tensor:
    """k1 estimator ``log pi(a_t|s_t) - log pi_ref(a_t|s_t)`` (unbiased, can be negative).

    Args:
        logp: ``[N, T]`` log-probs of the sampled actions under the policy.
        logp_ref: ``[N, T]`` log-probs of the same actions under the reference model.

    Returns:
        ``[N, T]`` float32.
    """
    _check_pair(logp, logp_ref, "kl_k1")
    return _upcast(logp) - _upcast(logp_ref)


def kl_k3(logp: torch.Tensor, logp_ref: torch.Tensor) -> torch.Tensor:
    """k3 estimator ``exp(logp_ref - logp) - (logp_ref - logp) - 1`` (unbiased for actions from pi, >= 0).

    Args:
        logp: ``[N, T]`` policy log-probs of the sampled actions.
        logp_ref: ``[N, T]`` reference log-probs of the same actions.

    Returns:
        ``[N, T]`` float32, non-negative.
    """
    _check_pair(logp, logp_ref, "kl_k3")
    log_ratio = _upcast(logp_ref) - _upcast(logp)
    # expm1 keeps precision for the tiny log-ratios typical early in training: (e^x - 1) - x
    return torch.expm1(log_ratio) - log_ratio


def kl_abs(logp: torch.Tensor, logp_ref: torch.Tensor) -> torch.Tensor:
    """Absolute log-ratio ``|logp - logp_ref|`` — the reference code's PPO penalty (``docs/rl.md``, "Differences from the reference code").

    Args:
        logp: ``[N, T]`` policy log-probs of the sampled actions.
        logp_ref: ``[N, T]`` reference log-probs of the same actions.

    Returns:
        ``[N, T]`` float32, non-negative.
    """
    _check_pair(logp, logp_ref, "kl_abs")
    return (_upcast(logp) - _upcast(logp_ref)).abs()


def kl_penalty(
    kind: str,
    *,
    logp: Optional[torch.Tensor] = None,
    logp_ref: Optional[torch.Tensor] = None,
    logits: Optional[torch.Tensor] = None,
    logits_ref: Optional[torch.Tensor] = None,
    group: Optional[dist.ProcessGroup] = None,
) -> torch.Tensor:
    """Per-token KL penalty of the requested ``kind`` (one of :data:`KL_KINDS`).

    * ``"full"``: needs ``logits`` and ``logits_ref`` (``[N, T, V]``, or ``[N, T, V/tp]`` slices with
      ``group`` set — then :func:`vocab_parallel_full_kl` is used);
    * ``"k1"``, ``"k3"``, ``"abs"``: need ``logp`` and ``logp_ref`` (``[N, T]``).

    Returns:
        ``[N, T]`` float32 penalty (not masked).
    """
    if kind == "full":
        if logits is None or logits_ref is None:
            raise ValueError("kl_penalty('full') needs logits and logits_ref")
        if group is not None and _group_size(group) > 1:
            return vocab_parallel_full_kl(logits, logits_ref, group)
        return full_kl(logits, logits_ref)
    estimators = {"k1": kl_k1, "k3": kl_k3, "abs": kl_abs}
    if kind not in estimators:
        raise ValueError(f"unknown KL kind {kind!r}; expected one of {KL_KINDS}")
    if logp is None or logp_ref is None:
        raise ValueError(f"kl_penalty({kind!r}) needs logp and logp_ref")
    return estimators[kind](logp, logp_ref)
