"""verl reward manager that asks ``qrm serve`` for per-token credits and returns verl's token-level reward
tensor, aligned to the policy's own response tokens.

verl's contract (``verl/workers/reward_manager``, ``verl/experimental/reward_loop/reward_manager``): the
batch (a ``DataProto``) holds ``prompts`` [B, P] (left-padded), ``responses`` [B, R] (right-padded) and
``attention_mask`` [B, P + R]; a reward manager returns a float32 ``[B, R]`` tensor (``reward_tensor`` /
``rm_scores``), which becomes ``token_level_scores`` and, after the KL penalty, ``token_level_rewards``.
verl's own managers put one sequence score on the last response token; this one fills every response
token with its credit.

Alignment: each response is decoded with the policy's tokenizer (the text it adds after its prompt) and
sent with the policy-rendered prompt (``prompts_rendered``); the server answers with the reward model's
tokens, their character spans and credits. Each policy token takes the credit of the reward-model token
covering its last character -- :func:`megatron_qrm.rl.experience.covering_tokens`, the mapping of the RL
trainers' ``--allow-retokenize`` -- so the policy may use another tokenizer than the reward model; with
the same tokenizer the mapping is the identity. A final stop token takes the EOS's credit. A Q-RM or
DPO-RM gives per-token credits; an ORM's score goes on the last response token (verl's convention). An
empty response (only a stop token, or nothing) gets reward 0: the server refuses empty responses.

Use it from verl (``reward_model.reward_manager`` / ``reward.reward_manager`` config)::

    reward.reward_manager.source=importlib
    reward.reward_manager.name=QRMRewardManager
    reward.reward_manager.module.path=pkg://megatron_qrm.serving.verl_adapter   # or the file's path
    # and QRM_SERVER_URL=http://127.0.0.1:8000 (QRM_API_KEY=... when the server has --api-key)
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple, Optional

import numpy as np
import torch

from megatron_qrm.rl.experience import RETOKENIZE_CONTEXT, covering_tokens, token_text_ends
from megatron_qrm.serving.client import AsyncQRMClient, QRMClient


class _Prepared(NamedTuple):
    """Policy side of a batch: what to send and how to map the answers back. (A NamedTuple: verl may load
    this file by path, outside ``sys.modules``, where ``dataclass`` cannot resolve the module.)"""

    rows: list[int]  # batch rows sent to the server (non-empty responses)
    items: list[tuple[str, str]]  # (rendered prompt, response text) per sent row
    texts: list[str]  # response text per batch row
    char_ends: list[list[int]]  # per batch row: each body token's end (characters)
    nonspace_ends: list[list[int]]  # ... in non-whitespace characters
    body_len: list[int]  # response tokens before the stop token
    stop: list[bool]  # the response ends with the stop token
    response_len: list[int]  # valid response tokens (attention mask)
    shape: tuple[int, int]  # [B, R]


def _nonspace_prefix(text: str) -> np.ndarray:
    """[len(text) + 1]: number of non-whitespace characters in ``text[:k]``."""
    return np.concatenate([[0], np.cumsum([not c.isspace() for c in text], dtype=np.int64)])


def prepare(prompts: torch.Tensor, responses: torch.Tensor, attention_mask: torch.Tensor, policy_tokenizer,
            eos_token_id: Optional[int] = None, window: int = RETOKENIZE_CONTEXT) -> _Prepared:
    """Decode a verl batch with the policy's tokenizer (see the module docstring for the tensors)."""
    b, p = prompts.shape
    r = responses.shape[1]
    mask = attention_mask.bool().cpu()
    prompt_ids = [prompts[i][mask[i, :p]].tolist() for i in range(b)]
    resp_len = mask[:, p:].sum(1).tolist()
    resp_ids = [responses[i, :resp_len[i]].tolist() for i in range(b)]
    eos = policy_tokenizer.eos_token_id if eos_token_id is None else eos_token_id
    stop = [bool(ids) and ids[-1] == eos for ids in resp_ids]
    bodies = [ids[:-1] if s else ids for ids, s in zip(resp_ids, stop)]
    texts, char_ends, nonspace_ends = token_text_ends(policy_tokenizer, prompt_ids, bodies, window)
    rows = [i for i in range(b) if texts[i]]
    items = [(policy_tokenizer.decode(prompt_ids[i]), texts[i]) for i in rows]
    return _Prepared(rows, items, texts, char_ends, nonspace_ends, [len(x) for x in bodies], stop, resp_len,
                     (b, r))


