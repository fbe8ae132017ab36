"""Evol-Instruct: the elimination rules, the operation draw, and the evolution loop.

The loop tests drive the real generate loop (checkpoints, resume, stats, dataset) with a scripted
teacher whose answers are chosen per prompt, so each rule's effect on lineage can be asserted
exactly; the CLI tests run a tiny trained teacher end to end.
"""

import dataclasses
import json
import random
import re
from collections import Counter

import pytest
from conftest import ROOT, cli

from selfinstruct.config import EVOL_OPERATIONS, Config, EvolConfig, EvolWeights, GenerateConfig
from selfinstruct.configfile import load_config
from selfinstruct.dedup import RougePool, rouge_l
from selfinstruct.errors import TeacherError, UserError
from selfinstruct.filters import check_evolved_response, copies_prompt_words, is_sorry_short, is_stopwords_only
from selfinstruct.generate import evol
from selfinstruct.generate.loop import generate
from selfinstruct.generate.parse import parse_equal
from selfinstruct.generate.run import Run
from selfinstruct.generators import Completion
from selfinstruct.generators.base import Blocking
from selfinstruct.records import read_jsonl
from selfinstruct.seeds import Instance, SeedTask

PHRASES = EvolConfig().copy_phrases

# ---------------------------------------------------------------- the four rules


@pytest.mark.parametrize("text,equal", [
    ("Equal", True), ("Not Equal", False), ("not equal.", False), ("**Not Equal**", False),
    ("  equal\n", True), ("They are equal.", True), ("The two are NOT EQUAL: the second adds a limit.", False),
    ("Unequal", False), ("They are different.", False), ("Not equal. They are not the same.", False),
    ("They are the same, not different.", True), ("Identical", True), ("", None), ("Maybe?", None),
    ("I cannot tell", None),
])
def test_rule1_equality_judgement(text, equal):
    assert parse_equal(text) is equal


@pytest.mark.parametrize("response,dropped", [
    ("Sorry, I can't help with that.", True),
    ("I'm SORRY but this request is unclear to me.", True),
    ("sorry", True),
    # "sorry" in a long, real answer is kept (the rule needs both)
    ("Sorry for the wait! " + " ".join(["Here is a careful, complete answer to the question."] * 9), False),
    ("Here is the answer: the capital of France is Paris.", False),  # short, but no apology
])
def test_rule2_sorry_and_short(response, dropped):
    assert is_sorry_short(response, 80) is dropped
    assert check_evolved_response(response, 80) == ((False, "sorry_short_response") if dropped else (True, ""))


def test_rule2_word_limit_is_strict():
    text = "sorry " + " ".join(["word"] * 78)  # 79 words: under 80
    assert is_sorry_short(text, 80) and not is_sorry_short(text + " word", 80)


@pytest.mark.parametrize("response,dropped", [
    ("", True), ("   \n", True), ("...!?", True), ("The, and... of!", True), ("It is what it is.", True),
    ("I don't.", True), ("I don't know.", False), ("It’s not.", True), ("- - -\n* * *", True),
    ("The answer is 42.", False), ("Paris.", False), ("It is blue.", False), ("No, it's 7.", False),
    ("```python\nprint(1)\n```", False),
])
def test_rule3_only_punctuation_and_stop_words(response, dropped):
    assert is_stopwords_only(response) is dropped
    assert check_evolved_response(response, 80)[1] == ("stopwords_only_response" if dropped else "")


@pytest.mark.parametrize("evolved,dropped", [
    ("#Rewritten Prompt#: Write a haiku about tea, using the word steam.", True),
    ("Here is the rewritten prompt: write a haiku about tea.", True),
    ("As in the #Given Prompt#, write a haiku about tea that rhymes.", True),
    ("#Created Prompt#:\nDescribe the tea ceremony of Korea.", True),
    ("Write a haiku about tea that uses the word steam.", False),
    ("Write a prompt that a poet might be given.", False),
])
def test_rule4_copies_prompt_words(evolved, dropped):
    assert copies_prompt_words(evolved, PHRASES) is dropped


# ---------------------------------------------------------------- the operation draw


