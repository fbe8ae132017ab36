"""Loud stalls: a stage of a step whose every candidate failed for one reason is reported, not just counted.

    reason = uniform_failure(["classify_unclear"] * 8)     # -> "classify_unclear"
    raise_alert(alerts, "classify", reason, 8, replies)    # the progress line and the summary show it

A teacher that cannot follow a format fails the same way on every request (every reply empty, every
Yes/No unclear); the rejection counts say so only at the end, and only to someone who reads them. An
alert names the stage, the reason, how many candidates and steps it hit, a sample of the raw replies
and the likely fix.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

FIXES = {
    "empty_reply": "the teacher's replies are empty: a stop string may match at their very start, or max_tokens "
                   "is too small (generate.*_sampling.stop / max_tokens); a chat teacher needs a chat template",
    "classify_unclear": "the teacher answers the Yes/No question in prose: use a backend that enforces a choice "
                        "(vllm, transformers), or a stronger teacher",
    "unformatted_instances": "the replies hold no 'Example / Input / Output' block: check the teacher's replies "
                             "(rejected.jsonl 'raw'); a chat teacher needs a chat template for its prefilled reply",
    "no_valid_instances": "every parsed instance was dropped: see the instance rejections in rejected.jsonl",
    "preamble": "the teacher answers with prose instead of continuing the numbered list: try --prompt-format chat "
                "or a stronger teacher",
    "malformed_task": "the replies do not follow the 'N. Instruction: / N. Input: / N. Output:' format",
    "invalid_json": "generate.list_format json: the replies are not JSON of the list's schema; a backend that "
                    "enforces the schema (vllm, or vllm serve) guarantees it",
    "truncated": "replies hit max_tokens before the item ended: raise the stage's max_tokens",
    "truncated_evolution": "rewrites hit max_tokens: raise generate.evol.evolve_sampling.max_tokens",
    "truncated_response": "responses hit max_tokens: raise generate.evol.response_sampling.max_tokens",
    "not_a_task": "the teacher writes names, labels or statements instead of tasks: use a stronger teacher "
                  "(filters.require_task_form: false for instructions not in English)",
    "copies_demo": "the teacher copies the demonstrations its prompt shows: use a stronger teacher",
    "echoes_instruction": "the teacher repeats the task instead of doing it: use a stronger teacher",
    "one_class_label": "the teacher calls tasks classification and answers with one label: use a stronger teacher "
                       "(or a backend that enforces the Yes/No choice)",
    "shared_instance": "the teacher gives different tasks the same example: use a stronger teacher",
    "low_quality": "the quality scores drop every record: check quality.* thresholds, the IFD model "
                   "(quality.ifd_model) and the judge, or use a stronger teacher",
    "contaminated": "every record overlaps an evaluation set (quality.decontaminate, the held-out set)",
    "copies_prompt_words": "the teacher copies the evolution prompt's labels into its rewrites: a stronger teacher "
                           "follows the instruction better",
}
DEFAULT_FIX = "look at the rejections: selfinstruct show RUN --rejected --reason REASON"


def uniform_failure(outcomes: list[str]) -> str | None:
    """The one reason every candidate failed for; None when any succeeded ("") or reasons differ."""
    reasons = set(outcomes)
    return reasons.pop() if len(reasons) == 1 and "" not in reasons else None


def dominant(reasons: list[str]) -> str:
    """The most common reason of a stage that produced nothing (ties: the first seen)."""
    return Counter(reasons).most_common(1)[0][0] if reasons else "empty_reply"


def raise_alert(alerts: dict[str, dict[str, Any]], stage: str, reason: str, n: int, replies: list[str]) -> str:
    """Record that all `n` candidates of `stage` failed for `reason` in this step; returns the line to show."""
    a = alerts.setdefault(f"{stage}:{reason}", {"stage": stage, "reason": reason, "steps": 0, "candidates": 0,
                                                "sample": "", "fix": FIXES.get(reason, DEFAULT_FIX)})
    a["steps"] += 1
    a["candidates"] += n
    a["sample"] = next((r for r in replies if r.strip()), replies[0] if replies else "")[:300]
    return f"{stage}: all {n} failed ({reason})"