def assemble(prep: _Prepared, results: list[dict], kind: str) -> tuple[torch.Tensor, list[float]]:
    """The [B, R] float32 token-level reward tensor and each row's sequence score (0 for empty rows)."""
    b, r = prep.shape
    reward = torch.zeros(b, r, dtype=torch.float32)
    scores = [0.0] * b
    if not prep.rows:
        return reward, scores
    actor_ends, rm_ends, by_char, body_credits, eos_credit = [], [], [], [], []
    for i, res in zip(prep.rows, results):
        credits = np.asarray(res["credits"], dtype=np.float64)
        n_body = len(credits) - (0 if res["truncated"] else 1)  # the server appends EOS unless it cut it
        ends = [e for _, e in res["offsets"][:n_body]]
        exact = res["response_text"] == prep.texts[i]
        if not exact:
            ends = _nonspace_prefix(res["response_text"])[ends].tolist()
        actor_ends.append(prep.char_ends[i] if exact else prep.nonspace_ends[i])
        rm_ends.append(ends)
        by_char.append(exact)
        body_credits.append(credits[:n_body])
        eos_credit.append(None if res["truncated"] else float(credits[-1]))
        scores[i] = float(res["score"])
    j, _ = covering_tokens(actor_ends, rm_ends, by_char)
    for k, i in enumerate(prep.rows):  # one row at a time: ragged lengths (client side, not a model path)
        last = prep.response_len[i] - 1
        if kind == "orm":
            reward[i, last] = scores[i]
            continue
        n = prep.body_len[i]
        if len(body_credits[k]):
            reward[i, :n] = torch.from_numpy(body_credits[k][j[k, :n].numpy()]).float()
        if prep.stop[i]:
            tail = eos_credit[k] if eos_credit[k] is not None else float(body_credits[k][-1])
            reward[i, last] = tail
    return reward, scores


def token_level_rewards(prompts: torch.Tensor, responses: torch.Tensor, attention_mask: torch.Tensor,
                        policy_tokenizer, client: QRMClient, kind: Optional[str] = None,
                        eos_token_id: Optional[int] = None) -> tuple[torch.Tensor, list[float]]:
    """Blocking: verl batch tensors -> ([B, R] token-level rewards, [B] sequence scores)."""
    prep = prepare(prompts, responses, attention_mask, policy_tokenizer, eos_token_id)
    kind = kind or client.health()["kind"]
    results = client.score(prep.items, truncate=True, prompts_rendered=True) if prep.rows else []
    return assemble(prep, results, kind)


class QRMRewardManager:
    """A verl reward manager backed by ``qrm serve`` (both of verl's reward-manager interfaces):

    * the reward loop (verl >= 0.6): ``await run_single(data)`` per sample returns ``{"reward_score": [R]
      token rewards, "reward_extra_info": {"qrm_score": ...}}`` and :meth:`assemble_rm_scores` stacks them
      into ``rm_scores`` [B, R];
    * the classic manager: ``manager(data, return_dict=False)`` returns the [B, R] reward tensor (or
      ``{"reward_tensor", "reward_extra_info"}``).

    The server comes from ``server_url`` or ``$QRM_SERVER_URL`` (default http://127.0.0.1:8000), the key
    from ``api_key`` or ``$QRM_API_KEY``.
    """

    def __init__(self, config: Any = None, tokenizer: Any = None, compute_score: Any = None,
                 server_url: Optional[str] = None, api_key: Optional[str] = None, num_examine: int = 0,
                 reward_fn_key: str = "data_source", timeout: float = 600.0, **kwargs: Any):
        if tokenizer is None:
            raise ValueError("QRMRewardManager needs the policy's tokenizer (verl passes it as `tokenizer`)")
        self.config = config
        self.tokenizer = tokenizer
        self.server_url = server_url or os.environ.get("QRM_SERVER_URL", "http://127.0.0.1:8000")
        self.api_key = api_key or os.environ.get("QRM_API_KEY")
        self.timeout = timeout
        self._client: Optional[QRMClient] = None
        self._kind: Optional[str] = None

    def _sync_client(self) -> QRMClient:
        if self._client is None:
            self._client = QRMClient(self.server_url, self.api_key, timeout=self.timeout)
        return self._client

    def _server_kind(self) -> str:
        if self._kind is None:
            self._kind = self._sync_client().health()["kind"]
        return self._kind

    @staticmethod
    def _tensors(data) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return data.batch["prompts"], data.batch["responses"], data.batch["attention_mask"]

    # ---- classic interface
    def __call__(self, data, return_dict: bool = False):
        reward, scores = token_level_rewards(*self._tensors(data), self.tokenizer, self._sync_client(),
                                             kind=self._server_kind())
        if return_dict:
            return {"reward_tensor": reward, "reward_extra_info": {"qrm_score": scores}}
        return reward

    # ---- reward-loop interface
    async def run_single(self, data) -> dict:
        prep = prepare(*self._tensors(data), self.tokenizer)
        kind = self._server_kind()
        results = []
        if prep.rows:
            async with AsyncQRMClient(self.server_url, self.api_key, timeout=self.timeout) as client:
                results = await client.score(prep.items, truncate=True, prompts_rendered=True)
        reward, scores = assemble(prep, results, kind)
        return {"reward_score": reward[-1].tolist(), "reward_extra_info": {"qrm_score": scores[-1]}}

    @classmethod
    def assemble_rm_scores(cls, data, scores: list) -> torch.Tensor:
        """[B, R] ``rm_scores`` from the per-sample token reward lists of :meth:`run_single`."""
        return torch.tensor(scores, dtype=torch.float32)
