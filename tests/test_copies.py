"""Copy detection and the task-form check: pure functions, tested on the junk a 135M teacher really wrote
(tests/test_quality.py runs them on SmolLM2 itself)."""

import json

import pytest

from selfinstruct.config import FilterConfig
from selfinstruct.copies import InstanceIndex, copies, instance_copy
from selfinstruct.filters import check_instruction
from selfinstruct.generate.parse import demo_instances
from selfinstruct.prompts import render
from selfinstruct.seeds import Instance
from selfinstruct.taskform import looks_like_task

DEMOS = [Instance("25 degrees Celsius", "77 degrees Fahrenheit"), Instance("13", "yes"),
         Instance("", "1. Go to bed at the same time every night. 2. Keep the bedroom dark."),
         Instance("Paragraph: The library opens at 9 am on weekdays and at 11 am on Saturdays. It is closed on "
                  "Sundays.\nQuestion: When does the library open on Saturdays?", "At 11 am.")]


@pytest.mark.parametrize("inst,reason", [
    (Instance("25 degrees Celsius", "77 degrees Fahrenheit"), "copies_demo"),      # the demo, word for word
    (Instance("  25 Degrees   celsius ", "77 degrees fahrenheit."), "copies_demo"),  # case and spaces
    (Instance("A rainy day in May", "77 degrees Fahrenheit"), "copies_demo"),      # a demo's output under new input
    (Instance("", "1. Go to bed at the same time each night. 2. Keep the bedroom dark."), "copies_demo"),  # ROUGE 0.9+
    (Instance("13", "yes"), "copies_demo"),                                          # a short pair, whole
    (Instance("77 degrees Fahrenheit", "25 C"), "copies_demo"),                     # a demo's output as the input
    # the paragraph of a demo's input, alone (seen from SmolLM2 on the engine, under four instructions)
    (Instance("The library opens at 9 am on weekdays and at 11 am on Saturdays. It is closed on Sundays.",
              "The library does not open on Sundays."), "copies_demo"),
    (Instance("The museum opens at 10 am on weekdays and is closed on Mondays and public holidays.", "10 am"), ""),
    (Instance("I loved the film.", "yes"), ""),          # a short label alone is an answer, not a copy
    (Instance("17", "yes"), ""),
    (Instance("30 degrees Celsius", "86 degrees Fahrenheit"), ""),
    (Instance("", "Convert the temperature from Celsius to Fahrenheit."), "echoes_instruction"),
    (Instance("Convert the temperature from Celsius to Fahrenheit", "86 F"), "echoes_instruction"),
])
def test_instance_copy(inst, reason):
    assert instance_copy(inst, DEMOS, "Convert the temperature from Celsius to Fahrenheit.") == reason


def test_copies_needs_text_and_a_close_match():
    assert not copies("", ["anything"]) and not copies("Write a poem.", ["", "  "])
    assert copies("Write a poem about the sea.", ["write a poem about the sea"])
    assert not copies("Write a poem about the sea.", ["Write a poem about the mountains in winter."])


def test_shared_instance_index():
    index = InstanceIndex()
    index.add(Instance("-10 degrees Celsius", "14 degrees Fahrenheit"), "Convert the temperature.")
    assert index.shared(Instance("-10 degrees celsius", "14 degrees Fahrenheit"), "Name a famous person.")
    assert not index.shared(Instance("-10 degrees Celsius", "14 degrees Fahrenheit"), "convert the  temperature.")
    assert not index.shared(Instance("-10 degrees Celsius", "15 degrees Fahrenheit"), "Name a famous person.")
    index.add_records([{"instruction": "Say hi.", "input": "", "output": "Hi!"}])
    assert index.shared(Instance("", "Hi!"), "Greet me.")


