import pytest

from selfinstruct.errors import UserError
from selfinstruct.prompts import render, template_id


def test_instruction_prompt_shape():
    text = render("self_instruct/instructions.jinja", instructions=["Do A.", "Do B."])
    assert text == "Come up with a series of tasks:\n1. Do A.\n2. Do B.\n3."


def test_instance_prompts_end_with_the_task():
    for name in ("instances_input_first", "instances_output_first", "is_classification"):
        text = render(f"self_instruct/{name}.jinja", instruction="Sort the words.")
        assert "Task: Sort the words." in text.splitlines()[-2:]


def test_missing_variable_is_an_error():
    with pytest.raises(UserError, match="undefined"):
        render("self_instruct/instructions.jinja")


def test_sandbox_blocks_python_internals(tmp_path):
    (tmp_path / "evil.jinja").write_text("{{ x.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(Exception, match="unsafe|not safely|access"):
        render("evil.jinja", root=tmp_path, x="")


def test_template_id_changes_with_content(tmp_path):
    (tmp_path / "t.jinja").write_text("a")
    first = template_id("t.jinja", root=tmp_path)
    (tmp_path / "t.jinja").write_text("b")
    assert first.startswith("t.jinja@") and template_id("t.jinja", root=tmp_path) != first
