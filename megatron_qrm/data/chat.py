"""Whether prompts are rendered with the tokenizer's chat template: one rule for every command.

An instruct model (SmolLM2-Instruct, Llama-3-Instruct, Qwen2.5-Instruct) answers a bare instruction badly or
not at all (an immediate end of turn), so the template is ON by default whenever the tokenizer has one.
``--chat-template`` forces it (an error when the tokenizer has none), ``--no-chat-template`` turns it off,
and a checkpoint trained or evaluated later keeps the choice it recorded (``chat_template`` in its
``qrm_config.json``; an import records whether its tokenizer has a template). The choice is logged once
per process.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping, Optional

from megatron_qrm.errors import UserError

log = logging.getLogger("megatron_qrm")
_announced: set[str] = set()


def resolve_chat_template(requested: Optional[bool], tokenizer: Any,
                          saved: Optional[Mapping[str, Any]] = None) -> bool:
    """The effective chat-template choice.

    Args:
        requested: the ``--chat-template`` / ``--no-chat-template`` flag, None when neither was given.
        tokenizer: a :class:`megatron_qrm.data.tokenizer.Tokenizer` (``has_chat_template()``).
        saved: the ``qrm_config.json`` of the checkpoint the command starts from, if any.

    Raises:
        ValueError: ``--chat-template`` was given and the tokenizer has no template.
    """
    has = tokenizer.has_chat_template()
    if requested is True and not has:
        raise UserError(f"--chat-template was given but the tokenizer at {tokenizer.name_or_path!r} has no chat "
                        f"template; drop the flag or use a tokenizer directory that defines one")
    if requested is not None:
        use, why = bool(requested), "--chat-template" if requested else "--no-chat-template"
    elif saved is not None and saved.get("chat_template") is not None and (has or not saved["chat_template"]):
        use = bool(saved["chat_template"])
        why = f"as the checkpoint records; {'--no-chat-template' if use else '--chat-template'} to change it"
    else:
        use = has
        why = ("the tokenizer has one; --no-chat-template turns it off" if has else "the tokenizer has none")
    _announce(f"chat template: {'on' if use else 'off'} ({why})")
    return use


def _announce(message: str) -> None:
    if message not in _announced:
        _announced.add(message)
        log.info(message)
