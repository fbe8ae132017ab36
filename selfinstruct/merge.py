"""Merge a LoRA adapter into its base model: a full model `transformers serve` and vLLM load as is.

    selfinstruct merge outputs/run/train/adapter --out outputs/run/train/merged
"""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console

from selfinstruct.errors import UserError

console = Console(stderr=True, soft_wrap=True)


def merge_adapter(adapter: str | Path, out: str | Path, base: str | None = None) -> Path:
    """Writes the merged weights and the adapter's tokenizer (with the chat template it was trained with)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from selfinstruct.modeling import resolve_model

    adapter, out = Path(adapter), Path(out)
    cfg_path = adapter / "adapter_config.json"
    if not cfg_path.exists():
        raise UserError("not a LoRA adapter directory (no adapter_config.json)", adapter)
    base = base or json.loads(cfg_path.read_text())["base_model_name_or_path"]
    try:
        model = AutoModelForCausalLM.from_pretrained(resolve_model(base), dtype=torch.float32)
    except OSError as e:
        raise UserError(f"cannot load the base model '{base}': {str(e).splitlines()[0]}; pass --base PATH") from None
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    merged.save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(adapter)).save_pretrained(str(out))
    console.print(f"merged model: {out}")
    return out
