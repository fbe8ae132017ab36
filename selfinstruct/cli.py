"""Command line: parses arguments and dispatches; each command calls one function.

    selfinstruct generate --seeds seeds/ --teacher Qwen/Qwen2.5-1.5B-Instruct --num-instructions 100
    selfinstruct train --data outputs/<run> --student Qwen/Qwen2.5-0.5B

Exit codes: 0 success, 2 bad usage or bad input (the message names file, line and problem),
1 anything else (an unreachable teacher, a teacher that never produces usable output), 130 Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from selfinstruct import __version__
from selfinstruct.config import METHODS, Config
from selfinstruct.configfile import field_help, load_config
from selfinstruct.errors import RunError, UserError, redact
from selfinstruct.rundir import kind_of
from selfinstruct.signals import Terminated, handled

console = Console(stderr=True, soft_wrap=True)


def _flag(p: argparse.ArgumentParser, flag: str, key: str, **kw: Any) -> None:
    p.add_argument(flag, dest=key, default=None, help=field_help(key), **kw)


DESCRIPTION = ("Grow an instruction-tuning dataset from a few seed tasks with a teacher model (Self-Instruct, "
               "Alpaca, Evol-Instruct), check and score every record, LoRA-tune a student on it, and measure "
               "whether each round made the student better.")
EXAMPLES = {
    "generate": "selfinstruct generate --seeds seeds/ --teacher Qwen/Qwen2.5-1.5B-Instruct --num-instructions 100",
    "run": "selfinstruct run --seeds seeds/ --teacher Qwen/Qwen2.5-1.5B-Instruct --student Qwen/Qwen2.5-0.5B "
           "--rounds 2",
    "eval": "selfinstruct eval outputs/20260101-120000-rounds --judge Qwen/Qwen2.5-7B-Instruct",
    "train": "selfinstruct train --data outputs/20260101-120000-self-instruct --student Qwen/Qwen2.5-0.5B",
    "merge": "selfinstruct merge outputs/train/adapter --out merged/",
    "dedup": "selfinstruct dedup alpaca_data.json --out deduped.jsonl --threshold 0.7",
    "show": "selfinstruct show outputs/20260101-120000-self-instruct --rejected --reason copies_demo",
    "export": "selfinstruct export outputs/20260101-120000-self-instruct --format sharegpt",
    "score": "selfinstruct score alpaca_data.json --scorers ifd --model Qwen/Qwen2.5-0.5B --sample 200",
    "stats": "selfinstruct stats outputs/20260101-120000-self-instruct",
    "report": "selfinstruct report outputs/20260101-120000-rounds",
}


def with_examples(sub: Any) -> None:
    """Every subcommand's help ends with a one-line example."""
    for name, p in sub.choices.items():
        p.epilog = f"example: {EXAMPLES[name]}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="selfinstruct", description=DESCRIPTION,
                                     epilog="example: " + EXAMPLES["generate"])
    parser.add_argument("--version", action="version", version=f"selfinstruct {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    config, generation = _parents()
    _generation_commands(sub, config, generation)
    _training_commands(sub, config)
    _data_commands(sub, config)
    with_examples(sub)
    return parser


def _parents() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """The flags every config-reading command shares, and those generate and run share."""
    config = argparse.ArgumentParser(add_help=False)  # every command that reads a config
    config.add_argument("--config", metavar="FILE", help="YAML or TOML config file; flags override it.")
    generation = argparse.ArgumentParser(add_help=False)  # what generate and run share
    _flag(generation, "--seeds", "generate.seeds", metavar="PATH")
    _flag(generation, "--method", "generate.method", choices=METHODS)
    _flag(generation, "--teacher", "teacher.model", metavar="MODEL")
    _flag(generation, "--backend", "teacher.backend", choices=["auto", "vllm", "openai", "transformers"])
    generation.add_argument("--base-url", dest="teacher.server.base_urls", action="append", default=None, metavar="URL",
                            help=field_help("teacher.server.base_urls") + " Repeat for several servers.")
    _flag(generation, "--num-instructions", "generate.num_instructions", type=int, metavar="N")
    _flag(generation, "--seed", "generate.seed", type=int, metavar="S")
    generation.add_argument("--no-cache", dest="no_cache", action="store_true",
                            help="Neither read nor write the response cache (teacher.cache).")
    _flag(generation, "--judge", "eval.judge", metavar="MODEL")
    _quality_flags(generation)
    return config, generation


def _generation_commands(sub: Any, config: argparse.ArgumentParser, generation: argparse.ArgumentParser) -> None:
    g = sub.add_parser("generate", parents=[generation, config],
                       help="Grow an instruction dataset from seed tasks with a teacher model.")
    _flag(g, "--prompt-format", "teacher.prompt_format", choices=["auto", "chat", "completion"])
    g.add_argument("--launch", dest="teacher.server.launch", action="store_true", default=None,
                   help=field_help("teacher.server.launch"))
    _flag(g, "--out", "generate.out", metavar="DIR")
    g.add_argument("--resume", dest="generate.resume", action="store_true", default=None,
                   help=field_help("generate.resume"))
    g.set_defaults(func=cmd_generate)

    r = sub.add_parser("run", parents=[generation, config],
                       help="Rounds of generate -> train -> evaluate; re-run the same command to resume.")
    _flag(r, "--rounds", "rounds.rounds", type=int, metavar="N")
    _flag(r, "--student", "train.student", metavar="MODEL")
    _flag(r, "--generator", "rounds.generator", choices=["teacher", "student"])
    _flag(r, "--train-from", "rounds.train_from", choices=["base", "previous"])
    _flag(r, "--heldout", "eval.heldout", metavar="PATH")
    _flag(r, "--out", "rounds.out", metavar="DIR")
    r.set_defaults(func=cmd_run)

    e = sub.add_parser("eval", parents=[config],
                       help="Evaluate a run's students on held-out instructions (judge, win rate, loss).")
    e.add_argument("run", metavar="RUN_DIR", help="A `selfinstruct run` directory.")
    _flag(e, "--heldout", "eval.heldout", metavar="PATH")
    _flag(e, "--judge", "eval.judge", metavar="MODEL")
    e.set_defaults(func=cmd_eval)


def _training_commands(sub: Any, config: argparse.ArgumentParser) -> None:
    t = sub.add_parser("train", parents=[config], help="LoRA-tune a student on generated (or any supported) data.")
    _flag(t, "--data", "train.data", metavar="PATH")
    _flag(t, "--student", "train.student", metavar="MODEL")
    _flag(t, "--out", "train.out", metavar="DIR")
    t.add_argument("--resume", dest="train.resume", action="store_true", default=None,
                   help=field_help("train.resume"))
    t.add_argument("--preview", type=int, metavar="N", default=None,
                   help="Show N tokenised examples with trained tokens marked, and do not train.")
    t.add_argument("--json", action="store_true", help="With --preview: print JSON instead of colours.")
    t.add_argument("--merge", dest="train.merge", action="store_true", default=None, help=field_help("train.merge"))
    t.set_defaults(func=cmd_train)

    m = sub.add_parser("merge", help="Merge a LoRA adapter into its base model (a full model to serve).")
    m.add_argument("adapter", metavar="ADAPTER_DIR")
    m.add_argument("--out", required=True, metavar="DIR")
    m.add_argument("--base", metavar="MODEL", help="Base model (default: the one named in adapter_config.json).")
    m.set_defaults(func=cmd_merge)

    d = sub.add_parser("dedup", help="Remove near-duplicate records from a data file (greedy, input order).")
    d.add_argument("input", metavar="IN", help="A data file (Alpaca, Self-Instruct, chat) or a generate run.")
    d.add_argument("--out", required=True, metavar="OUT", help="Where the kept records go (JSONL).")
    d.add_argument("--method", choices=["rouge", "exact", "minhash"], default="rouge",
                   help="rouge: ROUGE-L F1 as rouge_score computes it (Latin script only); exact: normalised "
                        "text; minhash: Jaccard of character 5-grams via MinHash LSH (any language).")
    d.add_argument("--threshold", type=float, default=0.7, help="Drop at or above this similarity.")
    d.set_defaults(func=cmd_dedup)


def _data_commands(sub: Any, config: argparse.ArgumentParser) -> None:
    sh = sub.add_parser("show", help="Pretty-print a generate run's records (or rejected candidates).")
    sh.add_argument("run", metavar="RUN_DIR")
    sh.add_argument("--n", type=int, default=5, metavar="K", help="How many to show (default 5).")
    sh.add_argument("--rejected", action="store_true", help="Show rejected candidates instead.")
    sh.add_argument("--reason", metavar="R", help="Only rejections with this reason (implies --rejected).")
    sh.set_defaults(func=cmd_show)

    x = sub.add_parser("export", help="Export a generate run's records (to <run>/export/), or push to the hub.")
    x.add_argument("run", metavar="RUN_DIR")
    x.add_argument("--format", choices=["alpaca", "chat", "sharegpt", "parquet"], default="alpaca")
    x.add_argument("--name", metavar="NAME", help="File name without extension (default: the format).")
    x.add_argument("--push-to-hub", metavar="REPO_ID", help="Also upload dataset/ and its card as a hub dataset.")
    x.add_argument("--public", action="store_true", help="With --push-to-hub: a public repo (default private).")
    x.set_defaults(func=cmd_export)

    sc = sub.add_parser("score", parents=[config], help="Quality scores, selection and decontamination of any "
                        "data (a run, Alpaca JSON, chat JSONL), and the Self-Instruct audit.")
    sc.add_argument("data", metavar="DATA", help="A generate run directory or a data file (anything train reads).")
    _quality_flags(sc)
    _flag(sc, "--model", "quality.ifd_model", metavar="MODEL")
    _flag(sc, "--judge", "eval.judge", metavar="MODEL")
    _flag(sc, "--backend", "teacher.backend", choices=["auto", "vllm", "openai", "transformers"])
    sc.add_argument("--base-url", dest="teacher.server.base_urls", action="append", default=None, metavar="URL",
                    help="The judge's OpenAI-compatible server(s).")
    sc.add_argument("--out", metavar="DIR", help="Where scored.jsonl, selected.jsonl and summary.json go (default "
                    "RUN/score for a run, else outputs/<date>-<time>-score).")
    sc.add_argument("--sample", type=int, metavar="N", help="Score a seeded random sample of N records (an audit).")
    _flag(sc, "--seed", "generate.seed", type=int, metavar="S")
    sc.add_argument("--no-cache", dest="no_cache", action="store_true",
                    help="Neither read nor write the response cache (teacher.cache).")
    sc.set_defaults(func=cmd_score)

    rp = sub.add_parser("report", help="Write RUN/report.html: one self-contained page to browse a generate run or "
                        "a `selfinstruct run` (counts, rejections with examples, records, scores, plots).")
    rp.add_argument("run", metavar="RUN_DIR")
    rp.set_defaults(func=cmd_report)

    st = sub.add_parser("stats", help="Print a generate run's counts and diversity statistics.")
    st.add_argument("run", metavar="RUN_DIR")
    st.set_defaults(func=cmd_stats)


def _scorers(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in ("ifd", "judge")]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown scorer {bad[0]!r} (choose from ifd, judge; comma-separated)")
    return names


def _quality_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scorers", dest="quality.scorers", type=_scorers, default=None, metavar="ifd[,judge]",
                   help=field_help("quality.scorers"))
    p.add_argument("--decontaminate", dest="quality.decontaminate", nargs="+", default=None, metavar="FILE",
                   help=field_help("quality.decontaminate"))