def test_operation_draw_is_seeded_and_follows_weights():
    weights = EvolWeights(constraints=3, deepen=1, concretize=0, reasoning=0, complicate_input=0, breadth=0)
    draws = [evol.choose_operation(weights, random.Random(f"s-{i}")) for i in range(4000)]
    counts = Counter(draws)
    assert set(counts) == {"constraints", "deepen"}  # a zero weight is never drawn
    assert abs(counts["constraints"] / 4000 - 0.75) < 0.03
    uniform = Counter(evol.choose_operation(EvolWeights(), random.Random(f"u-{i}")) for i in range(6000))
    assert set(uniform) == set(EVOL_OPERATIONS) and all(abs(n - 1000) < 150 for n in uniform.values())

    cfg = Config(generate=GenerateConfig(seed=7))
    plan = [[evol.operation_for(cfg, r, k) for k in range(50)] for r in range(4)]
    assert plan == [[evol.operation_for(cfg, r, k) for k in range(50)] for r in range(4)]  # same seed, same plan
    other = Config(generate=GenerateConfig(seed=8))
    assert plan != [[evol.operation_for(other, r, k) for k in range(50)] for r in range(4)]


def test_weights_are_validated_with_file_and_line(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("generate:\n  evol:\n    weights:\n      deepen: -1\n")
    with pytest.raises(UserError, match=r"c.yaml:4: 'generate.evol.weights.deepen': must be >= 0"):
        load_config(cfg)
    cfg.write_text("generate:\n  evol:\n    weights: {constraints: 0, deepen: 0, concretize: 0, reasoning: 0, "
                   "complicate_input: 0, breadth: 0}\n")
    with pytest.raises(UserError, match="at least one operation"):
        load_config(cfg)


def test_rouge_pool_can_leave_out_a_lineage():
    pool = RougePool()
    pool.add("Describe the history of the printing press in Europe.")
    pool.add("Write a limerick about the sleepy cat.")
    child = "Describe the history of the printing press in Europe and Asia."
    assert pool.best(child)[1] == 0 and pool.best(child)[0] > 0.7
    score, j = pool.best(child, {0})
    assert j == 1 and score < 0.3


# ---------------------------------------------------------------- the loop, with a scripted teacher

INPUTS = [
    ("s0", "Describe the history of the printing press in Europe."),        # evolves every round
    ("s1", "List five uses of baking soda at home, apologise."),             # rule 2 every time
    ("s2", "Explain photosynthesis to a child, emptyreply."),                # rule 3
    ("s3", "Compose a limerick about a sleepy cat, SAME."),                  # rule 1
    ("s4", "Summarise the story of Hamlet in three sentences, LABEL."),      # rule 4
]


TWIN = "Plan a weekend trip to the mountains with a detailed budget."


class ScriptedTeacher(Blocking):
    """Answers by prompt kind; `fail_after` raises on that call, like a teacher that went away."""

    name = "scripted"

    def __init__(self, fail_after: int | None = None):
        self.calls, self.fail_after = 0, fail_after
        self.seen_top_p: set[float] = set()

    def generate(self, requests):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise TeacherError("the teacher went away")
        for r in requests:  # WizardLM's system message on rewrites and responses, none on the equality check
            judging = r.prompt.startswith("Below are two instructions")
            assert r.system == (None if judging else "You are a helpful assistant."), r.prompt[:60]
            self.seen_top_p.add(r.sampling.top_p)
        return [[Completion(self.answer(r.prompt), "stop")] for r in requests]

    def answer(self, prompt: str) -> str:
        if prompt.startswith(("You are rewriting", "You are creating")):
            head = prompt.split("#Given Prompt#:\n")[-1].split("\n\n#")[0]
            if "TWIN" in head:
                return TWIN
            if "LABEL" in head:
                return f"{head} Add a moral, as the rewritten prompt says."  # the phrase inside: rule 4
            return f"{head} Then add detail {head.count('Then add') + 1}."
        if prompt.startswith("Below are two instructions"):
            return "Equal" if "SAME" in prompt else "Not Equal"
        if "apologise" in prompt:
            return "Sorry, I can't do that."
        if "emptyreply" in prompt:
            return "The, and of the."
        # one answer per prompt: two evolutions never share a response (that would be a shared_instance)
        return f"A full answer of {len(prompt)} words' worth about {prompt.split()[0].lower()} things."

    def close(self):
        pass


def evol_run(tmp_path, teacher, **evol_cfg):
    cfg = Config(generate=GenerateConfig(method="evol", out=str(tmp_path / "run"), seed=3,
                                         evol=EvolConfig(**{"rounds": 2, "batch_size": 2, **evol_cfg})))
    seeds = [SeedTask(id=i, instruction=t, instances=[Instance("", "An answer.")]) for i, t in INPUTS]
    (tmp_path / "run").mkdir(parents=True, exist_ok=True)
    return Run(dir=tmp_path / "run", cfg=cfg, teacher=teacher, seeds=seeds)


def test_rules_lineage_and_failed_evolutions_return_to_the_pool(tmp_path):
    run = evol_run(tmp_path, ScriptedTeacher())
    generate(run)
    assert run.teacher.seen_top_p == {0.95, 1.0}  # WizardLM's top_p on rewrites and responses; greedy judge
    records = read_jsonl(run.dir / "generated.jsonl")
    rejected = read_jsonl(run.dir / "rejected.jsonl")
    ops = [[evol.operation_for(run.cfg, r, k) for k in range(5)] for r in range(2)]

    # s0 evolved twice: depth 2 with the whole chain and the operation of each step
    first, second = records
    assert first["instruction"] == INPUTS[0][1] + " Then add detail 1."
    assert first["lineage"] == {"depth": 1, "operations": [ops[0][0]], "chain": ["s0"], "slot": 0, "evol_round": 1}
    assert second["instruction"] == first["instruction"] + " Then add detail 2."
    assert second["parents"] == [first["id"]] and second["method"] == f"evol:{ops[1][0]}"
    assert second["lineage"] == {"depth": 2, "operations": [ops[0][0], ops[1][0]], "chain": ["s0", first["id"]],
                                 "slot": 0, "evol_round": 2}

    # every other input failed in both rounds, each time evolved again from the input itself
    by_slot = {k: [r for r in rejected if r["slot"] == k] for k in range(1, 5)}
    expected = {1: "sorry_short_response", 2: "stopwords_only_response", 3: "no_information_gain",
                4: "copies_prompt_words"}
    for k, reason in expected.items():
        assert [(r["reason"], r["evol_round"], r["parent"], r["operation"]) for r in by_slot[k]] == \
            [(reason, 1, INPUTS[k][0], ops[0][k]), (reason, 2, INPUTS[k][0], ops[1][k])]

    stats = json.loads((run.dir / "stats.json").read_text())
    e = stats["evol"]
    assert e["rules"] == {"1_no_information_gain": 2, "2_sorry_short_response": 2, "3_stopwords_only_response": 2,
                          "4_copies_prompt_words": 2}
    assert e["attempts"] == 10 and e["accepted"] == 2 and e["eliminated"] == 8 and e["other_reasons"] == {}
    assert sum(v["accepted"] for v in e["per_operation"].values()) == 2
    assert sum(v["eliminated"] for v in e["per_operation"].values()) == 8
    depth = e["per_depth"]
    assert [depth[d]["n"] for d in ("0", "1", "2")] == [5, 1, 1]
    assert depth["0"]["instruction_words"] < depth["1"]["instruction_words"] < depth["2"]["instruction_words"]
    assert depth["2"]["constraints"] == 2  # the two numbers added
    assert stats["requests"] == {"evolve": 10, "equality": 8, "response": 8}  # rule 4 needs no more calls


def test_evolved_near_copies_of_other_lineages_are_dropped(tmp_path):
    """ROUGE-L leaves out the slot's own lineage only: two inputs evolving into the same text keep one."""
    run = evol_run(tmp_path, ScriptedTeacher(), rounds=1)
    run.seeds = [SeedTask(id=i, instruction=t, instances=[Instance("", "x")])
                 for i, t in [("a", "Write a poem about autumn leaves, TWIN."),
                              ("b", "Give three tips for learning the guitar, TWIN.")]]
    generate(run)
    records = read_jsonl(run.dir / "generated.jsonl")
    rejected = read_jsonl(run.dir / "rejected.jsonl")
    assert [r["lineage"]["chain"] for r in records] == [["a"]]
    assert [(r["reason"], r["slot"], r["nearest"]) for r in rejected] == [("rouge_similar", 1, TWIN)]


def test_resume_after_a_crash_mid_round_matches_an_uninterrupted_run(tmp_path):
    whole = evol_run(tmp_path / "a", ScriptedTeacher())
    generate(whole)
    # Two rounds of 3 batches; the teacher dies during the 4th batch (round 2).
    crashed = evol_run(tmp_path / "b", ScriptedTeacher(fail_after=6))
    with pytest.raises(TeacherError):
        generate(crashed)
    state = json.loads((crashed.dir / "state.json").read_text())
    assert state["recipes"]["evol"] == {"phase": "evolve", "round": 1, "pos": 0, "first_step": 0}
    resumed = evol_run(tmp_path / "b", ScriptedTeacher())
    generate(resumed)
    for name in ("generated.jsonl", "rejected.jsonl"):
        assert read_jsonl(resumed.dir / name) == read_jsonl(whole.dir / name)


def test_max_inputs_is_a_seeded_sample():
    tasks = [SeedTask(id=f"t{i}", instruction=f"Task number {i} about things.") for i in range(20)]
    tasks.append(dataclasses.replace(tasks[0], id="dup"))  # the same instruction is evolved once
    cfg = Config(generate=GenerateConfig(evol=EvolConfig(max_inputs=5)))
    picked = [s.ids[0] for s in evol.make_slots(cfg, tasks)]
    # the documented draw: 5 of the 20 distinct instructions from Random(f"{seed}-evol-inputs"), in input order
    expected = [f"t{i}" for i in sorted(random.Random("42-evol-inputs").sample(range(20), 5))]
    assert picked == expected
    other = Config(generate=GenerateConfig(seed=7, evol=EvolConfig(max_inputs=5)))
    assert [s.ids[0] for s in evol.make_slots(other, tasks)] != picked  # another run seed, another sample
    assert len(evol.make_slots(Config(), tasks)) == 20


# ---------------------------------------------------------------- end to end, tiny trained teacher


def check_lineage(records, input_ids):
    by_id = {r["id"]: r for r in records}
    for r in records:
        if not r["method"].startswith("evol:"):
            continue
        lin = r["lineage"]
        assert lin["depth"] == len(lin["operations"]) == len(lin["chain"]) and lin["depth"] >= 1
        assert r["method"] == f"evol:{lin['operations'][-1]}" and r["parents"] == [lin["chain"][-1]]
        assert lin["chain"][0] in input_ids
        for depth, ancestor in enumerate(lin["chain"][1:], 1):  # each ancestor is an accepted evolution
            a = by_id[ancestor]["lineage"]
            assert a["depth"] == depth and a["operations"] == lin["operations"][:depth]
            assert a["chain"] == lin["chain"][:depth] and a["slot"] == lin["slot"]


def test_evol_cli_two_rounds(evol_teacher_dir, fast_config, tmp_path):
    inputs = tmp_path / "inputs.jsonl"
    rng = random.Random(5)
    import tiny

    rows = [dict(zip(("instruction", "input", "output"), tiny.synthetic_task(rng), strict=True)) for _ in range(12)]
    inputs.write_text("".join(json.dumps({**r, "input": ""}) + "\n" for r in rows))
    run = tmp_path / "run"
    # --seed 3: a seed where the tiny teacher's rewrites survive both rounds in some slot (with others, the
    # copy checks reject enough of its leaked "Input:" lines that no lineage reaches depth 2)
    r = cli("generate", "--method", "evol", "--seeds", inputs, "--teacher", evol_teacher_dir, "--out", run,
            "--config", fast_config, "--seed", 3)
    assert r.returncode == 0, r.stderr
    records = read_jsonl(run / "generated.jsonl")
    rejected = [x for x in read_jsonl(run / "rejected.jsonl") if x["stage"] == "evol"]
    check_lineage(records, {f"inputs-{i}" for i in range(1, 13)})
    assert max(x["lineage"]["depth"] for x in records) == 2  # some lineage evolved in both rounds
    stats = json.loads((run / "stats.json").read_text())
    e = stats["evol"]
    assert e["inputs"] == 12 and e["rounds"] == 2 and e["attempts"] == 24
    assert e["accepted"] == len(records) and e["eliminated"] == len(rejected) == stats["rejected_total"]
    assert e["accepted"] + e["eliminated"] == 24 and e["eliminated"] > 0
    assert sum(e["rules"].values()) + sum(e["other_reasons"].values()) == e["eliminated"]
    assert Counter(x["reason"] for x in rejected) == Counter(stats["rejected"])
    for op, v in e["per_operation"].items():
        assert v["accepted"] == sum(x["method"] == f"evol:{op}" for x in records)
        assert v["eliminated"] == sum(x["operation"] == op for x in rejected)
    assert e["per_depth"]["0"]["n"] == 12
    out = cli("stats", run)
    assert out.returncode == 0 and "difficulty by evolution depth" in out.stdout
    assert "1_no_information_gain" in out.stdout


def test_self_instruct_then_evol_in_one_run(evol_teacher_dir, fast_config, tmp_path):
    run = tmp_path / "run"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(fast_config.read_text().replace("rounds: 2", "rounds: 1"))
    r = cli("generate", "--method", "self-instruct+evol", "--seeds", ROOT / "seeds", "--num-instructions", 3,
            "--teacher", evol_teacher_dir, "--out", run, "--config", cfg)
    assert r.returncode == 0, r.stderr
    records = read_jsonl(run / "generated.jsonl")
    breadth = [x for x in records if x["method"] == "self-instruct"]
    evolved = [x for x in records if x["method"].startswith("evol:")]
    assert len({x["instruction"] for x in breadth}) == 3 and evolved
    check_lineage(records, {x["id"] for x in breadth})
    # the same dedup against everything accepted: seeds, Self-Instruct's records, other evolutions
    # (an evolution is only compared with its own lineage by the Equal / Not Equal judgement)
    seeds = [json.loads(line)["instruction"] for line in (ROOT / "seeds" / "seed_tasks.jsonl").open()]
    root_text = {x["id"]: x["instruction"] for x in breadth}
    for x in evolved:
        others = seeds + [t for i, t in root_text.items() if i != x["lineage"]["chain"][0]]
        others += [y["instruction"] for y in evolved if y is not x]
        assert max(rouge_l(x["instruction"], t) for t in others) < 0.7
    stats = json.loads((run / "stats.json").read_text())
    assert stats["evol"]["inputs"] == 3 and stats["evol"]["attempts"] == 3
    assert re.match(r"evol/\w+\.jinja@", evolved[0]["template"])


def test_inputs_from_a_run_directory_and_a_chat_file(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "generated.jsonl").write_text("".join(json.dumps(
        {"id": f"r1-00000{i}", "instruction": "Name a colour." if i < 2 else "Name a fruit.", "input": "",
         "output": "Blue.", "method": "self-instruct"}) + "\n" for i in range(3)))
    (run / "rejected.jsonl").write_text(json.dumps({"stage": "task", "reason": "too_short"}) + "\n")
    slots = evol.make_slots(Config(), evol.input_tasks(run))  # rejected.jsonl is not an input
    assert [(s.ids, s.root) for s in slots] == [(["r1-000000"], "Name a colour."), (["r1-000002"], "Name a fruit.")]
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "system", "content": "Be brief."},
                                             {"role": "user", "content": "Explain tides."},
                                             {"role": "assistant", "content": "The moon."}]}) + "\n")
    assert [s.root for s in evol.make_slots(Config(), evol.input_tasks(chat))] == ["Explain tides."]
    alpaca = tmp_path / "a.json"
    alpaca.write_text(json.dumps([{"instruction": "Translate to French.", "input": "Good day", "output": "Bonjour"}]))
    roots = [s.root for s in evol.make_slots(Config(), evol.input_tasks(alpaca))]
    assert roots == ["Translate to French.\n\nGood day"]
