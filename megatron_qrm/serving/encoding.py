"""Request texts -> the reward model's token ids, laid out exactly as in reward-model training and
``qrm eval-rm`` (:mod:`megatron_qrm.data.preference`), and the response tokens' text and character spans.

Layout of one scored sequence: ``[BOS] prompt ++ response ++ EOS``:

* the prompt is the instruction rendered the way the checkpoint was trained (its tokenizer's chat template
  when it was trained with ``--chat-template``), or the rendered chat ``messages`` before the last
  (assistant) turn, or -- for OpenRLHF's ``/get_reward`` -- the prompt text as the policy rendered it;
  BOS is prepended when the tokenizer uses one and the rendered text does not already contain it;
* the response is encoded on its own and followed by EOS;
* ``len(prompt) + len(response) <= seq_length``: a longer item is refused (:class:`ItemTooLong`), or with
  ``truncate`` its response is cut from its end (the EOS first), as in training.

Character spans come from :func:`megatron_qrm.rl.experience.token_text_ends` (the function the RL
trainers' ``--allow-retokenize`` maps tokens with): each token's text is what it adds to the text decoded
before it, so a SentencePiece word-initial piece keeps its leading space. Spans index ``response_text``,
the response as the reward model's tokens spell it; it equals the request's text whenever the tokenizer
round-trips it (always for byte-level BPE; SentencePiece may normalise whitespace).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from megatron_qrm.data.tokenizer import Tokenizer
from megatron_qrm.rl.experience import token_text_ends


class ItemTooLong(ValueError):
    """An item does not fit the model's sequence length (and the request did not ask for truncation)."""

    def __init__(self, index: int, field: str, tokens: int, limit: int, prompt_only: bool):
        self.index, self.field, self.tokens, self.limit, self.prompt_only = index, field, tokens, limit, prompt_only
        what = "the prompt alone" if prompt_only else "prompt + response + EOS"
        hint = "" if prompt_only else "; send \"truncate\": true to cut the response instead"
        super().__init__(f"{what} is {tokens} tokens, over the model's sequence length {limit}{hint}")


@dataclass
class EncodedItem:
    """One sequence to score.

    Attributes:
        prompt_ids: prompt ids, BOS included when the tokenizer uses one.
        response_ids: response ids, EOS appended unless truncation cut it.
        truncated: whether the response was cut to fit.
    """

    prompt_ids: list[int]
    response_ids: list[int]
    truncated: bool

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)


@dataclass
class TokenSpans:
    """Per response token (EOS included): its display text and ``[start, end)`` character span in
    ``response_text``; the EOS (and any id that adds no character) has an empty span."""

    response_text: str
    texts: list[str]
    starts: list[int]
    ends: list[int]


