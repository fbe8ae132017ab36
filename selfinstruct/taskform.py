"""Does a text read as a task? A cheap English check that catches what a weak teacher emits in place of an
instruction: a name and title ("Elon Musk, CEO of Tesla"), a label and a statement ("Tone: The tone is
formal."), a plain statement ("The strategy is based on innovation.").

    looks_like_task("Given a list of numbers, find the largest.")   # True
    looks_like_task("Leonardo da Vinci, Renaissance artist")         # False

A text reads as a task when it asks something (a question mark; a question word followed by a verb or
"many", "much"...; an auxiliary first: "Is this sentence correct"), begins with "Given", or has a clause that
starts with a verb of instruction ("Write", "please explain", "..., then sort"; not "..., and add it to the total",
nor "You can begin by ...": advice), or asks in a sentence ("you need to classify", "I want you to list"; not "The
aim is to compare"). A text that opens with "Yes," or "No," is an answer, never a task, and one made only of words
about the task ("What is the task?", "What is the output?") asks nothing.
Measured on Alpaca's 52,002 human-checked instructions, 0.5% fail (typos such as "Descibe", rare verbs);
on a 135M teacher's rejected output, every name, label and statement fails (README, "Quality"). English only:
`filters.require_task_form: false` turns it off for other languages.
"""

from __future__ import annotations

import re


def _words(text: str) -> list[str]:
    return text.split()


TASK_VERBS = frozenset(_words("""
access act adapt add address adjust adopt advance aggregate agree align alphabetize alter analyse analyze annotate
answer append apply appraise approximate argue arrange articulate ask assemble assess assign assist assume
automate back bake balance begin believe book brainstorm break bring build buy calculate capitalise capitalize
categorise categorize change characterize check choose circle cite clarify classify clean click coach code
collaborate collect colorize combine come comment communicate compare compile complete compose compress compute
conclude condense conduct configure conjugate connect consider consolidate construct continue contrast convert
convey convince cook copy correct count craft create critique crop cross curate customize cut debate debug
decide decipher declare decode decompose deduce deduct define delete demonstrate derive describe design
designate detail detect determine develop devise diagnose differentiate discern disconnect discover discuss
display distinguish divide do document double draft draw duplicate edit educate elaborate eliminate embed
emphasize encode encourage enhance enter entitle enumerate equate escalate establish estimate evaluate examine
exchange execute expand explain explicate explore express extend extract extrapolate factor fetch figure fill
filter find finish fit fix flag follow forecast form formalize format formulate frame gather gauge generate get
give go grade greet group guess guide help highlight hold host hypothesize identify illustrate imagine implement
improve include incorporate increase increment indicate infer initialize input insert interpret interview
introduce invent investigate invite invoke italicize itemize join judge jumble justify keep label lay lead learn
let let's link list listen localize locate look make manipulate map mark match measure meet memorize mention
merge mimic mix model modify move multiply name narrate negotiate normalize note notice obtain offer omit open
operate optimize order organise organize outline output paint paraphrase parse participate partition pass paste
perform personalize pick pitch place plan play plot point pose post postulate practice predict preface prepare
present pretend price print prioritize process produce program promote proofread propose prove provide prune
pull punch punctuate put query quote raise rank rate read rearrange reason recall recast recategorize recite
recognize recommend reconstruct record recount recreate redact redesign reduce refactor refer reflect reformat
reformulate reframe refute regroup regulate reimagine relabel relate release remember remind remove rename
render renew reorder reorganise reorganize repeat rephrase replace replay reply report represent request
research reshape resolve respond restate restore restrict restructure retell retrieve return revamp reveal
reverse review revise revisit reword rework rewrite rhyme rotate run save say scale scan schedule score scramble
script search seek segment select sell send separate sequence serve set shape share shine shorten show shuffle
simplify simulate sing sketch solve sort speak specify speculate spell spend spin split spot standardize state
stop store structure submit substitute subtract suggest sum summarise summarize supply suppose suppress swap
switch synchronize synonymise synonymize synthesize tabulate tackle tag tailor take talk teach tell test think
tidy title trace track train transcribe transfer transform translate transport transpose troubleshoot try tune
turn tweak tweet type underline unpack unscramble update upload use utilize validate vary verify visit visualize
vote weigh word work wrap write
"""))
AUXILIARIES = frozenset(_words("""
is are was were do does did can could should would will has have may might shall
"""))
QUESTION_WORDS = frozenset(_words("""
what whats how why who whom whose which where when
"""))
_AFTER_QUESTION_WORD = AUXILIARIES | frozenset(_words("many much long far often old of one type types kind kinds"))
# Words that may stand before a clause's verb: "please explain", "you need to write", "then briefly list".
_LEADS = frozenset(_words("""
please now then also first next finally just kindly you could would will must should need me us
"""))
# An answer, not a task: "No, the sentence does not contain a clause ...", "Yes. It does." (none of Alpaca's 52,002).
_ANSWER = re.compile(r"(?:yes|no)\b\s*[,.!]")
_WORD = re.compile(r"[a-z]+(?:'[a-z]+)?")
_CLAUSE = re.compile(r"[,;:.!\n()]|\bthen\b")
# "you need to write", "I want you to list": a request put as a sentence ("The aim is to compare" is not one).
# "you need to write", "I want you to list", "your task is to summarise"; not "I'm going to make a cake" (a
# 135M teacher's statement that passed when "I" and "we" counted as the one asked).
# "you're able to perform" and "you've got to" say what someone is, not what to do (SmolLM2's statements passed).
_ASKED = re.compile(r"\b(?:you(?!['\u2019](?:re|ve)\b)|your (?:task|job|goal))\b[^.,;:!?]{0,40}?\bto\s+([a-z]+)")
# A task about the task, with nothing to do: "What is the task?", "What is the output of this example?" (a weak
# teacher asks its prompt back). A text made of these words only, with no number, is no task. "Answer" is not
# one of them: "Answer the given questions" is a task whose questions come in the input (Alpaca has it).
_META = frozenset(_words("""
task tasks instruction instructions question questions prompt prompts example examples input inputs output outputs
response this that these the a an of for to given following above below is are what whats it its
your my here please now
"""))
_PREFIXED = re.compile(r"\b(re|de|co|pre)-(?=[a-z])")  # re-write -> rewrite


def looks_like_task(text: str) -> bool:
    """Whether `text` reads as a task (a request or a question), as the module docstring says."""
    low = _PREFIXED.sub(r"\1", text.strip().lower())
    if _ANSWER.match(low):
        return False
    words = _WORD.findall(low)
    if words and all(w in _META for w in words) and not re.search(r"\d", low):
        return False
    if "?" in low:
        return True
    if not words:
        return False
    first = words[0]
    if first in AUXILIARIES or first == "given":
        return True
    if first in QUESTION_WORDS and len(words) > 1 and words[1] in _AFTER_QUESTION_WORD:
        return True
    if any(m.group(1) in TASK_VERBS for m in _ASKED.finditer(low)):
        return True
    for clause in _CLAUSE.split(low):
        ws = _WORD.findall(clause)
        i = 0
        while i < len(ws) and ws[i] not in TASK_VERBS and (ws[i] in _LEADS or ws[i].endswith("ly")):
            i += 1  # leading words and adverbs: "please", "briefly", "correctly"
        if i < len(ws) and ws[i] in TASK_VERBS:
            return True
    return False
