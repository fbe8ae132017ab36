"""Filters of generated data: pure functions returning (keep, reason). Reasons are stable names
that stats.json counts and rejected.jsonl records."""

from __future__ import annotations

import re
import string
from functools import cache

from selfinstruct.config import FilterConfig
from selfinstruct.seeds import Instance
from selfinstruct.taskform import looks_like_task


@cache
def _blacklist_re(words: tuple[str, ...]) -> re.Pattern[str] | None:
    if not words:
        return None
    return re.compile(r"\b(" + "|".join(re.escape(w) for w in words) + r")\b", re.IGNORECASE)


def check_instruction(text: str, cfg: FilterConfig) -> tuple[bool, str]:
    """The paper's instruction filters, in its order, then ours: it must read as a task (taskform.py)."""
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
    if cfg.require_task_form and not looks_like_task(text):
        return False, "not_a_task"
    return True, ""


def check_instance(inst: Instance) -> tuple[bool, str]:
    """Self-Instruct's instance filters (filter_invalid_instances): an empty output, input equal to output,
    and an input or output ending with ':' (an unfinished generation)."""
    if not inst.output.strip():
        return False, "empty_output"
    if inst.input.strip() == inst.output.strip():
        return False, "input_equals_output"
    if inst.input.strip().endswith(":") or inst.output.strip().endswith(":"):
        return False, "ends_with_colon"
    return True, ""


def is_rouge_similar(score: float, cfg: FilterConfig) -> bool:
    """Whether an instruction this close to the pool is dropped: at or above the threshold (the paper's
    "< 0.7" keeps), or, with `rouge_keep_equal`, only above it (the original code's `<= 0.7` keeps)."""
    return score > cfg.rouge_threshold if cfg.rouge_keep_equal else score >= cfg.rouge_threshold


def check_evolved_instruction(text: str, require_task_form: bool = True) -> tuple[bool, str]:
    """What an evolved instruction must pass before the elimination rules: it is not empty, and it reads as a task
    (ours, `filters.require_task_form`: a rewrite that turned into a statement is no instruction). WizardLM
    applies none of Self-Instruct's instruction filters (length cap, keyword blacklist, "Write a program",
    leading punctuation): a rewrite that adds a table, code or a file's content must evolve."""
    if not text.strip():
        return False, "empty_evolution"
    if require_task_form and not looks_like_task(text):
        return False, "not_a_task"
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


# ---------------------------------------------------------------- Evol-Instruct elimination (rules 2-4)

# English stop words (the usual function words: articles, pronouns, auxiliaries, prepositions,
# conjunctions, and a few fillers). Rule 3 drops a response made only of these and punctuation.
# Evol-Instruct's elimination rules (Xu et al., 2023, section 3.2), by the reason names rejected.jsonl and
# stats.json use: 1 no information gain (judged Equal, or unchanged), 2 a short apology, 3 only punctuation
# and stop words, 4 the rewrite copies words of the evolving prompt.
EVOL_RULES = {"no_information_gain": 1, "sorry_short_response": 2, "stopwords_only_response": 3,
              "copies_prompt_words": 4}

_STOP_WORDS = """
a about above after again against all am an and any are aren't as at be because been before being below
between both but by can can't cannot could couldn't did didn't do does doesn't doing don't down during each
few for from further had hadn't has hasn't have haven't having he he'd he'll he's her here here's hers herself
him himself his how how's i i'd i'll i'm i've if in into is isn't it it's its itself just let's me more most
mustn't my myself no nor not now of off on once only or other ought our ours ourselves out over own same shan't
she she'd she'll she's should shouldn't so some such than that that's the their theirs them themselves then
there there's these they they'd they'll they're they've this those through to too under until up very was
wasn't we we'd we'll we're we've were weren't what what's when when's where where's which while who who's whom
why why's will with won't would wouldn't you you'd you'll you're you've your yours yourself yourselves
ok okay yes yeah oh um uh hmm well
"""
STOP_WORDS = frozenset(_STOP_WORDS.split())
_WORD = re.compile(r"[^\W_]+(?:['’][^\W_]+)*")


def is_sorry_short(response: str, max_words: int) -> bool:
    """Rule 2: the response contains "sorry" and has fewer than `max_words` words (WizardLM: 80)."""
    return "sorry" in response.lower() and len(response.split()) < max_words


def is_stopwords_only(response: str) -> bool:
    """Rule 3: the response has no word outside STOP_WORDS (empty or punctuation-only counts too).
    Words are compared whole and lower-cased, so "The, and... of!" is caught and "The answer" is not."""
    return all(w.replace("’", "'") in STOP_WORDS for w in _WORD.findall(response.lower()))


def copies_prompt_words(evolved: str, phrases: list[str]) -> bool:
    """Rule 4: the evolved instruction carries words of the evolution prompt ("#Rewritten Prompt#"...)."""
    low = evolved.lower()
    return any(p.lower() in low for p in phrases)


def check_evolved_response(response: str, max_words: int) -> tuple[bool, str]:
    """Rules 2 and 3 on the teacher's response to an evolved instruction."""
    if is_sorry_short(response, max_words):
        return False, "sorry_short_response"
    if is_stopwords_only(response):
        return False, "stopwords_only_response"
    return True, ""