class RequestEncoder:
    """Encodes request items for one checkpoint's tokenizer and sequence length."""

    def __init__(self, tokenizer: Tokenizer, seq_length: int, chat_template: bool):
        self.tokenizer = tokenizer
        self.seq_length = seq_length
        self.chat_template = chat_template

    def render_instruction(self, instruction: str) -> tuple[str, bool]:
        """Prompt text of an instruction as the checkpoint was trained, and whether it contains the BOS."""
        return self.tokenizer.render_prompt(instruction, self.chat_template)

    def render_messages(self, messages: Sequence[dict]) -> tuple[str, bool]:
        """Prompt text of the turns before the response (the tokenizer's chat template, generation prompt
        appended), and whether it contains the BOS text.

        Raises:
            ValueError: the checkpoint's tokenizer has no chat template.
        """
        hf = self._hf()
        if hf is None or not self.tokenizer.has_chat_template():
            raise ValueError(f"the checkpoint's tokenizer ({self.tokenizer.name_or_path}) has no chat template; "
                             "send {prompt, response} items instead of messages")
        text = hf.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
        return self.rendered_text(text)

    def rendered_text(self, text: str) -> tuple[str, bool]:
        """A prompt that is already rendered (chat messages, OpenRLHF's ``prompts``): used as is; BOS is
        prepended later unless the text already carries the BOS token's text."""
        hf = self._hf()
        bos = hf.bos_token if hf is not None and self.tokenizer.bos_id is not None else None
        return text, bool(bos) and bos in text

    def _hf(self):
        # The wrapped transformers tokenizer (None for SentencePiece): the Tokenizer interface renders a
        # single user turn only, multi-turn messages need the template itself.
        return getattr(self.tokenizer, "_tok", None)

    def encode(self, prompts: Sequence[tuple[str, bool]], responses: Sequence[str], truncate: bool,
               fields: Sequence[str] = ()) -> list[EncodedItem]:
        """Encode rendered ``(prompt text, contains BOS)`` and response texts in one tokenizer call.

        Raises:
            ItemTooLong: the first item that does not fit (``fields[i]`` names it in the error).
        """
        tok, limit = self.tokenizer, self.seq_length
        n = len(responses)
        ids = tok.encode_batch([p for p, _ in prompts] + list(responses))
        items = []
        for i in range(n):
            prompt_ids = ids[i]
            if tok.bos_id is not None and not prompts[i][1]:
                prompt_ids = [tok.bos_id] + prompt_ids
            response_ids = ids[n + i] + [tok.eos_id]
            field = fields[i] if i < len(fields) else f"items[{i}]"
            if len(prompt_ids) >= limit:
                raise ItemTooLong(i, field, len(prompt_ids), limit, prompt_only=True)
            room = limit - len(prompt_ids)
            truncated = len(response_ids) > room
            if truncated and not truncate:
                raise ItemTooLong(i, field, len(prompt_ids) + len(response_ids), limit, prompt_only=False)
            items.append(EncodedItem(prompt_ids, response_ids[:room], truncated))
        return items

    def spans(self, items: Sequence[EncodedItem]) -> list[TokenSpans]:
        """Text and character span of every response token of each item (EOS: its token text, empty span)."""
        tok = self.tokenizer
        bodies = [it.response_ids[:-1] if _ends_with_eos(it, tok.eos_id) else it.response_ids for it in items]
        texts, char_ends, _ = token_text_ends(tok, [it.prompt_ids for it in items], bodies)
        out = []
        for it, body, text, ends in zip(items, bodies, texts, char_ends):
            starts = [0] + ends[:-1]
            shown = [text[s:e] for s, e in zip(starts, ends)]
            if len(body) < len(it.response_ids):  # the EOS
                shown.append(tok.token_texts([tok.eos_id])[0])
                starts.append(len(text))
                ends = ends + [len(text)]
            out.append(TokenSpans(text, shown, starts, list(ends)))
        return out


def _ends_with_eos(item: EncodedItem, eos_id: int) -> bool:
    return not item.truncated and bool(item.response_ids) and item.response_ids[-1] == eos_id


def split_query(query: str, prompt: str, strip_suffixes: Sequence[Optional[str]],
                strip_prefixes: Sequence[Optional[str]] = ()) -> Optional[str]:
    """OpenRLHF's ``query`` is prompt + response as the policy decoded it, special tokens kept (left
    padding, EOS, right padding): the response part, or None when the query does not start with the
    prompt. Leading ``strip_prefixes`` texts (pad) and trailing ``strip_suffixes`` texts (EOS, pad) are
    removed first (the server appends its own EOS)."""
    query = _strip(query, [s for s in strip_prefixes if s], leading=True)
    if not query.startswith(prompt):
        return None
    return _strip(query[len(prompt):], [s for s in strip_suffixes if s], leading=False)


def _strip(text: str, pieces: list[str], leading: bool) -> str:
    changed = True
    while changed:
        changed = False
        for s in pieces:
            if leading and text.startswith(s):
                text, changed = text[len(s):], True
            elif not leading and text.endswith(s):
                text, changed = text[: -len(s)], True
    return text
