import pytest

from selfinstruct.generate.parse import (
    normalise_instruction,
    parse_alpaca,
    parse_instances,
    parse_instructions,
    parse_yes_no,
)
from selfinstruct.seeds import Instance


def test_continuation_of_numbered_list():
    text = " Write a poem about rain.\n10. List three uses of salt.\n11.  Explain   tides  simply."
    items, dropped = parse_instructions(text, truncated=False)
    assert items == ["Write a poem about rain.", "List three uses of salt.", "Explain tides simply."]
    assert dropped == []


def test_chat_style_restarts_numbering_and_prose_preamble():
    text = "Sure! Here are more tasks:\n9. Name two rivers in Asia.\n10) Translate 'cat' into Spanish."
    items, dropped = parse_instructions(text, truncated=False)
    assert items == ["Name two rivers in Asia.", "Translate 'cat' into Spanish."]
    assert dropped == [("Sure! Here are more tasks:", "preamble")]


def test_missing_numbers_keep_one_item_and_case_is_kept():
    items, _ = parse_instructions("write a JSON schema for a Python class", truncated=False)
    assert items == ["Write a JSON schema for a Python class"]  # not str.capitalize()'s "json", "python"


def test_truncated_last_item_dropped():
    items, dropped = parse_instructions("Sort the list.\n10. Describe the water cyc", truncated=True)
    assert items == ["Sort the list."]
    assert dropped == [("Describe the water cyc", "truncated")]


def test_empty_items_are_counted():
    items, dropped = parse_instructions("Do X now please.\n10. \n11. Do Y now please.", truncated=False)
    assert items == ["Do X now please.", "Do Y now please."] and dropped == [("", "empty_item")]


def test_yes_no():
    assert parse_yes_no(" Yes") is True
    assert parse_yes_no("no.") is False
    assert parse_yes_no("**Yes**, it is") is True
    assert parse_yes_no("Maybe") is None and parse_yes_no("") is None


def test_input_first_instances_with_prose_and_none():
    text = ("Here you go.\nExample 1\nInput: 25 C\nOutput: 77 F\nExample 2:\nInput: <none>\nOutput: nothing to convert"
            "\nExample 3\nOutput: direct answer")
    assert parse_instances(text, classification=False) == [
        Instance("25 C", "77 F"), Instance("", "nothing to convert"), Instance("", "direct answer")]


def test_input_first_run_together_pairs_keep_first_output():
    text = "Example 1\nInput: a\nOutput: b\nInput: c\nOutput: d"
    assert parse_instances(text, classification=False) == [Instance("a", "b")]


def test_no_example_header_is_one_instance():
    assert parse_instances("Input: x\nOutput: y", classification=False) == [Instance("x", "y")]


@pytest.mark.parametrize("reply", ["I'm sorry, but I can't help with that request.",
                                   "Sorting words is a common task. People do it in dictionaries and indexes,\n"
                                   "and computers do it with comparison sorts such as merge sort."])
def test_reply_without_examples_or_output_is_no_instance(reply):
    """Self-Instruct's parse_instances_for_generation_task returns nothing for a reply with neither
    'Example' markers nor an 'Output:' field: a refusal or a paragraph of prose is not an instance."""
    assert parse_instances(reply, classification=False) == []


def test_output_first_instances():
    text = "Class label: positive\nInput: Loved it.\nClass label: negative\nSentence: Hated it.\nClass label: neutral"
    assert parse_instances(text, classification=True) == [
        Instance("Loved it.", "positive"), Instance("Sentence: Hated it.", "negative"), Instance("", "neutral")]


def test_normalise():
    assert normalise_instruction("  tell me\n a joke ") == "Tell me a joke"
    assert normalise_instruction("1. list the ingredients.") == "List the ingredients."  # a nested list number
    assert normalise_instruction("3.5 million people: how many is that?") == "3.5 million people: how many is that?"
    # labels a chat teacher puts before its instruction (SmolLM2 did), alone or after a number
    for labelled in ("Instructions: sort the list.", "Task description: Sort the list.", "5: sort the list.",
                     "9. Task 3: sort the list.", "New instruction: Sort the list."):
        assert normalise_instruction(labelled) == "Sort the list."
    assert normalise_instruction("Instruction manuals: list them.") == "Instruction manuals: list them."
    assert normalise_instruction("1999: the year of what?") == "1999: the year of what?"


