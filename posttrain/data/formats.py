"""Data formats and row validation, before any model loads.

Formats (one JSON object per line, or one row of a Hugging Face dataset; `data/README.md` shows each with an
example file):
  conversations  {"messages": [user, assistant, ...]}           ends with an assistant turn (SFT, teacher)
  prompts        {"messages": [user, assistant, ..., user]}     ends with a user turn (generation, RL)
  preferences    {"prompt": [... user], "chosen": [assistant], "rejected": [assistant]}   (reward model)
Extra fields (`id`, `task`, `answer`, `meta`) are kept. A `system` message first is allowed (chat policy).

TRL's standard dataset formats are accepted too and converted to these (`to_ours`), row by row:
  prompt-completion   {"prompt": ..., "completion": ...}   a conversation (a prompt alone: a prompt)
  prompt-only         {"prompt": ...}                        a prompt
  preference          {"prompt": ..., "chosen": ..., "rejected": ...}   explicit prompt
                      {"chosen": [...], "rejected": [...]}  implicit prompt: two whole conversations that share
                                                            their first turns; the shared turns are the prompt
Each field is a list of messages (conversational) or a string (plain text: a prompt string is one user turn, a
completion, chosen or rejected string one assistant turn). A chosen or rejected conversation that repeats the
explicit prompt's turns (as HuggingFaceH4/ultrafeedback_binarized does) has the repeat removed.

Every bad row is reported as `file:line: what is wrong` (a dataset row as `dataset:split:row`), all of them at once
(`DataError`); `bad_row_policy` drops bad rows while they are at most a recipe's `max_bad_fraction` of the rows.
Length is checked after rendering: prompts are cut from the left; a row whose final response cannot fit is dropped
and counted, never truncated to nothing.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from posttrain.chat import ChatFormatError, Rendered, normalize, render
from posttrain.data.jsonl import DataError, read_jsonl

FORMATS = ("conversations", "prompts", "preferences")


def to_ours(row: Any, fmt: str, where: str) -> dict[str, Any]:
    """A row in our format or one of TRL's standard formats → our format for `fmt` (other fields kept); raise
    ChatFormatError naming `where` when the row has the fields of neither."""
    if not isinstance(row, dict):
        raise ChatFormatError(f"{where}: a row is a JSON object, got {type(row).__name__}")
    if fmt == "preferences":
        return _preference(row, where)
    if "messages" in row:
        return row
    if "prompt" in row and (fmt == "prompts" or "completion" in row):
        msgs = _turns(row["prompt"], "user", where, "prompt")
        if fmt == "conversations":
            msgs = msgs + _turns(row["completion"], "assistant", where, "completion")
        return {**{k: v for k, v in row.items() if k not in ("prompt", "completion")}, "messages": msgs}
    if "text" in row:
        raise ChatFormatError(f"{where}: missing field 'messages' — a 'text' row is language-modelling data "
                              "without turns; give 'messages', or 'prompt' and 'completion' (data/README.md)")  # fmt: skip
    other = "'prompt'" if fmt == "prompts" else "'prompt' and 'completion'"
    raise ChatFormatError(f"{where}: missing field 'messages' (or TRL's {other})")


def _turns(x: Any, role: str, where: str, field: str) -> list:
    """A field as a list of messages: a string is one `role` turn."""
    if isinstance(x, str):
        return [{"role": role, "content": x}]
    if isinstance(x, list):
        return list(x)
    raise ChatFormatError(f"{where}: {field} must be a string or a list of messages, got {type(x).__name__}")


def _key(m: Any) -> Any:
    return (m.get("role"), m.get("content")) if isinstance(m, dict) else m


def _preference(row: dict, where: str) -> dict[str, Any]:
    for key in ("chosen", "rejected"):
        if key not in row:
            raise ChatFormatError(
                f"{where}: missing field '{key}' (preferences need chosen and rejected, and a prompt unless "
                "chosen and rejected are whole conversations)"
            )
    rest = {k: v for k, v in row.items() if k not in ("prompt", "chosen", "rejected")}
    if "prompt" not in row:
        prompt, chosen, rejected = _split_shared(row["chosen"], row["rejected"], where)
        return {**rest, "prompt": prompt, "chosen": chosen, "rejected": rejected}
    prompt = _turns(row["prompt"], "user", where, "prompt")
    sides = [_turns(row[k], "assistant", where, k) for k in ("chosen", "rejected")]
    head = [_key(m) for m in prompt]
    sides = [s[len(prompt) :] if [_key(m) for m in s[: len(prompt)]] == head and len(s) > len(prompt) else s
             for s in sides]  # fmt: skip
    return {**rest, "prompt": prompt, "chosen": sides[0], "rejected": sides[1]}


def _split_shared(chosen: Any, rejected: Any, where: str) -> tuple[list, list, list]:
    """Implicit prompt: the turns both conversations share, up to the last shared user turn, are the prompt."""
    if not isinstance(chosen, list) or not isinstance(rejected, list):
        raise ChatFormatError(
            f"{where}: without a 'prompt' field, chosen and rejected must be whole conversations (lists of "
            "messages) that share their prompt turns; plain text has no user turn to split off — add a 'prompt'"
        )
    shared = 0
    while shared < min(len(chosen), len(rejected)) and _key(chosen[shared]) == _key(rejected[shared]):
        shared += 1
    users = [i for i in range(shared) if isinstance(chosen[i], dict) and chosen[i].get("role") == "user"]
    if not users:
        raise ChatFormatError(f"{where}: chosen and rejected share no user turn (an implicit prompt is the turns "
                              "both conversations start with)")  # fmt: skip
    n = users[-1] + 1
    if n == len(chosen) or n == len(rejected):
        raise ChatFormatError(f"{where}: chosen or rejected has no response after the shared prompt turns")
    return chosen[:n], chosen[n:], rejected[n:]


def check_row(row: Any, fmt: str, where: str, system: str = "fold") -> dict[str, Any]:
    """Raise ChatFormatError naming `where` when `row` is not a valid `fmt` row (ours or TRL's); return it in our
    format."""
    row = to_ours(row, fmt, where)
    if fmt == "preferences":
        prompt = normalize(row["prompt"], system, f"{where} (prompt)")
        if prompt[-1]["role"] != "user":
            raise ChatFormatError(f"{where}: the prompt must end with a user turn")
        for key in ("chosen", "rejected"):
            side = normalize(list(row["prompt"]) + row[key], system, f"{where} ({key})")
            if side[-1]["role"] != "assistant":
                raise ChatFormatError(f"{where}: {key} must end with an assistant turn")
        if [_key(m) for m in row["chosen"]] == [_key(m) for m in row["rejected"]]:
            raise ChatFormatError(f"{where}: chosen and rejected are identical")
        return row
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
    """Parse and check every line. Returns (rows in our format with `_where` set, errors); nothing is raised."""
    errors: list[str] = []
    rows = []
    for where, row in read_jsonl(lines, source, errors):
        try:
            rows.append({**check_row(row, fmt, where, system), "_where": where})
        except ChatFormatError as e:
            errors.append(str(e))
    return rows, errors


def bad_row_policy(errors: list[str], total: int, limit: float, key: str, source: str) -> None:
    """Bad rows are dropped while they are at most `limit` of the `total` rows read; past it, DataError lists
    every one of them and says the limit."""
    if errors and not (total and len(errors) / total <= limit):
        raise DataError(errors, source, f"{len(errors)} of {total} rows of {source} are bad "
                        f"({len(errors) / max(total, 1):.1%}); limit {key} {limit} — fix them, or raise {key} "
                        "to drop up to that share")  # fmt: skip


def read_rows(
    path: str, fmt: str, system: str = "fold", max_bad: float = 0.0, key: str = "max_bad_fraction"
) -> tuple[list[dict[str, Any]], list[str]]:
    """Read and validate a JSONL file: (rows in our format, the bad rows dropped as `file:line: reason`); raise
    DataError when the file cannot be read, holds no rows, or more than `max_bad` of its rows are bad."""
    try:
        with open(path, encoding="utf-8") as f:
            rows, errors = validate_lines(f, path, fmt, system)
    except (FileNotFoundError, IsADirectoryError):
        raise DataError([f"{path}: no such file"], path) from None
    except PermissionError:
        raise DataError([f"{path}: not readable (permission denied)"], path) from None
    except UnicodeDecodeError as e:
        raise DataError([f"{path}: not UTF-8 text ({e.reason} at byte {e.start})"], path) from None
    bad_row_policy(errors, len(rows) + len(errors), max_bad, key, path)
    if not rows:
        raise DataError([f"{path}: no rows"], path)
    return rows, errors


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
