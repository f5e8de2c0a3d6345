"""`posttrain …`: one sub-command per verb. Errors meant for users print as sentences (exit 1 for bad data or
models, 2 for a bad recipe or bad arguments); everything else is a bug and keeps its traceback."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from posttrain.chat import ChatFormatError
from posttrain.config import ConfigError


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


def build_parser() -> argparse.ArgumentParser:
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
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"posttrain: {e}", file=sys.stderr)
        return 2
    except (ChatFormatError, FileNotFoundError) as e:
        print(f"posttrain: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