@pytest.mark.parametrize("template,clf,n,first", [
    ("self_instruct/instances_input_first.jinja", False, 16, Instance("25 degrees Celsius", "77 degrees Fahrenheit")),
    ("self_instruct/instances_output_first.jinja", True, 34, Instance(
        "I laughed from start to finish and would watch it again tomorrow.", "positive")),
])
def test_demo_instances_are_read_from_the_prompt(template, clf, n, first):
    """The instance prompts show many varied demonstrations (11 input-first tasks, 16 output-first ones, as the
    original code's prompts), read back with the parser the replies go through; the task itself is not one."""
    prompt = render(template, instruction="Tell me a joke.\nExample 1\nInput: <none>\nOutput: a joke")
    demos = demo_instances(prompt, clf)
    assert len(demos) == n and demos[0] == first
    assert prompt.count("\nTask:") == (12 if not clf else 17)
    assert Instance("", "a joke") not in demos


# What SmolLM2-135M-Instruct wrote as "instructions" on an unseen seed file, and Alpaca's human-checked ones.
JUNK = ["John Smith, CEO of XYZ Corporation", "Elon Musk, CEO of Tesla Motors Inc.",
        "Leonardo da Vinci, Renaissance artist", "Tone: The tone is formal and professional.",
        "Opinion: The article discusses the benefits of using AI in business operations.",
        "The management strategies of the organization are based on innovation and creativity.",
        "An adventure story about a student with a disability can be found here:",
        "When it comes to choosing the best example of a primary source, there isn't one.",
        "The purpose of an A/B test is to compare two or more groups and determine which one performs better.",
        "It's actually quite simple, but I like to think of it as \"I'm going to make a cake tomorrow\"!",
        # on the repo's seeds, on vLLM: answers, advice and a worked step, each accepted before these checks
        "No, the sentence does not contain a clause that could be used as an answer to the question \"How do I "
        "get started with my morning routine?\"", "Yes, the sentence is grammatically correct.",
        "You can begin by setting a good example for yourself.",
        "Fifth, I will round up to the next whole number (to make it 6) and add it to the total weight.",
        # the prompt asked back: a task about the task, with nothing to do
        "What is the task?", "What is the output of this example?", "Given the input, what is the output?",
        "It's important to fuel your body throughout the day so that you're able to perform at your best."]
TASKS = ["Given a list of numbers, find the largest.", "What is the capital of France", "Is this sentence correct",
         "You need to write a creative opening scene for a horror movie.", "Briefly explain photosynthesis.",
         "Read the paragraph and then summarize it.", "Re-write the sentence in the passive voice.",
         "I want you to list three fruits.", "How many legs does a spider have?", "Multiply 4 and 7.",
         "Your task is to summarize the article in three sentences.", "I want you to act as a travel guide.",
         "Act as a tour guide and suggest three places to visit in Paris.",
         "Answer the given questions", "What is the answer to 14 + 29?", "6 + 3 = ?"]


@pytest.mark.parametrize("text", JUNK)
def test_non_tasks_are_rejected(text):
    assert not looks_like_task(text)
    assert check_instruction(text, FilterConfig()) == (False, "not_a_task")
    assert check_instruction(text, FilterConfig(require_task_form=False))[0]


@pytest.mark.parametrize("text", TASKS)
def test_tasks_pass(text):
    assert looks_like_task(text)


def test_task_form_keeps_every_seed_and_held_out_task():
    from conftest import ROOT

    for f in (ROOT / "seeds" / "seed_tasks.jsonl", ROOT / "heldout" / "heldout_tasks.jsonl"):
        for line in f.read_text().splitlines():
            assert looks_like_task(json.loads(line)["instruction"]), line


@pytest.mark.parametrize("inst,leak", [
    (Instance("Output: The company seeks wisdom.", "active voice"), True),   # a reply the parser could not split
    (Instance("a", "Output: 1-3\nOutput: 2-4"), True),
    (Instance("", "Classic film.\n3. Instructions:\nUse a lion."), True),     # Alpaca's scaffolding
    (Instance("x", "Example 2"), True),
    (Instance("In the output: x", "The task: do it."), False),               # the words, not the scaffolding
    (Instance("Outputs are nice", "Input validation matters"), False),
])
def test_format_leak(inst, leak):
    from selfinstruct.copies import format_leak

    assert format_leak(inst) == leak
    assert (instance_copy(inst, [], "Do something useful.") == "format_leak") == leak
