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


def test_blacklist_is_whole_word_and_configurable():
    assert check_instruction("Explain the mapping between keys and values.", CFG)[0]  # 'map' inside a word
    assert not check_instruction("Plan a trip to Rome with friends.", FilterConfig(blacklist=["rome"]))[0]


def test_instance_filters():
    assert check_instance(Instance("a", "b")) == (True, "")
    assert check_instance(Instance("a", "  ")) == (False, "empty_output")
    assert check_instance(Instance("same", "same")) == (False, "input_equals_output")


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
