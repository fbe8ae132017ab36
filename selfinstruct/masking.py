"""Loss on assistant tokens only: a conversation tokenised with its labels masked.

Masking is ours, not the template's: for every assistant turn i we render the conversation up to
turn i with the generation prompt (P) and up to the end of turn i (U); the characters from len(P)
to the end of U (as far as U agrees with the whole conversation) -- the reply and the template's
end-of-turn marker -- are trained, everything else is not. Tokens are mapped to characters
through the tokenizer's offsets, so this works for any template (Llama-3 and Qwen2.5 have no
{% generation %} markers) and any number of turns. The pre-tokenized `input_ids` / `labels` go to
TRL's SFTTrainer, which uses them as they are.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import datasets
import jinja2
from rich.console import Console

from selfinstruct.dataset import Conversation
from selfinstruct.errors import UserError
from selfinstruct.packing import IGNORE
from selfinstruct.prompts import PROMPTS_DIR

console = Console(stderr=True, soft_wrap=True)
DEFAULT_CHAT_TEMPLATE = PROMPTS_DIR / "chat" / "default.jinja"


def _render(tok: Any, messages: Conversation, generation_prompt: bool) -> str:
    try:
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except (jinja2.TemplateError, ValueError) as e:  # templates raise on roles they do not support
        raise UserError(f"the chat template cannot render this conversation: {e}") from None


def tokenize_conversation(tok: Any, messages: Conversation, max_length: int | None = None) -> dict[str, list[int]]:
    """input_ids and labels (IGNORE outside assistant turns) for one conversation."""
    full = _render(tok, messages, False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = _render(tok, messages[:i], True)
        upto = _render(tok, messages[: i + 1], False)
        # The span ends where this turn's rendering stops agreeing with the whole conversation: some
        # templates (Phi-3) append an EOS only after the last turn, and that EOS must not be
        # trained in the middle of a conversation.
        end = len(os.path.commonprefix([upto, full]))
        if not full.startswith(prompt) or end <= len(prompt):
            raise UserError("the chat template renders assistant turn "
                            f"{i} differently in context, so its reply cannot be located for masking; "
                            "set train.chat_template to a template without that behaviour")
        spans.append((len(prompt), end))
    enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    labels = [IGNORE] * len(ids)
    for t, (start, end) in enumerate(enc["offset_mapping"]):
        # Trained only when the token lies wholly inside a reply span: a token straddling either
        # boundary belongs partly to text the model is given, not text it must produce (and a
        # span cut by the common prefix may end inside the next turn's special token).
        if end > start and any(a <= start and end <= b for a, b in spans):
            labels[t] = ids[t]
    if max_length is not None:
        ids, labels = ids[:max_length], labels[:max_length]
    return {"input_ids": ids, "labels": labels}


def prepare_tokenizer(tok: Any, template_path: str | None) -> None:
    """Give the tokenizer the chat template we train with (the user's, its own, or our default)."""
    if template_path is not None:
        try:
            tok.chat_template = Path(template_path).read_text(encoding="utf-8")
        except OSError as e:
            raise UserError(f"cannot read chat template: {e.strerror}", template_path) from None
    elif not getattr(tok, "chat_template", None):
        console.print(f"[yellow]The student has no chat template; using {DEFAULT_CHAT_TEMPLATE.name} "
                      "(### Instruction / ### Response, EOS after each reply).[/]")
        tok.chat_template = DEFAULT_CHAT_TEMPLATE.read_text(encoding="utf-8")
    if tok.eos_token is None:
        raise UserError("the student's tokenizer has no EOS token, so a tuned model could not learn to stop")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token


def build_dataset(tok: Any, convs: list[Conversation], max_length: int) -> tuple[datasets.Dataset, int]:
    """Tokenized rows, and how many conversations were dropped for having no trained token left."""
    rows = [tokenize_conversation(tok, c, max_length) for c in convs]
    kept = [r for r in rows if any(label != IGNORE for label in r["labels"])]
    return datasets.Dataset.from_list(kept) if kept else None, len(rows) - len(kept)