def test_alpaca_continuation_restart_and_noinput():
    text = (" Give three tips for staying healthy.\n4. Input:\n<noinput>\n4. Output:\nEat well.\n###\n"
            "5. Instruction: Translate to French.\n5. Input:\nHello\n5. Output:\nBonjour")
    tasks, dropped = parse_alpaca(text, first=4, truncated=False)
    assert tasks == [("Give three tips for staying healthy.", Instance("", "Eat well.")),
                     ("Translate to French.", Instance("Hello", "Bonjour"))]
    assert dropped == []
    restarted, _ = parse_alpaca("4. Instruction: Name a color.\n4. Input:\n<noinput>\n4. Output:\nRed",
                                first=4, truncated=False)
    assert restarted == [("Name a color.", Instance("", "Red"))]


def test_alpaca_skipped_number_malformed_and_truncated():
    text = ("Sort these.\n4. Input: 3, 1\n4. Output: 1, 3\n###\n7. Instruction: Skipped numbers are fine.\n"
            "7. Input:\n<noinput>\n7. Output:\nYes.\n###\n8. Instruction: No fields follow\n###\n"
            "9. Instruction: Cut off\n9. Inp")
    tasks, dropped = parse_alpaca(text, first=4, truncated=True)
    assert [t for t, _ in tasks] == ["Sort these.", "Skipped numbers are fine."]
    assert dropped == [("9. Instruction: Cut off\n9. Inp", "truncated"),
                       ("8. Instruction: No fields follow", "malformed_task")]


def test_echoed_rewrite_header_is_stripped():
    from selfinstruct.generate.parse import strip_echo

    assert strip_echo("#Rewritten Prompt#:\nList three rivers in Peru.") == "List three rivers in Peru."
    assert strip_echo("Created Prompt: Name a rare bird.") == "Name a rare bird."
    # inside the text it stays, for elimination rule 4 to see
    assert strip_echo("Name a bird. #Rewritten Prompt#: x") == "Name a bird. #Rewritten Prompt#: x"
    assert strip_echo("Given prompt words stay.") == "Given prompt words stay."


def test_alpaca_chat_teacher_layouts():
    """What a small chat model (SmolLM2-135M-Instruct) writes: no "###", unnumbered fields, no Input field,
    several Input/Output pairs run together, empty instructions."""
    text = ("4. Instruction: Name a color.\nOutput: Red\n"
            "5. Instruction: Add the numbers.\n5. Input:\n2, 3\n5. Output:\n5\n6. Input: 1, 1\n6. Output: 2\n"
            "7. Instruction:\n8. Instruction: Reverse the word.\nInput: cat\n###\n"
            "stray prose\n9. Input: x\n9. Output: y\n###\n10. Instruction: Count to three.\n10. Output: 1, 2, 3")
    tasks, dropped = parse_alpaca(text, first=4, truncated=False)
    assert tasks == [("Name a color.", Instance("", "Red")), ("Add the numbers.", Instance("2, 3", "5")),
                     ("Count to three.", Instance("", "1, 2, 3"))]
    assert sorted(dropped) == sorted([("7. Instruction:", "malformed_task"),
                                      ("8. Instruction: Reverse the word.\nInput: cat", "malformed_task"),
                                      ("stray prose\n9. Input: x\n9. Output: y", "malformed_task")])


def test_json_list_replies():
    from selfinstruct.generate.parse import parse_alpaca_json, parse_instructions_json

    items, dropped = parse_instructions_json('{"instructions": ["  name a  river.", "", 3, "1. Sort words"]}', False)
    assert items == ["Name a river.", "Sort words"]
    assert dropped == [('""', "empty_item"), ("3", "empty_item")]
    fenced, _ = parse_instructions_json('```json\n["Add two numbers."]\n```', False)
    assert fenced == ["Add two numbers."]
    assert parse_instructions_json('{"instructions": ["cut', True) == ([], [('{"instructions": ["cut', "truncated")])
    cut = '{"instructions": ["Name a river.", "Sort the list.", "Write a po'
    assert parse_instructions_json(cut, True) == (["Name a river.", "Sort the list."], [(cut, "truncated")])
    assert parse_instructions_json("Sure! 1. Name", False) == ([], [("Sure! 1. Name", "invalid_json")])
    assert parse_instructions_json('{"tasks": "no list"}', False)[1][0][1] == "invalid_json"

    tasks, dropped = parse_alpaca_json('{"tasks": [{"instruction": "Add.", "input": "2, 3", "output": "5"}, '
                                       '{"instruction": "Hi", "input": "<noinput>", "output": ""}, '
                                       '{"instruction": "", "input": "", "output": "x"}, "junk"]}', False)
    assert tasks == [("Add.", Instance("2, 3", "5")), ("Hi", Instance("", ""))]  # empty output: the filters' call
    assert [r for _, r in dropped] == ["malformed_task", "malformed_task"]
