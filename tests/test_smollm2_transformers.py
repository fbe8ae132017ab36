"""The transformers backend on a real chat model, SmolLM2-135M-Instruct: what is transformers' own, proven
where a recipe meets it. A prefilled reply is continued (Self-Instruct's and Alpaca's instance and list
replies start with their format), a request with choices gets the likelier one (Self-Instruct's Yes / No,
Evol's Equal / Not Equal, the judge's verdicts). The recipes run end to end on SmolLM2 on the vLLM engine
(tests/test_vllm.py) and on the tiny teachers on transformers (test_cli.py, test_evol.py and others); their
logic does not depend on the backend. A whole Self-Instruct run on SmolLM2 on transformers ran here until the
suite had to fit in 30 minutes beside a busy-loop: 4 to 5 minutes of its 30 for what these tests check in
seconds."""

import pytest

from selfinstruct.config import Sampling, TeacherConfig
from selfinstruct.generators import Request
from selfinstruct.prompts import render

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2_hf(smollm2_dir):
    from selfinstruct.generators.hf import HFGenerator

    return HFGenerator(TeacherConfig(model=str(smollm2_dir), backend="transformers", cache=None))


def test_prefilled_reply_is_continued_on_smollm2(smollm2_hf):
    """Unprefilled, SmolLM2 restates the task before any example; prefilled, it writes the examples at once."""
    prompt = render("self_instruct/instances_input_first.jinja", instruction="Convert the word to upper case.")
    req = Request(prompt, Sampling(temperature=0.0, max_tokens=40), prefill="Example 1\nInput:")
    text = smollm2_hf.generate([req])[0][0].text
    assert text.startswith("Example 1\nInput:") and "Output:" in text, text


def test_choices_are_chosen_by_likelihood_on_smollm2(smollm2_hf):
    """Each request with choices gets one of them, whatever the model would have written; the classification
    question picks by likelihood, at any temperature."""
    assert smollm2_hf.enforces_choices
    tasks = ("Tell whether the email is spam or not spam.", "Write a poem about a lighthouse.")
    reqs = [Request(render("self_instruct/is_classification.jinja", instruction=task),
                    Sampling(temperature=0.0, max_tokens=4), choices=("Yes", "No")) for task in tasks]
    reqs.append(Request("Are these the same? 'Name a fruit.' and 'Name a fruit.'",
                        Sampling(temperature=1.0, max_tokens=6, seed=1), choices=("Equal", "Not Equal")))
    outs = [o[0].text for o in smollm2_hf.generate(reqs)]
    assert outs[0] in ("Yes", "No") and outs[1] in ("Yes", "No") and outs[2] in ("Equal", "Not Equal"), outs


def test_judge_verdicts_are_choices_on_smollm2(smollm2_hf, tmp_path):
    """SmolLM2 as the judge writes prose, not [[A]] (unparsed ~all); as a likelihood choice every verdict counts."""
    from selfinstruct.config import Config, EvalConfig
    from selfinstruct.evaluate import compare

    items = [{"id": f"h{i}", "prompt": q, "reference": "x"} for i, q in
             enumerate(["What is the capital of France?", "Name a primary colour."])]
    good, bad = ["The capital of France is Paris.", "Red is a primary colour."], ["Bananas.", "I like trains."]
    w = compare(Config(eval=EvalConfig()), smollm2_hf, items, good, bad, "vs_base", tmp_path / "j.jsonl")
    assert w["unparsed_verdicts"] == 0 and w["verdict_mode"] == "choice" and w["n"] == 2
