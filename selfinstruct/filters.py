"""Filters of generated data: pure functions returning (keep, reason). Reasons are stable names
that stats.json counts and rejected.jsonl records."""

from __future__ import annotations

import re
import string
from functools import cache

from selfinstruct.config import FilterConfig
from selfinstruct.seeds import Instance


@cache
def _blacklist_re(words: tuple[str, ...]) -> re.Pattern[str] | None:
    if not words:
        return None
    return re.compile(r"\b(" + "|".join(re.escape(w) for w in words) + r")\b", re.IGNORECASE)


def check_instruction(text: str, cfg: FilterConfig) -> tuple[bool, str]:
    """The paper's instruction filters, in its order."""
    n = len(text.split())
    if n < cfg.min_words:
        return False, "too_short"
    if n > cfg.max_words:
        return False, "too_long"
    pattern = _blacklist_re(tuple(cfg.blacklist))
    if pattern is not None and pattern.search(text):
        return False, "blacklisted_word"
    if any(text.startswith(p) for p in cfg.banned_prefixes):
        return False, "banned_prefix"
    if text[0] in string.punctuation:
        return False, "starts_with_punctuation"
    if not text[0].isascii():
        return False, "starts_non_ascii"
    return True, ""


def check_instance(inst: Instance) -> tuple[bool, str]:
    if not inst.output.strip():
        return False, "empty_output"
    if inst.input.strip() == inst.output.strip():
        return False, "input_equals_output"
    return True, ""


def clean_instances(instances: list[Instance], limit: int) -> tuple[list[Instance], list[tuple[Instance, str]]]:
    """Keep valid, distinct instances (at most `limit`). Two instances with the same non-empty input but
    different outputs mean the task is ill-posed: then nothing is kept (reason conflicting_instances)."""
    kept: list[Instance] = []
    dropped: list[tuple[Instance, str]] = []
    outputs_by_input: dict[str, str] = {}
    for inst in instances:
        ok, reason = check_instance(inst)
        key = inst.input.strip()
        if ok and key and key in outputs_by_input and outputs_by_input[key] != inst.output.strip():
            return [], [(i, "conflicting_instances") for i in instances]
        if ok and (key, inst.output.strip()) in {(k.input.strip(), k.output.strip()) for k in kept}:
            ok, reason = False, "duplicate_instance"
        if ok and len(kept) >= limit:
            ok, reason = False, "over_instance_limit"
        if ok:
            kept.append(inst)
            if key:
                outputs_by_input[key] = inst.output.strip()
        else:
            dropped.append((inst, reason))
    return kept, dropped
