"""`selfinstruct train --preview N`: the first N training examples tokenised, trained tokens marked."""

from __future__ import annotations

import json

from rich.console import Console

from selfinstruct.config import Config
from selfinstruct.errors import UserError


def preview(cfg: Config, n: int, as_json: bool) -> int:
    """Tokenise the first n training examples and show which tokens are trained."""
    from transformers import AutoTokenizer

    from selfinstruct.dataset import load_training_data
    from selfinstruct.masking import IGNORE, prepare_tokenizer, tokenize_conversation
    from selfinstruct.modeling import resolve_model

    if cfg.train.data is None:
        raise UserError("train --preview needs --data")
    convs, _ = load_training_data(cfg.train.data)
    try:
        tok = AutoTokenizer.from_pretrained(resolve_model(cfg.train.student))
    except OSError as e:
        raise UserError(f"cannot load the student's tokenizer '{cfg.train.student}': {e}") from None
    prepare_tokenizer(tok, cfg.train.chat_template)
    shown = []
    for conv in convs[:n]:
        row = tokenize_conversation(tok, conv, cfg.train.max_length)
        shown.append([{"token": tok.decode([i]), "id": i, "trained": lab != IGNORE}
                      for i, lab in zip(row["input_ids"], row["labels"], strict=True)])
    if as_json:
        print(json.dumps(shown, ensure_ascii=False))
        return 0
    out = Console()
    for k, toks in enumerate(shown):
        out.rule(f"example {k} · {sum(t['trained'] for t in toks)} of {len(toks)} tokens trained "
                 "([green]green[/] = trained)")
        for t in toks:
            out.print(t["token"], style="bold green" if t["trained"] else "dim", end="", markup=False,
                      highlight=False)
        out.print()
    return 0
