"""The checkpoint record (``qrm_config.json``) of every role, from the one builder
(:func:`megatron_qrm.training.checkpoint_record.checkpoint_record`), against the records earlier versions
wrote, spelled out here key by key: a checkpoint written before the builder existed and one written after it
hold the same JSON text (``save_checkpoint`` writes ``json.dumps(..., indent=2, sort_keys=True)``)."""

from __future__ import annotations

import json

import pytest

from megatron_qrm.config import ModelConfig
from megatron_qrm.data.preference import PreferenceDataConfig
from megatron_qrm.data.tokenizer import tokenizer_fingerprint
from megatron_qrm.models.lora import LoRAConfig
from megatron_qrm.rewards.scoring import RewardLossConfig
from megatron_qrm.training.checkpoint_record import checkpoint_record

MODEL = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128,
                    vocab_size=400)


class _Tok:  # what the record reads from a tokenizer
    vocab_size = 400


@pytest.fixture
def tok_path(tmp_path):
    path = tmp_path / "sp.model"
    path.write_bytes(b"not really a sentencepiece model")
    return str(path)


def _as_written(record: dict) -> str:
    return json.dumps(dict(record, iteration=3), indent=2, sort_keys=True)


def _identity(path: str) -> dict:
    return {"vocab_size": 400, "fingerprint": tokenizer_fingerprint(path), "path": path}


def test_reward_model_record(tok_path):
    loss = RewardLossConfig("dpo")
    data = PreferenceDataConfig(path="/data/pairs.jsonl", seq_length=64)
    old = {  # train-rm's record before the builder (reward_trainer._checkpoint_config)
        "tokenizer_identity": _identity(tok_path), "kind": "reward_model", "role": "policy",
        "model": MODEL.to_dict(), "tokenizer": tok_path,
        "lora": {"rank": 4, "alpha": None, "targets": ["qkv", "proj", "fc1", "fc2"]},
        "reward_loss": {"kind": "dpo", "qrm_beta": 0.2, "qrm_gamma": 2.0, "dpo_beta": 0.1},
        "chat_template": False, "seq_length": 64,
        "data": {"instruction_field": "instruction", "chosen_field": "chosen", "rejected_field": "rejected",
                 "chat_template": False, "seq_length": 64, "skip_long_prompts": False, "split": "train",
                 "max_pairs": None, "strict": False},
        "pretrained_checkpoint": None,
    }
    new = checkpoint_record("reward_model", loss.role, MODEL, tokenizer=_Tok(), tokenizer_path=tok_path,
                            lora=LoRAConfig(rank=4), chat_template=False, seq_length=64, reward_loss=loss,
                            data={k: v for k, v in vars(data).items() if k != "path"}, pretrained_checkpoint=None)
    assert _as_written(new) == _as_written(old)


def test_sft_record_carries_tokenizer_changes(tok_path):
    change = {"from": {"fingerprint": "b"}, "to": {"fingerprint": "c"}}
    inherited = {"tokenizer_changes": [{"from": {"fingerprint": "a"}, "to": {"fingerprint": "b"}}]}
    old = {"kind": "policy", "role": "policy", "model": MODEL.to_dict(), "tokenizer": tok_path,
           "lora": {"rank": 0, "alpha": None, "targets": ["qkv", "proj", "fc1", "fc2"]}, "chat_template": True,
           "seq_length": 128, "tokenizer_identity": _identity(tok_path),
           "tokenizer_changes": inherited["tokenizer_changes"] + [change]}
    new = checkpoint_record("policy", "policy", MODEL, tokenizer=_Tok(), tokenizer_path=tok_path,
                            inherited=inherited, tokenizer_change=change, lora=LoRAConfig(), chat_template=True,
                            seq_length=128)
    assert _as_written(new) == _as_written(old)


def test_rl_actor_and_critic_records(tok_path):
    rl = {"algo": "ppo", "advantage": "gae", "reward_model": "/rm", "reward_kind": "qrm", "initial_actor": "/sft"}
    old_actor = {"kind": "policy", "role": "policy", "model": MODEL.to_dict(), "tokenizer": tok_path,
                 "chat_template": False, "seq_length": 96,
                 "lora": {"rank": 0, "alpha": None, "targets": ["qkv", "proj", "fc1", "fc2"]}, "rl": rl,
                 "tokenizer_identity": _identity(tok_path)}
    new_actor = checkpoint_record("policy", "policy", MODEL, tokenizer=_Tok(), tokenizer_path=tok_path,
                                  inherited={}, lora=LoRAConfig(), chat_template=False, seq_length=96, rl=rl)
    assert _as_written(new_actor) == _as_written(old_actor)
    old_critic = {"kind": "critic", "role": "critic", "model": MODEL.to_dict()}
    assert _as_written(checkpoint_record("critic", "critic", MODEL)) == _as_written(old_critic)


def test_a_tokenizer_path_that_does_not_exist_is_kept_as_given():
    record = checkpoint_record("policy", "policy", MODEL, tokenizer_path="org/name-on-the-hub")
    assert record["tokenizer"] == "org/name-on-the-hub" and "tokenizer_identity" not in record
