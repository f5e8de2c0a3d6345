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
    from posttrain.config import dump_yaml, load_recipe

    recipe = load_recipe(args.recipe, args.set)
    print(f"# {args.recipe}: valid; resolved recipe:")
    print(dump_yaml(recipe), end="")
    return 0


def _cmd_stage(args: argparse.Namespace) -> int:
    import signal

    from posttrain.config import load_recipe
    from posttrain.dist import check_process_count
    from posttrain.runner import stage_module
    from posttrain.training import tracking_env

    # `posttrain run` starts jobs ignoring SIGTERM; a stage dies on it until its training loop catches it
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    recipe = load_recipe(args.recipe, args.set)
    check_process_count(args.name)
    tracking_env(recipe.tracking, recipe.name, args.name, recipe.run_dir)
    out = stage_module(args.name).main(recipe)
    print(f"[{args.name}] done: {out}")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    """Run the recipe's stages in order, each in its own process; skip those done with the same config."""
    from posttrain import runner
    from posttrain.config import load_recipe
    from posttrain.outputs import check_exported, read_done

    recipe = load_recipe(args.recipe, args.set)
    stages = runner.plan(recipe)
    only = args.only.split(",") if args.only else []
    for name in only + ([args.from_] if args.from_ else []):
        if name not in stages:
            runner.stage_module(name)  # unknown stage: a clear error
            raise ConfigError([f"stage {name!r} is not in recipe {recipe.name}'s plan ({', '.join(stages)})"])
    if only:
        stages = runner.with_parents(recipe, only)
    forced = set(stages[stages.index(args.from_) :]) if args.from_ else set()
    if args.force:
        forced |= set(only or stages)
    for name in stages:
        folder = recipe.run_dir / name
        done = read_done(folder)
        want = runner.expected_hash(recipe, name)
        for source in args.reuse or []:  # the first run folder holding this stage with the same hash
            if name in forced or (done and done.get("config_hash") == want):
                break
            done = _reuse(Path(source) / name, folder, want, args.dry_run) or done
        cmd = runner.launch_command(recipe, name, args.recipe, args.set)
        if done and done.get("config_hash") == want and name not in forced:
            print(f"[run] skip {name}: {folder} is done with the same config and parents ({want})")
            continue
        failed = _failed_gate(folder, want)
        if failed and name not in forced:  # the same config fails the same way: do not retrain it
            print(f"[run] {name}: failed its quality gate with this config earlier ({failed}); `--force` reruns it",
                  file=sys.stderr)  # fmt: skip
            if args.dry_run:
                continue
            _print_reports(recipe.run_dir, stages)
            print(
                f"[run] stage {name} failed its quality gate; later stages were not started", file=sys.stderr
            )
            return 1
        why = "forced" if name in forced else ("config or parents changed" if done else "not done yet")
        print(f"[run] {name} ({why}): {' '.join(cmd)}", flush=True)
        if args.dry_run:
            continue
        rc, terminated = _run_stage_process(cmd)
        if rc != 0:
            _print_reports(recipe.run_dir, stages)
            if terminated:  # through `accelerate launch` the stage's own exit code (75) is not seen here
                print(f"[run] stage {name} stopped on SIGTERM (a training stage saves a checkpoint first); rerun "
                      "the same command to resume it", file=sys.stderr)  # fmt: skip
                return STOPPED_EXIT
            gate = _failed_gate(folder, want)
            why = f"failed its quality gate — {gate}" if gate else f"failed (exit {rc})"
            print(f"[run] stage {name} {why}; later stages were not started", file=sys.stderr)
            return rc
        problems, tensors = check_exported(folder)
        if problems:
            print(f"[run] stage {name} exported a broken model; later stages were not started:\n  "
                  + "\n  ".join(problems[:10]), file=sys.stderr)  # fmt: skip
            return 1
        if tensors:
            print(f"[run] {name}: exported models read back complete ({tensors} tensors, none empty)")
    if not args.dry_run:
        _print_reports(recipe.run_dir, stages)
        print(f"[run] outputs of recipe {recipe.name}: {recipe.run_dir}/")
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    """Run a recipe once per point of a grid (× seeds), sharing finished stages between the variants, and write
    one comparison table."""
    import itertools

    from posttrain import runner
    from posttrain.config import load_recipe
    from posttrain.report import sweep_table

    base = load_recipe(args.recipe, args.set)
    grid: list[tuple[str, list[str]]] = []
    problems = []
    for item in args.grid:
        key, sep, values = item.partition("=")
        vals = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not key.strip() or not vals:
            problems.append(f"--grid {item!r}: expected KEY=V1,V2,… (e.g. rlhf.kl_coef=0.01,0.05)")
        else:
            grid.append((key.strip(), vals))
    if args.seeds < 1:
        problems.append(f"--seeds {args.seeds}: expected 1 or more")
    seed_stages = [s.strip() for s in (args.seed_stages or "").split(",") if s.strip()]
    problems += [f"--seed-stages: no stage {s!r}; stages are {', '.join(runner.STAGES)}"
                 for s in seed_stages if s not in runner.STAGES]  # fmt: skip
    if problems:
        raise ConfigError(problems)
    variants: list[tuple[dict[str, str], list[str]]] = []
    for combo in itertools.product(*(vals for _, vals in grid)):
        for i in range(args.seeds):
            labels = {k: v for (k, _), v in zip(grid, combo)}
            sets = [f"{k}={v}" for k, v in labels.items()]
            if args.seeds > 1 and seed_stages:  # only these stages (and those after them) rerun per seed
                labels["seed"] = str(i)
                sets += [f"seeds.{s}={base.seed_for(s) + i}" for s in seed_stages]
            elif args.seeds > 1:
                labels["seed"] = str(base.seed + i)
                sets.append(f"seed={base.seed + i}")
            slug = "-".join(f"{k.split('.')[-1]}{v}" for k, v in labels.items()).replace("/", "_")
            variants.append((labels, [*args.set, *sets, f"name={base.name}-{slug}"]))
    # every variant is checked before any runs
    recipes = [load_recipe(args.recipe, sets) for _, sets in variants]
    stages = runner.plan(base)
    shown = args.only.split(",") if args.only else stages
    print(f"[sweep] {len(variants)} variants of {base.name}: "
          + ", ".join(r.name for r in recipes))  # fmt: skip
    reuse = list(args.reuse or []) + [str(base.run_dir)]
    for (_, sets), recipe in zip(variants, recipes):
        print(f"\n[sweep] {recipe.name}: {' '.join(sets[len(args.set) : -1])}", flush=True)
        run_args = argparse.Namespace(recipe=args.recipe, set=sets, only=args.only, from_=None, force=False,
                                      dry_run=args.dry_run, reuse=reuse)  # fmt: skip
        rc = _cmd_run(run_args)
        if rc != 0:
            print(f"[sweep] variant {recipe.name} failed (exit {rc}); the later variants were not run",
                  file=sys.stderr)  # fmt: skip
            return rc
        reuse.append(str(recipe.run_dir))  # later variants share this one's finished stages
    if args.dry_run:
        return 0
    table = sweep_table([(labels, r.run_dir) for (labels, _), r in zip(variants, recipes)], shown)
    out = base.run_dir.parent / f"sweep-{base.name}-{'-'.join(k for k, _ in grid) or 'seeds'}.md"
    out.write_text(f"# Sweep of {base.name}\n\n`posttrain sweep {args.recipe} "
                   + " ".join(f"--grid {g}" for g in args.grid) + f" --seeds {args.seeds}`\n\n" + table)  # fmt: skip
    print("\n" + table + f"\n[sweep] table: {out}")
    return 0


