import pytest

from selfinstruct.config import FilterConfig
from selfinstruct.filters import check_instance, check_instruction, clean_instances
from selfinstruct.seeds import Instance

CFG = FilterConfig()


@pytest.mark.parametrize("text,reason", [
    ("Write a haiku about tea.", ""),
    ("Explain how vaccines train the immune system.", ""),
    ("Summarize this.", "too_short"),
    (" ".join(["word"] * 151), "too_long"),
    ("Describe the picture in the attached message.", "blacklisted_word"),
    ("Draw a cat using only ASCII characters.", "blacklisted_word"),
    ("Tell me how to go to the station from here.", "blacklisted_word"),
    ("Write a program that sorts a list of numbers.", "banned_prefix"),
    ("- List three things about dogs.", "starts_with_punctuation"),
    ("Écrivez un poème sur la mer.", "starts_non_ascii"),
])
def test_instruction_filters(text, reason):
    ok, why = check_instruction(text, CFG)
    assert ok == (reason == "") and why == reason


def test_evolved_instructions_skip_the_self_instruct_filters():
    """WizardLM applies only its elimination rules: a rewrite that adds a table or mentions a file, or
    starts with "Write a program", can evolve; the Self-Instruct filters stay for Self-Instruct."""
    from selfinstruct.filters import check_evolved_instruction

    table = "| item | price |\n|---|---|\n| tea | 3 |\n| cake | 5 |\nSort these rows by price, cheapest first."
    code = "```python\ndef add(a, b):\n    return a - b\n```\nFind the bug in this function and fix it."
    for text in (table, code, "Write a program that reads the CSV file and plots the totals per month.",
                 "Summarize the attached file in 150 words, citing every section heading it contains. " * 20):
        assert not check_instruction(text, CFG)[0]
        assert check_evolved_instruction(text) == (True, "")
    assert check_evolved_instruction("   ") == (False, "empty_evolution")
    assert check_evolved_instruction("The garden was beautiful.") == (False, "not_a_task")  # ours, not WizardLM's
    assert check_evolved_instruction("The garden was beautiful.", require_task_form=False) == (True, "")


def test_blacklist_is_whole_word_and_configurable():
    assert check_instruction("Explain the mapping between keys and values.", CFG)[0]  # 'map' inside a word
    assert not check_instruction("Plan a trip to Rome with friends.", FilterConfig(blacklist=["rome"]))[0]


def test_instance_filters():
    assert check_instance(Instance("a", "b")) == (True, "")
    assert check_instance(Instance("a", "  ")) == (False, "empty_output")
    assert check_instance(Instance("same", "same")) == (False, "input_equals_output")


@pytest.mark.parametrize("inst", [Instance("The list of numbers:", "6"), Instance("3, 4", "The answer is:"),
                                  Instance("", "Here are the steps: ")])
def test_unfinished_instance_ending_with_colon(inst):
    """Self-Instruct's filter_invalid_instances drops an instance whose input or output ends with ':'
    (an unfinished generation); a colon inside the text is fine."""
    assert check_instance(inst) == (False, "ends_with_colon")
    assert check_instance(Instance("Time: 10:30", "Half past ten.")) == (True, "")


def test_clean_instances_duplicates_and_limit():
    kept, dropped = clean_instances(
        [Instance("1", "a"), Instance("1", "a"), Instance("", ""), Instance("2", "b"), Instance("3", "c")], limit=2)
    assert kept == [Instance("1", "a"), Instance("2", "b")]
    assert [r for _, r in dropped] == ["duplicate_instance", "empty_output", "over_instance_limit"]


def test_conflicting_instances_drop_the_task():
    kept, dropped = clean_instances([Instance("x", "yes"), Instance("x", "no")], limit=5)
    assert kept == [] and {r for _, r in dropped} == {"conflicting_instances"}
    # empty inputs with different outputs are fine (generation tasks without input)
    kept, _ = clean_instances([Instance("", "a poem"), Instance("", "another poem")], limit=5)
    assert len(kept) == 2


def test_rouge_boundary_is_the_papers_unless_asked():
    """The paper keeps an instruction when ROUGE-L < 0.7; Self-Instruct's code keeps it at <= 0.7. A score
    of exactly 0.7 (common: 7 of 10 tokens in common) is dropped by default and kept with rouge_keep_equal."""
    from selfinstruct.dedup import rouge_l
    from selfinstruct.filters import is_rouge_similar

    score = rouge_l("one two three four five six seven eight nine ten", "one two three four five six seven x y z")
    assert score == 0.7
    assert is_rouge_similar(score, CFG) and not is_rouge_similar(0.6999, CFG)
    code = FilterConfig(rouge_keep_equal=True)
    assert not is_rouge_similar(score, code) and is_rouge_similar(0.7001, code)
