"""Loading models and tokenizers from the hub, a local path or a .gguf file, with a clear error when that fails.

    model, tok = load_model_and_tokenizer("Qwen/Qwen2.5-0.5B", "auto", "auto", False, "student")
    path = resolve_model("SmolLM2-135M-Instruct.Q4_1.gguf")   # a directory every backend loads
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
from pathlib import Path

import torch
from rich.console import Console
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from selfinstruct.errors import UserError

console = Console(stderr=True, soft_wrap=True)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(device: str) -> str:
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


# Where the user names each role's model (the advice of a load failure).
_WHERE = {"teacher": "--teacher PATH", "student": "--student PATH", "judge": "--judge PATH",
          "IFD": "quality.ifd_model: PATH (or --student PATH; --scorers '' turns scoring off)"}


def _cannot_load(role: str, name: str, e: Exception) -> UserError:
    return UserError(
        f"cannot load {role} model '{name}': {str(e).splitlines()[0]}\n"
        f"If the Hugging Face hub is unreachable from here, download the model elsewhere and pass "
        f"{_WHERE.get(role, '--' + role + ' PATH')} to its local directory.")


def _hub_or_fail(name: str, role: str) -> None:
    """A hub id that is neither a local path nor in the hub cache, with the hub out of reach: fail in seconds
    (transformers would retry for half a minute and more per file)."""
    from huggingface_hub import try_to_load_from_cache

    from selfinstruct.builtin import ADVICE, hub_reachable

    if Path(name).expanduser().exists() or name.count("/") > 1 or name.startswith((".", "/", "~")):
        return
    try:
        cached = isinstance(try_to_load_from_cache(name, "config.json"), str)
    except ValueError:  # not a valid repo id: transformers says why
        return
    if not cached and not hub_reachable():
        raise UserError(f"cannot load {role} model '{name}': the Hugging Face hub is not reachable from here "
                        f"(and the model is not in the local hub cache). Download it elsewhere and pass "
                        f"{_WHERE.get(role, '--' + role + ' PATH')} to its local directory, or, to try the tool, "
                        f"{ADVICE.replace('--teacher', '--' + role) if role in ('student', 'judge') else ADVICE}.")


def check_model(name: str, trust_remote_code: bool, role: str) -> None:
    """Fail now, cheaply (its config only), if a model that a later stage loads cannot be found."""
    from transformers import AutoConfig

    name = resolve_model(name)  # a .gguf file is converted now, once, rather than after round 1
    _hub_or_fail(name, role)
    try:
        AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise _cannot_load(role, name, e) from None


def load_model_and_tokenizer(name: str, device: str, dtype: str, trust_remote_code: bool, role: str,
                             **load_kwargs: object) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load from the hub or a local path; a missing model (or no hub access) is a clear UserError.
    `load_kwargs` go to from_pretrained (attn_implementation, quantization_config, device_map)."""
    hf_logging.disable_progress_bar()  # our own progress display is the one to watch
    name = resolve_model(name)
    _hub_or_fail(name, role)
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


# ---------------------------------------------------------------- GGUF files (llama.cpp, Ollama)


def gguf_cache_dir() -> Path:
    """Where converted GGUF models live: $XDG_CACHE_HOME (or ~/.cache)/selfinstruct/models."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "selfinstruct" / "models"


def _gguf_fingerprint(path: Path) -> str:
    """A cheap identity of a GGUF file: its size and hashes of its first and last 16 MiB (a 40 GB file
    is not read whole on every run; a re-quantised file differs in its header and tail)."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with path.open("rb") as fh:
        h.update(fh.read(16 << 20))
        fh.seek(max(0, size - (16 << 20)))
        h.update(fh.read())
    return h.hexdigest()[:12]


def resolve_model(name: str, cache_dir: Path | None = None) -> str:
    """`name` itself, unless it is a .gguf file or the built-in `smollm2` (builtin.py, fetched once as a GGUF file):
    then a model directory converted from it once
    (dequantised to float32 safetensors, with its tokenizer and chat template) that transformers, vLLM
    and `transformers serve` all load. Later calls find the conversion in the cache."""
    from selfinstruct import builtin

    if builtin.is_builtin(name):
        name = str(builtin.gguf_file())
    path = Path(name).expanduser()
    if path.suffix.lower() != ".gguf":
        return name
    if not path.is_file():
        raise UserError("no such GGUF file", path)
    out = (cache_dir or gguf_cache_dir()) / f"{path.stem}-{_gguf_fingerprint(path)}"
    if (out / "config.json").exists():
        return str(out)
    if importlib.util.find_spec("gguf") is None:
        raise UserError("reading a .gguf model needs the gguf package: pip install gguf", path)
    console.print(f"converting {path.name} to a model directory (once): {out}")
    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise UserError(f"cannot read the GGUF model: {str(e).splitlines()[0]}", path) from None
    # A model loaded from GGUF refuses save_pretrained; a fresh model of the same config takes its weights.
    config = loaded.config
    if hasattr(config, "quantization_config"):  # the weights are dequantised: vLLM must not look for GGUF
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    os.replace(tmp, out) if not out.exists() else shutil.rmtree(tmp)  # a parallel conversion may have won
    return str(out)
