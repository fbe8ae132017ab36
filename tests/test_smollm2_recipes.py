"""Recipes on a real chat model, SmolLM2-135M-Instruct, on the transformers backend: each reaches a small target
without stalling, every record passes the filters, and the chat-native stages (prefilled replies, choices by
likelihood) are what made it work. The engine runs all three recipes (tests/test_vllm.py); the recipes' logic does
not depend on the backend, so here runs the one that uses all of what is transformers' own: Self-Instruct's
prefilled replies and its Yes / No choice by likelihood (where copied instances are the known failure: none is
accepted). Evol's Equal / Not Equal is the same likelihood choice of another pair of words, and Alpaca's prefilled
reply the same mechanism as Self-Instruct's (both ran here until the suite had to fit in 30 minutes: 3 minutes
for Evol on a busy machine)."""

import pytest
from conftest import RECIPE_TARGET, run_recipe_on_smollm2

pytestmark = pytest.mark.slow


def test_self_instruct_reaches_its_target_on_smollm2(smollm2_dir, tmp_path):
    records, stats = run_recipe_on_smollm2(smollm2_dir, "self-instruct", "transformers", tmp_path / "run")
    assert stats["teacher"] == str(smollm2_dir) and not [a for a in stats["alerts"] if a["reason"] == "empty_reply"]
    # the Yes/No question was answered by the likelihood of each choice
    assert {r["scores"]["classification_mode"] for r in records} == {"choice"}
    assert stats["accepted_instructions"] >= RECIPE_TARGET


def test_judge_verdicts_are_choices_on_smollm2(smollm2_dir, tmp_path):
    """SmolLM2 as the judge writes prose, not [[A]] (unparsed ~all); as a likelihood choice every verdict counts."""
    from selfinstruct.config import Config, EvalConfig, TeacherConfig
    from selfinstruct.evaluate import compare
    from selfinstruct.generators.hf import HFGenerator

    judge = HFGenerator(TeacherConfig(model=str(smollm2_dir), backend="transformers", cache=None))
    items = [{"id": f"h{i}", "prompt": q, "reference": "x"} for i, q in
             enumerate(["What is the capital of France?", "Name a primary colour."])]
    good, bad = ["The capital of France is Paris.", "Red is a primary colour."], ["Bananas.", "I like trains."]
    w = compare(Config(eval=EvalConfig()), judge, items, good, bad, "vs_base", tmp_path / "j.jsonl")
    assert w["unparsed_verdicts"] == 0 and w["verdict_mode"] == "choice" and w["n"] == 2
