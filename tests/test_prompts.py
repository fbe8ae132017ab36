import pytest

from selfinstruct.errors import UserError
from selfinstruct.prompts import Prompts, render, template_id


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
        Prompts(tmp_path).render("evil.jinja", x="")


def test_template_id_changes_with_content(tmp_path):
    (tmp_path / "t.jinja").write_text("a")
    first = Prompts(tmp_path).template_id("t.jinja")
    (tmp_path / "t.jinja").write_text("b")
    assert first.startswith("t.jinja@") and Prompts(tmp_path).template_id("t.jinja") != first


def test_user_template_mistake_fails_at_start_up(tmp_path):
    """A user's template naming a variable it is not given fails before any model loads or file is written."""
    from conftest import ROOT, cli

    mine = tmp_path / "my_prompts" / "evol"
    mine.mkdir(parents=True)
    (mine / "deepen.jinja").write_text("Make this harder: {{ instrucion }}\n")  # typo
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"generate:\n  prompts_dir: {tmp_path / 'my_prompts'}\n")
    r = cli("generate", "--method", "evol", "--seeds", ROOT / "seeds", "--teacher", tmp_path / "no-model",
            "--config", cfg, "--out", tmp_path / "run")
    assert r.returncode == 2, r.stderr
    assert "deepen.jinja" in r.stderr and "instrucion" in r.stderr and "undefined" in r.stderr
    assert not (tmp_path / "run").exists()


def test_user_templates_override_ours(tmp_path):
    from selfinstruct.prompts import PROMPTS_DIR

    (tmp_path / "evol").mkdir()
    (tmp_path / "evol" / "deepen.jinja").write_text("Deeper, please: {{ instruction }}")
    ours = template_id("evol/deepen.jinja")
    mine = Prompts(tmp_path)
    assert mine.render("evol/deepen.jinja", instruction="Say hi.") == "Deeper, please: Say hi."
    assert mine.template_id("evol/deepen.jinja") != ours
    assert "#Created Prompt#" in mine.render("evol/breadth.jinja", instruction="x")  # the rest are ours
    assert (PROMPTS_DIR / "evol" / "deepen.jinja").read_text() != "Deeper, please: {{ instruction }}"
    assert render("evol/deepen.jinja", instruction="Say hi.") != "Deeper, please: Say hi."  # nothing global
    with pytest.raises(UserError, match="not a directory"):
        Prompts(tmp_path / "missing")
