"""`posttrain …`: one sub-command per verb. Errors meant for users print as sentences (exit 1 for bad data or
models, 2 for a bad recipe or bad arguments, 75 for a training stage stopped by SIGTERM after saving a checkpoint:
rerun the same command to resume); everything else is a bug and keeps its traceback."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from posttrain.chat import ChatFormatError
from posttrain.config import ConfigError
from posttrain.data.formats import DataError
from posttrain.errors import STOPPED_EXIT, StageError, Stopped


def _cmd_render(args: argparse.Namespace) -> int:
    from posttrain.chat import render
    from posttrain.config import ModelSpec
    from posttrain.data.jsonl import read_jsonl
    from posttrain.modeling import load_tokenizer

    tokenizer = load_tokenizer(ModelSpec(name_or_path=args.tokenizer, tokenizer=args.tokenizer))
    source = args.input or "<stdin>"
    lines = Path(args.input).read_text().splitlines() if args.input else sys.stdin.read().splitlines()
    errors, out = [], []
    for where, row in read_jsonl(lines, source, errors):
        messages = row.get("messages") if isinstance(row, dict) else row
        try:
            r = render(
                messages, tokenizer, add_generation_prompt=args.generation_prompt, system=args.system,
                train_on=args.train_on, where=where,
            )  # fmt: skip
        except ChatFormatError as e:
            errors.append(str(e))
            continue
        out.append(_pretty(r, tokenizer) if args.pretty else json.dumps(r.as_dict(), ensure_ascii=False))
    if errors:
        print("\n".join(errors), file=sys.stderr)
        print(f"{len(errors)} conversation(s) could not be rendered; nothing was printed", file=sys.stderr)
        return 1
    print("\n".join(out))
    return 0


def _pretty(r, tokenizer) -> str:
    """The rendered text with trained tokens shown as [[…]] (or green on a terminal)."""
    on, off = ("\033[32m", "\033[0m") if sys.stdout.isatty() else ("[[", "]]")
    pieces, prev = [], 0
    for tid, m in zip(r.input_ids, r.loss_mask):
        if m != prev:
            pieces.append(on if m else off)
            prev = m
        pieces.append(tokenizer.decode([tid], skip_special_tokens=False))
    if prev:
        pieces.append(off)
    n = len(r.input_ids)
    return "".join(pieces) + f"--- {n} tokens, {r.n_trained} trained ({r.n_trained / max(n, 1):.0%})\n"


def _cmd_check(args: argparse.Namespace) -> int:
    from posttrain.config import dump_yaml, load_recipe_located
    from posttrain.preflight import preflight, raise_if

    recipe, where = load_recipe_located(args.recipe, args.set)
    print(f"# {args.recipe}: valid; resolved recipe:")
    print(dump_yaml(recipe), end="")
    pf = preflight(recipe, where, args.recipe, recipe.stages())  # every stage's inputs, models and disk
    print("# preflight of every stage:" + "".join(f"\n#   {n}" for n in pf.notes or ["nothing to read"]))
    raise_if(pf)
    return 0


def _cmd_stage(args: argparse.Namespace) -> int:
    from posttrain.config import load_recipe
    from posttrain.runner import run_stage

    out = run_stage(args.name, load_recipe(args.recipe, args.set))
    print(f"[{args.name}] done: {out}")
    return 0


def _run_options(args: argparse.Namespace):
    from posttrain.runner import RunOptions

    return RunOptions(recipe_path=args.recipe, sets=tuple(args.set), only=_stages(args.only),
                      from_=getattr(args, "from_", None), force=getattr(args, "force", False), dry_run=args.dry_run,
                      reuse=tuple(args.reuse or ()))  # fmt: skip


def _stages(text: str | None) -> tuple[str, ...]:
    return tuple(s.strip() for s in (text or "").split(",") if s.strip())


def _cmd_run(args: argparse.Namespace) -> int:
    from posttrain.runner import run

    return run(_run_options(args))


def _cmd_sweep(args: argparse.Namespace) -> int:
    from posttrain.runner import sweep

    return sweep(_run_options(args), args.grid, args.seeds, _stages(args.seed_stages))


def _cmd_eval(args: argparse.Namespace) -> int:
    from posttrain.engines.evaluation import report_markdown
    from posttrain.runner import evaluate_one

    print(report_markdown(evaluate_one(args.recipe, args.set, Path(args.model))))
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    from posttrain.config import load_recipe
    from posttrain.plan import GiB, plan, render

    recipe = load_recipe(args.recipe, args.set)
    memory = args.gpu_memory * GiB
    text, misfits = render(recipe, plan(recipe, args.gpus, memory, args.device), args.gpus, memory)
    print(text)
    for m in misfits:
        print(f"posttrain plan: {m}", file=sys.stderr)
    return 1 if misfits else 0


def _cmd_headroom(args: argparse.Namespace) -> int:
    from posttrain.config import load_recipe
    from posttrain.headroom import markdown, run

    recipe = load_recipe(args.recipe, args.set)
    problems = [f"--{k.replace('_', '-')} {v} must be at least 1" for k, v in
                (("k", args.k), ("per_task", args.per_task)) if v < 1]  # fmt: skip
    if args.temperature <= 0:
        problems.append(f"--temperature {args.temperature:g} must be positive (samples, not greedy answers)")
    if recipe.data.source != "world":
        problems.append(f"{args.recipe}: data.source is {recipe.data.source!r}; headroom measures the built-in "
                        "world's families (data.source: world)")  # fmt: skip
    if not (Path(args.model) / "config.json").exists():
        problems.append(f"{args.model}: not a saved model folder (no config.json)")
    if problems:
        raise ConfigError(problems)
    result = run(recipe, args.model, args.per_task, args.k, args.temperature, args.seed)
    print(markdown(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
        print(f"headroom: {args.out}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from posttrain.report import write_report

    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        print(f"posttrain report: {run_dir} is not a run folder (runs/<recipe name>/)", file=sys.stderr)
        return 2
    path = write_report(run_dir)
    print(path.read_text())
    print(f"report: {path} and {path.with_suffix('.html')}")
    return 0


def _validated_rows(args: argparse.Namespace) -> tuple[list, list[str]]:
    """The rows of `args.file` (a JSONL file, or with `--split` a dataset's split) and every bad row's reason."""
    from posttrain.data.formats import validate_lines
    from posttrain.data.sources import hf_rows

    if args.split:
        return hf_rows(args.file, args.split, args.format, args.system, args.rows)
    try:
        with open(args.file, encoding="utf-8") as f:
            return validate_lines(f, args.file, args.format, args.system)
    except UnicodeDecodeError as e:
        return [], [f"{args.file}: not UTF-8 text ({e.reason} at byte {e.start})"]
    except OSError as e:
        return [], [f"{args.file}: cannot read it ({e.strerror}); with --split it names a dataset"]


def _cmd_validate(args: argparse.Namespace) -> int:
    rows, errors = _validated_rows(args)
    if args.tokenizer and rows:
        from posttrain.chat import ChatFormatError
        from posttrain.config import ChatConfig, ModelSpec
        from posttrain.data.formats import length_check
        from posttrain.modeling import load_tokenizer

        tok = load_tokenizer(ModelSpec(name_or_path=args.tokenizer, tokenizer=args.tokenizer))
        chat = ChatConfig(system=args.system, max_length=args.max_length)
        try:
            _, dropped, truncated = length_check(rows, args.format, tok, chat)
        except ChatFormatError as e:
            errors.append(str(e))
            dropped, truncated = {}, 0
        for reason, ids in dropped.items():
            errors += [f"{i}: {reason.replace('_', ' ')} (max_length {args.max_length})" for i in ids]
        if truncated:
            print(
                f"{args.file}: {truncated} row(s) will have their prompt cut from the left", file=sys.stderr
            )
    if errors:
        print("\n".join(errors))
        print(f"{args.file}: {len(errors)} bad row(s)", file=sys.stderr)
        return 1
    print(f"{args.file}: {len(rows)} rows, all valid ({args.format})")
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    from posttrain.merging import MergeError, merge_models

    try:
        out = merge_models(args.models, args.out, args.method, args.weights, args.base, args.eta)
    except MergeError as e:
        print(f"posttrain merge: {e}", file=sys.stderr)
        return 1
    print(f"merged {len(args.models)} models ({args.method}) into {out}")
    return 0


def _cmd_push(args: argparse.Namespace) -> int:
    from posttrain.hub import push

    url = push(Path(args.stage), args.repo_id, args.private)
    print(f"pushed {args.stage} (its model/ folder, card included) to {args.repo_id}: {url}")
    return 0


def _choices(cls: type, key: str) -> list[str]:
    """The values a `Literal[...]` field of a config section admits."""
    import typing

    return list(typing.get_args(typing.get_type_hints(cls)[key]))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="posttrain", description="Gemma-2-style post-training pipeline.")
    sub = p.add_subparsers(dest="command", required=True)
    _recipe_verbs(sub)
    _data_verbs(sub)
    _model_verbs(sub)
    return p


def _data_verbs(sub) -> None:
    """render, validate: what a data file becomes, and what is wrong with it."""
    from posttrain.config import ChatConfig
    from posttrain.data.formats import FORMATS

    chat = ChatConfig()  # the recipe's defaults, here as on every path
    r = sub.add_parser("render", help="conversations (JSONL) → text, input_ids, loss_mask per line")
    r.add_argument("--tokenizer", required=True, help="'tiny' (built-in), a tokenizer folder or a hub id")
    r.add_argument("--input", help="JSONL file, one {'messages': [...]} per line (default: stdin)")
    r.add_argument("--generation-prompt", action="store_true", help="end with '<start_of_turn>model\\n'")
    r.add_argument("--system", choices=_choices(ChatConfig, "system"), default=chat.system,
                   help="system-message policy")  # fmt: skip
    r.add_argument("--train-on", choices=_choices(ChatConfig, "train_on"), default=chat.train_on,
                   help="which model turns are trained")  # fmt: skip
    r.add_argument("--pretty", action="store_true", help="show the text with trained tokens marked [[…]]")
    r.set_defaults(func=_cmd_render)

    v = sub.add_parser(
        "validate", help="check a data file or dataset split; every bad row as file:line: reason"
    )
    v.add_argument(
        "file", help="a JSONL file, or with --split a Hugging Face dataset (hub id or local folder)"
    )
    v.add_argument("--format", choices=list(FORMATS), default="conversations",
                   help="ours or TRL's standard formats (data/README.md)")  # fmt: skip
    v.add_argument("--split", help="FILE is a dataset: check this split (rows named dataset:split:row)")
    v.add_argument("--rows", type=int, help="with --split: only the first ROWS rows (streamed)")
    v.add_argument("--system", choices=_choices(ChatConfig, "system"), default=chat.system)
    v.add_argument(
        "--tokenizer", help="also check lengths after rendering with this tokenizer ('tiny', folder, id)"
    )
    v.add_argument("--max-length", type=int, default=chat.max_length)
    v.set_defaults(func=_cmd_validate)


def _recipe_verbs(sub) -> None:
    """check, stage, run, sweep: a recipe checked, one of its stages, all of them, a grid of them."""
    from posttrain.registry import NAMES

    c = sub.add_parser("check", help="validate a recipe and print it resolved (extends and --set applied)")
    c.add_argument("recipe")
    c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a key")
    c.set_defaults(func=_cmd_check)

    s = sub.add_parser("stage", help="run one stage of a recipe in this process")
    s.add_argument("name", help=f"stage: {', '.join(NAMES)}")
    s.add_argument("recipe")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    s.set_defaults(func=_cmd_stage)

    r = sub.add_parser("run", help="run a recipe's stages in order, skipping those already done")
    r.add_argument("recipe")
    r.add_argument("--only", help="comma-separated stages to run (with the parents they need)")
    r.add_argument("--from", dest="from_", metavar="STAGE", help="rerun this stage and every later one")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    r.add_argument(
        "--force", action="store_true", help="rerun stages that are done (those in --only, or all)"
    )
    r.add_argument("--dry-run", action="store_true", help="print what would run and what would be skipped")
    r.add_argument(
        "--reuse", metavar="RUN_DIR", action="append",
        help="take finished stages with the same config and parents from another run folder (e.g. runs/tiny); "
             "repeatable",
    )  # fmt: skip
    r.set_defaults(func=_cmd_run)

    w = sub.add_parser("sweep", help="run a recipe for every point of a grid of keys (× seeds), one table")
    w.add_argument("recipe")
    w.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                   help="a key and its values; repeat for a product grid")  # fmt: skip
    w.add_argument("--seeds", type=int, default=1,
                   help="seeds per grid point (seed, seed+1, …): the recipe's seed, which reruns every stage, or "
                        "with --seed-stages only those stages' seeds")  # fmt: skip
    w.add_argument("--seed-stages", metavar="STAGES",
                   help="comma-separated stages whose seed --seeds varies (`seeds.<stage>`); the stages before "
                        "them are shared by every seed")  # fmt: skip
    w.add_argument("--only", help="comma-separated stages to run per variant (with the parents they need)")
    w.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a key in every variant"
    )
    w.add_argument("--reuse", metavar="RUN_DIR", action="append",
                   help="also take finished stages from this run folder (the base recipe's is always used)")  # fmt: skip
    w.add_argument("--dry-run", action="store_true", help="print what each variant would run")
    w.set_defaults(func=_cmd_sweep)


def _model_verbs(sub) -> None:
    """eval, report, merge, push: saved models measured, a run's report, saved models averaged, a model uploaded."""
    from posttrain.config import MergeConfig

    ev = sub.add_parser(
        "eval", help="evaluate one saved model as the eval stage does (world, RM, KL, probes)"
    )
    ev.add_argument("model")
    ev.add_argument("--recipe", required=True)
    ev.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ev.set_defaults(func=_cmd_eval)
    pl = sub.add_parser(
        "plan", help="memory per GPU and disk of every stage, from the models' configs (nothing loads)"
    )
    pl.add_argument("recipe")
    pl.add_argument("--gpus", type=int, default=8, help="GPUs per machine (default 8)")
    pl.add_argument("--gpu-memory", type=float, default=80.0, metavar="GB", help="memory of one GPU in GiB")
    pl.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: plan a run on this CPU")
    pl.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    pl.set_defaults(func=_cmd_plan)
    hr = sub.add_parser(
        "headroom", help="per task family: greedy, pass@k, p(right | greedy wrong) — what RL could move"
    )
    hr.add_argument("model", help="a saved model folder")
    hr.add_argument("--recipe", required=True, help="the recipe whose world (and chat, eval settings) to use")
    hr.add_argument("--per-task", type=int, default=100, help="held-out prompts per family (default 100)")
    hr.add_argument("--k", type=int, default=16, help="samples per prompt (default 16)")
    hr.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    hr.add_argument("--seed", type=int, default=0, help="draws the prompts (a fresh split) and the samples")
    hr.add_argument("--out", help="also write the figures as JSON here")
    hr.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    hr.set_defaults(func=_cmd_headroom)
    rp = sub.add_parser("report", help="write RUN_DIR/report.md and report.html from a run's stage folders")
    rp.add_argument("run_dir")
    rp.set_defaults(func=_cmd_report)
    m = sub.add_parser("merge", help="average saved models: linear, slerp (task vectors), liti (WARP)")
    m.add_argument("--method", choices=["linear", "slerp", "liti"], default="linear")
    m.add_argument("--models", nargs="+", required=True, help="model folders (safetensors)")
    m.add_argument("--weights", nargs="+", type=float, help="linear only: one weight per model")
    m.add_argument("--base", help="the shared initialisation (slerp, liti)")
    m.add_argument(
        "--eta",
        type=float,
        default=MergeConfig().eta,
        help="liti: interpolation from the base (0) to the merge (1)",
    )
    m.add_argument("--out", required=True)
    m.set_defaults(func=_cmd_merge)
    pu = sub.add_parser(
        "push", help="upload a finished stage's exported model (model/ only, card included) to the hub"
    )
    pu.add_argument(
        "stage", metavar="RUN/STAGE", help="e.g. runs/tiny/merge, or runs/tiny/rlhf/kl0.02 for an RL run"
    )
    pu.add_argument("--repo-id", required=True, help="the hub repo, owner/name (created when missing)")
    pu.add_argument("--private", action="store_true", help="create the repo private")
    pu.set_defaults(func=_cmd_push)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"posttrain: {e}", file=sys.stderr)
        return 2
    except Stopped as e:
        print(f"posttrain: {e}", file=sys.stderr)
        return STOPPED_EXIT
    except (ChatFormatError, DataError, StageError, FileNotFoundError) as e:
        print(f"posttrain: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
