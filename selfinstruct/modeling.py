"""Loading models and tokenizers from the hub or a local path, with a clear error when that fails."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from selfinstruct.errors import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(device: str) -> str:
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


def _cannot_load(role: str, name: str, e: Exception) -> UserError:
    return UserError(
        f"cannot load {role} model '{name}': {str(e).splitlines()[0]}\n"
        f"If the Hugging Face hub is unreachable from here, download the model elsewhere and pass "
        f"--{role} PATH to its local directory.")


def check_model(name: str, trust_remote_code: bool, role: str) -> None:
    """Fail now, cheaply (its config only), if a model that a later stage loads cannot be found."""
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise _cannot_load(role, name, e) from None


def load_model_and_tokenizer(name: str, device: str, dtype: str, trust_remote_code: bool, role: str,
                             **load_kwargs: object) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load from the hub or a local path; a missing model (or no hub access) is a clear UserError.
    `load_kwargs` go to from_pretrained (attn_implementation, quantization_config, device_map)."""
    hf_logging.disable_progress_bar()  # our own progress display is the one to watch
    try:
        tok = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
        device = pick_device(device)
        if dtype == "auto":
            torch_dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        else:
            torch_dtype = DTYPES[dtype]
        model = AutoModelForCausalLM.from_pretrained(name, dtype=torch_dtype, trust_remote_code=trust_remote_code,
                                                     **load_kwargs)
    except (OSError, ValueError) as e:
        raise _cannot_load(role, name, e) from None
    if "device_map" not in load_kwargs:  # a quantized model is placed by its loader
        model = model.to(device)
    return model.eval(), tok
