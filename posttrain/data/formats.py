"""Data formats and row validation, before any model loads.

Formats (one JSON object per line; `data/README.md` shows each with an example file):
  conversations  {"messages": [user, assistant, ...]}           ends with an assistant turn (SFT, teacher)
  prompts        {"messages": [user, assistant, ..., user]}     ends with a user turn (generation, RL)
  preferences    {"prompt": [... user], "chosen": [assistant], "rejected": [assistant]}   (reward model)
Extra fields (`id`, `task`, `answer`, `meta`) are kept. A `system` message first is allowed (chat policy).

Every bad row is reported as `file:line: what is wrong`, all of them at once (`DataError`). Length is checked
after rendering: prompts are cut from the left; a row whose final response cannot fit is dropped and counted,
never truncated to nothing.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from posttrain.chat import ChatFormatError, Rendered, normalize, render
from posttrain.data.jsonl import DataError, read_jsonl


def check_row(row: Any, fmt: str, where: str, system: str = "fold") -> dict[str, Any]:
    """Raise ChatFormatError naming `where` when `row` is not a valid `fmt` row; return the row."""
    if not isinstance(row, dict):
        raise ChatFormatError(f"{where}: a row is a JSON object, got {type(row).__name__}")
    if fmt == "preferences":
        for key in ("prompt", "chosen", "rejected"):
            if key not in row:
                raise ChatFormatError(
                    f"{where}: missing field '{key}' (preferences need prompt, chosen, rejected)"
                )
        prompt = normalize(row["prompt"], system, f"{where} (prompt)")
        if prompt[-1]["role"] != "user":
            raise ChatFormatError(f"{where}: the prompt must end with a user turn")
        for key in ("chosen", "rejected"):
            normalize(list(row["prompt"]) + _as_turns(row[key]), system, f"{where} ({key})")
        if _as_turns(row["chosen"]) == _as_turns(row["rejected"]):
            raise ChatFormatError(f"{where}: chosen and rejected are identical")
        return row
    if "messages" not in row:
        raise ChatFormatError(f"{where}: missing field 'messages'")
    msgs = normalize(row["messages"], system, where)
    last = msgs[-1]["role"]
    if fmt == "conversations" and last != "assistant":
        raise ChatFormatError(f"{where}: a conversation must end with an assistant turn (this is a prompt)")
    if fmt == "prompts" and last != "user":
        raise ChatFormatError(f"{where}: a prompt must end with a user turn")
    return row


def _as_turns(x: Any) -> list:
    if isinstance(x, str):
        return [{"role": "assistant", "content": x}]
    if isinstance(x, list):
        return x
    raise ChatFormatError(f"chosen/rejected must be a list of messages or a string, got {type(x).__name__}")


def validate_lines(
    lines: Iterable[str], source: str, fmt: str, system: str = "fold"
) -> tuple[list, list[str]]:
    """Parse and check every line. Returns (rows with `_where` set, errors); nothing is raised."""
    errors: list[str] = []
    rows = []
    for where, row in read_jsonl(lines, source, errors):
        try:
            check_row(row, fmt, where, system)
        except ChatFormatError as e:
            errors.append(str(e))
            continue
        rows.append({**row, "_where": where})
    return rows, errors


def read_rows(path: str, fmt: str, system: str = "fold") -> list[dict[str, Any]]:
    """Read and validate a JSONL file; raise DataError listing every bad row."""
    try:
        with open(path, encoding="utf-8") as f:
            rows, errors = validate_lines(f, path, fmt, system)
    except FileNotFoundError:
        raise DataError([f"{path}: no such file"], path) from None
    except UnicodeDecodeError as e:
        raise DataError([f"{path}: not UTF-8 text ({e.reason} at byte {e.start})"], path) from None
    if errors:
        raise DataError(errors, path)
    if not rows:
        raise DataError([f"{path}: no rows"], path)
    return rows


# ------------------------------------------------------------------------------------------------- length


def truncate_left(r: Rendered, max_length: int) -> Rendered | None:
    """Cut prompt tokens from the left (after `<bos>`) until `r` fits; None when the final trained turn
    itself cannot fit (a response is never cut)."""
    n = len(r.input_ids)
    if n <= max_length:
        return r
    cut = n - max_length  # tokens to remove after <bos>
    starts = [i for i in range(1, n) if r.loss_mask[i] and not r.loss_mask[i - 1]]
    first_kept_needed = (
        starts[-1] if starts else n
    )  # start of the final trained run (or the generation point)
    if 1 + cut > first_kept_needed:
        return None
    ids = r.input_ids[:1] + r.input_ids[1 + cut :]
    mask = r.loss_mask[:1] + r.loss_mask[1 + cut :]
    return Rendered(r.text, ids, mask)


def check_dropped(
    what: str, dropped: int, total: int, limit: float, limit_key: str, detail: str, fix: str
) -> None:
    """Raise DataError when more than `limit` of `total` items were dropped: `<what>: <dropped> of <total>
    <detail> (<share>); limit <limit_key> <limit> — <fix>`."""
    if total and dropped / total > limit:
        raise DataError(
            [
                f"{what}: {dropped} of {total} {detail} ({dropped / total:.1%}); limit {limit_key} {limit} — {fix}"
            ]
        )


def fit(
    messages: list, tokenizer: Any, chat: Any, where: str, train_on: str | None = None
) -> Rendered | None:
    """Render `messages` and cut the prompt from the left to fit `chat.max_length`; None when the final trained
    turn itself cannot fit. `train_on` defaults to the recipe's `chat.train_on`."""
    r = render(messages, tokenizer, system=chat.system, train_on=train_on or chat.train_on, where=where)
    return truncate_left(r, chat.max_length)


def pair_sides(row: dict) -> tuple[list, list]:
    """A preference row → (prompt + chosen, prompt + rejected) as message lists."""
    return list(row["prompt"]) + _as_turns(row["chosen"]), list(row["prompt"]) + _as_turns(row["rejected"])


def length_check(
    rows: list[dict], fmt: str, tokenizer: Any, chat: Any
) -> tuple[list[dict], dict[str, list], int]:
    """Render each row; keep rows that fit `chat.max_length` (prompts cut from the left).

    Returns (kept rows, {reason: [dropped row ids]}, number of kept rows whose prompt will be cut)."""
    kept, dropped = [], {"response_too_long": [], "pair_too_long": []}
    truncated = 0
    for row in rows:
        where = row.get("_where", row.get("id", "?"))
        if fmt == "preferences":
            fits = all(
                fit(side, tokenizer, chat, where, train_on="last") is not None for side in pair_sides(row)
            )
            if not fits:
                dropped["pair_too_long"].append(row.get("id", where))
                continue
            kept.append(row)
            continue
        r = render(row["messages"], tokenizer, system=chat.system, train_on=chat.train_on, where=where,
                   add_generation_prompt=(fmt == "prompts"))  # fmt: skip
        if len(r.input_ids) > chat.max_length:
            truncated += 1
        if fmt == "conversations" and truncate_left(r, chat.max_length) is None:
            dropped["response_too_long"].append(row.get("id", where))
            continue
        kept.append(row)
    return kept, {k: v for k, v in dropped.items() if v}, truncated