def _run_stage_process(cmd: list[str]) -> tuple[int, bool]:
    """Run a stage's job in its own process group and pass SIGTERM and SIGINT sent to `posttrain run` on to the
    whole group. Launchers in the group ignore SIGTERM (`accelerate launch` would die and orphan the stage); the
    stage restores the default and, while training, saves a checkpoint and stops. Returns (exit code, whether a
    SIGTERM was passed on)."""
    import os
    import signal
    import subprocess

    def start() -> None:  # in the child, before exec: the ignore disposition is inherited, handlers are not
        os.setpgrp()
        signal.signal(signal.SIGTERM, signal.SIG_IGN)

    child = subprocess.Popen(cmd, preexec_fn=start)
    terminated = False

    def forward(signum, frame) -> None:
        nonlocal terminated
        terminated = terminated or signum == signal.SIGTERM
        try:
            os.killpg(child.pid, signum)
        except ProcessLookupError:
            pass

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return child.wait(), terminated
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _reuse(source: Path, folder: Path, want: str, dry_run: bool) -> dict | None:
    """Take a finished stage from another run folder when its hash is the one wanted (hard links, else copies)."""
    import os
    import shutil

    from posttrain.outputs import read_done, replace_folder

    done = read_done(source)
    if not done or done.get("config_hash") != want:
        return None
    print(f"[run] reuse {source} for {folder} (same config and parents, {want})")
    if not dry_run:

        def link(src: str, dst: str) -> None:
            try:
                os.link(src, dst)
            except OSError:
                shutil.copy2(src, dst)

        tmp = folder.with_name(folder.name + ".reuse")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(source, tmp, copy_function=link)
        replace_folder(tmp, folder)
    return done


def _failed_gate(folder: Path, want: str) -> str | None:
    """The recorded gate failure of a stage run with config hash `want`, if its last attempt failed so."""
    partial = folder.with_name(folder.name + ".partial")
    try:
        if (partial / "STAGE_HASH").read_text().strip() == want:
            return (partial / "GATE_FAILED").read_text().strip()
    except OSError:
        pass
    return None