def _config(args: argparse.Namespace, resume_dir: str | None) -> Config:
    overrides = {k: v for k, v in vars(args).items() if "." in k and v is not None}
    if getattr(args, "no_cache", False):
        overrides["teacher.cache"] = None
    under = None  # a resumed run of ours keeps the settings it started with; --config and flags go on top
    if resume_dir and kind_of(Path(resume_dir)) and (Path(resume_dir) / "config.yaml").exists():
        under = Path(resume_dir) / "config.yaml"
    return load_config(args.config, overrides, under=under)


def cmd_generate(args: argparse.Namespace) -> int:
    from selfinstruct.generate.loop import run_generate

    out = getattr(args, "generate.out")
    if getattr(args, "generate.resume") and out is None:
        raise UserError("--resume needs --out DIR, the run to continue")
    cfg = _config(args, out if getattr(args, "generate.resume") else None)
    out = run_generate(cfg)
    console.print(f"[green]done:[/] {out}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from selfinstruct.rounds import run_rounds

    out = run_rounds(_config(args, getattr(args, "rounds.out")))  # an existing run continues with its config
    console.print(f"[green]done:[/] {out}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from selfinstruct.rounds import evaluate_run

    if not (Path(args.run) / "config.yaml").exists():
        raise UserError("not a `selfinstruct run` directory (no config.yaml)", args.run)
    evaluate_run(_config(args, args.run), Path(args.run))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    cfg = _config(args, None)
    if args.preview is not None:
        from selfinstruct.preview import preview

        return preview(cfg, args.preview, args.json)
    from selfinstruct.train import run_train

    out = run_train(cfg)
    console.print(f"[green]done:[/] {out}")
    return 0


def cmd_dedup(args: argparse.Namespace) -> int:
    from selfinstruct.dedup_cli import run_dedup

    run_dedup(args.input, args.out, args.method, args.threshold)
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from selfinstruct.merge import merge_adapter

    merge_adapter(args.adapter, args.out, args.base)
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from selfinstruct.publish import show_run

    if args.n < 1:
        raise UserError("--n must be >= 1")
    show_run(args.run, args.n, args.rejected, args.reason)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from selfinstruct.publish import export_run, push_to_hub

    path = export_run(args.run, args.format, args.name)
    console.print(f"[green]wrote[/] {path}")
    if args.push_to_hub:
        push_to_hub(args.run, args.push_to_hub, private=not args.public)
        console.print(f"[green]pushed[/] to https://huggingface.co/datasets/{args.push_to_hub}")
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from selfinstruct.score import score_data

    cfg = _config(args, args.data)  # a run's own teacher, student and quality settings, unless flags say otherwise
    if args.sample is not None and args.sample < 1:
        raise UserError("--sample must be >= 1")
    scorers = getattr(args, "quality.scorers")
    out = score_data(cfg, args.data, scorers if scorers is not None else ["ifd"], args.out, args.sample)
    console.print(f"[green]wrote[/] {out / 'scored.jsonl'}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from selfinstruct.htmlreport import write_html_report

    run = Path(args.run)
    if not run.is_dir():
        raise UserError("no such run directory", run)
    print(write_html_report(run))
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    from selfinstruct.stats import show_stats

    show_stats(args.run)
    return 0


def internal_error(e: Exception) -> int:
    """An unexpected failure (a bug): what failed, the run directory, how to report it; exit 1."""
    from selfinstruct.rundir import TAKEN

    where = f" Everything accepted before it is on disk in {TAKEN[-1]}; the same command with --resume " \
            "continues." if TAKEN else ""
    console.print(f"[bold red]internal error:[/] {type(e).__name__}: {escape(redact(str(e))[:500])}.{escape(where)} "
                  "This is a bug in selfinstruct: please report it with the traceback, which "
                  "SELFINSTRUCT_TRACEBACK=1 prints.", highlight=False, soft_wrap=True)
    if os.environ.get("SELFINSTRUCT_TRACEBACK"):
        import traceback

        traceback.print_exception(e)
    return 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with handled():
            return args.func(args)
    except UserError as e:
        console.print(f"[bold red]error:[/] {escape(redact(str(e)))}", highlight=False, soft_wrap=True)
        return 2
    except RunError as e:  # StalledError among them
        console.print(f"[bold red]error:[/] {escape(redact(str(e)))}", highlight=False, soft_wrap=True)
        return 1
    except KeyboardInterrupt as e:
        console.print("[yellow]interrupted.[/] Everything accepted so far is on disk; run the same command "
                      "with --resume to continue.")
        return e.args[0] if isinstance(e, Terminated) else 130
    except Exception as e:  # noqa: BLE001 - the last resort: a short message, never a traceback
        return internal_error(e)
    finally:
        if "vllm" in sys.modules:  # end the engine's worker processes with the run, whatever ended it
            from selfinstruct.generators.vllm import shutdown_engines

            shutdown_engines()


if __name__ == "__main__":
    sys.exit(main())