def _print_reports(run_dir: Path, stages: list[str]) -> None:
    """The reports of the stages run so far (a gate-failed stage's from its .partial folder), then the table."""
    from posttrain.report import stage_states, world_table

    reports = (("data", "data_report.md"), ("generate", "generate_report.md"), ("rm", "rm_report.md"),
               ("merge", "merge_report.md"))  # fmt: skip
    states = stage_states(run_dir)  # a stage with no current output shows its failed attempt (.partial)
    for name, report in reports:
        folder, _ = states.get(name, (None, ""))
        if name in stages and folder is not None and (folder / report).exists():
            print("\n" + (folder / report).read_text())
    table = world_table(run_dir)
    if table:
        print("\n" + table)
    from posttrain.report import stage_table, write_report

    print("\n" + stage_table(run_dir))
    path = write_report(run_dir)
    print(f"[run] report: {path} (and {path.with_suffix('.html')})")


def _cmd_eval(args: argparse.Namespace) -> int:
    from posttrain.config import load_recipe
    from posttrain.outputs import read_done
    from posttrain.stages.eval import evaluate_models, report_markdown

    recipe = load_recipe(args.recipe, args.set)
    if read_done(recipe.run_dir / "sft") is None:
        raise ConfigError([f"posttrain eval needs the recipe's finished sft stage ({recipe.run_dir}/sft, the KL "
                           f"reference); run `posttrain run {args.recipe} --only sft`"])  # fmt: skip
    if not (Path(args.model) / "config.json").exists():
        raise ConfigError([f"{args.model}: not a saved model folder (no config.json)"])
    results = evaluate_models(recipe, [(str(args.model), Path(args.model), None)])
    print(report_markdown(results))
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


def _cmd_validate(args: argparse.Namespace) -> int:
    from posttrain.data.formats import validate_lines

    try:
        with open(args.file, encoding="utf-8") as f:
            rows, errors = validate_lines(f, args.file, args.format, args.system)
    except UnicodeDecodeError as e:
        rows, errors = [], [f"{args.file}: not UTF-8 text ({e.reason} at byte {e.start})"]
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


def build_parser() -> argparse.ArgumentParser:
    from posttrain.runner import STAGES

    p = argparse.ArgumentParser(prog="posttrain", description="Gemma-2-style post-training pipeline.")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("render", help="conversations (JSONL) → text, input_ids, loss_mask per line")
    r.add_argument("--tokenizer", required=True, help="'tiny' (built-in), a tokenizer folder or a hub id")
    r.add_argument("--input", help="JSONL file, one {'messages': [...]} per line (default: stdin)")
    r.add_argument("--generation-prompt", action="store_true", help="end with '<start_of_turn>model\\n'")
    r.add_argument("--system", choices=["fold", "reject"], default="fold", help="system-message policy")
    r.add_argument("--train-on", choices=["all", "last"], default="all", help="which model turns are trained")
    r.add_argument("--pretty", action="store_true", help="show the text with trained tokens marked [[…]]")
    r.set_defaults(func=_cmd_render)

    c = sub.add_parser("check", help="validate a recipe and print it resolved (extends and --set applied)")
    c.add_argument("recipe")
    c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a key")
    c.set_defaults(func=_cmd_check)

    s = sub.add_parser("stage", help="run one stage of a recipe in this process")
    s.add_argument("name", help=f"stage: {', '.join(STAGES)}")
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

    v = sub.add_parser("validate", help="check a data file; every bad row as file:line: reason")
    v.add_argument("file")
    v.add_argument("--format", choices=["conversations", "prompts", "preferences"], default="conversations")
    v.add_argument("--system", choices=["fold", "reject"], default="fold")
    v.add_argument(
        "--tokenizer", help="also check lengths after rendering with this tokenizer ('tiny', folder, id)"
    )
    v.add_argument("--max-length", type=int, default=512)
    v.set_defaults(func=_cmd_validate)

    ev = sub.add_parser(
        "eval", help="evaluate one saved model as the eval stage does (world, RM, KL, probes)"
    )
    ev.add_argument("model")
    ev.add_argument("--recipe", required=True)
    ev.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ev.set_defaults(func=_cmd_eval)
    rp = sub.add_parser("report", help="write RUN_DIR/report.md and report.html from a run's stage folders")
    rp.add_argument("run_dir")
    rp.set_defaults(func=_cmd_report)
    m = sub.add_parser("merge", help="average saved models: linear, slerp (task vectors), liti (WARP)")
    m.add_argument("--method", choices=["linear", "slerp", "liti"], default="linear")
    m.add_argument("--models", nargs="+", required=True, help="model folders (safetensors)")
    m.add_argument("--weights", nargs="+", type=float, help="linear only: one weight per model")
    m.add_argument("--base", help="the shared initialisation (slerp, liti)")
    m.add_argument(
        "--eta", type=float, default=1.0, help="liti: interpolation from the base (0) to the merge (1)"
    )
    m.add_argument("--out", required=True)
    m.set_defaults(func=_cmd_merge)
    return p


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
