"""Gemma chat formatting: conversations → text, input_ids and loss mask, in one pass.

The format (Gemma, Gemma 2; the same as the `gemma.jinja` template that TRL ships):

    <bos><start_of_turn>user\\n{user text}<end_of_turn>\\n<start_of_turn>model\\n{model text}<end_of_turn>\\n…

and, with the generation prompt, a trailing `<start_of_turn>model\\n`. Message content is stripped of
surrounding whitespace (the template's `| trim`). Roles are `user` and `assistant` (rendered `model`), alternating
and starting with `user`.

Policy for `system` messages (Gemma has no system role), the same on every path:
  - `fold` (default): the system text, a blank line, then the first user turn's text become that user turn
    (what Gemma 3's template does);
  - `reject`: a system message is an error.

The loss mask is built by position while rendering, never by searching the text: 1 on every token of a model
turn's content and on its closing `<end_of_turn>`; 0 on `<bos>`, on user turns, on the `<start_of_turn>model\\n`
header and on the newline after `<end_of_turn>` (generation stops at `<end_of_turn>`, so that newline is never
generated). With `train_on="last"` only the final model turn is trained.

Exported models carry `chat_template(system)` in their tokenizer: a Jinja template for transformers'
`apply_chat_template` (and the tools that use it) that renders the same text as `render`, the system policy
included, and refuses what `normalize` refuses (tests/test_chat.py compares the two over many conversations).

The text is tokenized once, whole, without adding special tokens (it already begins with `<bos>`), so exactly
one `<bos>` sits at position 0; the mask comes from the character spans recorded while rendering, mapped onto
tokens through the tokenizer's offsets. Message content may not contain a control token: it would be read as
one and could forge a turn.

A model turn may carry an `attempt`: text the model wrote first and then corrected, rendered before the content
with one space between ("37+48, so 84" and "no: 37+48: 7+8=15, 3+4+1=8, so 85" become "37+48, so 84 no: …").
The attempt is context, never trained: the loss starts at that space, so that a model learns to notice the
error and correct it, not to make it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

BOS, EOS, PAD = "<bos>", "<eos>", "<pad>"
START, END = "<start_of_turn>", "<end_of_turn>"
CONTROL_TOKENS = (BOS, EOS, PAD, START, END)
ROLE_NAMES = {"user": "user", "assistant": "model", "model": "model"}

SystemPolicy = Literal["fold", "reject"]
TrainOn = Literal["all", "last"]


class ChatFormatError(ValueError):
    """A conversation cannot be rendered. The message names the conversation and the turn."""


@dataclass(frozen=True)
class Rendered:
    text: str
    input_ids: list[int]
    loss_mask: list[int]

    @property
    def n_trained(self) -> int:
        return sum(self.loss_mask)

    def as_dict(self) -> dict[str, Any]:
        return {"text": self.text, "input_ids": self.input_ids, "loss_mask": self.loss_mask}


def normalize(
    messages: Any, system: SystemPolicy = "fold", where: str = "conversation"
) -> list[dict[str, str]]:
    """Check a conversation and apply the system policy. Returns [{"role": "user"|"assistant", "content"}];
    a folded system text rides on the first user turn as its "prefix".

    Errors name `where` (e.g. "data/train.jsonl:12") and the turn (1-based).
    """
    if not isinstance(messages, list) or not messages:
        raise ChatFormatError(f"{where}: a conversation is a non-empty list of messages")
    out: list[dict[str, str]] = []
    system_text: str | None = None
    for i, m in enumerate(messages, start=1):
        turn = f"{where}, turn {i}"
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ChatFormatError(f"{turn}: a message needs 'role' and 'content', got {_short(m)}")
        role, content = m["role"], m["content"]
        if not isinstance(content, str):
            raise ChatFormatError(f"{turn}: content must be a string, got {type(content).__name__}")
        if not content.strip():
            raise ChatFormatError(f"{turn}: {role} message is empty")
        _no_control_token(content, "content", turn)
        attempt = {"attempt": _attempt(m["attempt"], role, turn)} if "attempt" in m else {}
        if role == "system":
            if system == "reject":
                raise ChatFormatError(
                    f"{turn}: system messages are rejected (chat.system: reject); Gemma has none"
                )
            if i != 1:
                raise ChatFormatError(f"{turn}: a system message may only come first")
            system_text = content
            continue
        if role not in ROLE_NAMES:
            raise ChatFormatError(
                f"{turn}: unknown role {role!r}; use 'user' or 'assistant' (or 'system' first)"
            )
        role = "assistant" if role == "model" else role
        expected = "user" if len(out) % 2 == 0 else "assistant"
        if role != expected:
            raise ChatFormatError(
                f"{turn}: expected a {expected} turn (roles alternate user/assistant), got {role}"
            )
        out.append({"role": role, "content": content, **attempt})
    if not out:
        raise ChatFormatError(f"{where}: the conversation has no user turn")
    if system_text is not None:  # kept apart so that rendering matches Gemma 3's template byte for byte
        out[0] = {**out[0], "prefix": system_text + "\n\n"}
    return out


def _attempt(attempt: Any, role: str, turn: str) -> str:
    """A model turn's untrained `attempt`, checked."""
    if role not in ("assistant", "model"):
        raise ChatFormatError(
            f"{turn}: only a model turn may carry an 'attempt'; remove it from the {role} turn"
        )
    if not isinstance(attempt, str) or not attempt.strip():
        raise ChatFormatError(f"{turn}: 'attempt' must be a non-empty string, got {_short(attempt)}")
    _no_control_token(attempt, "attempt", turn)
    return attempt


def _no_control_token(text: str, field: str, turn: str) -> None:
    """A message field may not contain a control token: it would be read as one and could forge a turn."""
    for tok in CONTROL_TOKENS:
        if tok in text:
            raise ChatFormatError(
                f"{turn}: {field} contains the control token {tok}; remove it from the data"
            )


def turn_text(message: dict[str, str]) -> str:
    """A model turn's text as rendered: its untrained `attempt` (when it has one), a space, then its content."""
    attempt = message.get("attempt")
    content = message["content"].strip()
    return f"{attempt.strip()} {content}" if attempt else content


def render_text(
    messages: Sequence[dict[str, str]], add_generation_prompt: bool = False, train_on: TrainOn = "all"
) -> tuple[str, list[tuple[int, int]]]:
    """Normalized messages → (text, trained character spans [start, end))."""
    parts, spans, pos = [BOS], [], len(BOS)
    last_model = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
    for i, m in enumerate(messages):
        header = f"{START}{ROLE_NAMES[m['role']]}\n"
        body = m.get("prefix", "") + turn_text(m) + END
        parts += [header, body, "\n"]
        start = pos + len(header)
        if m["role"] == "assistant" and (train_on == "all" or i == last_model):
            untrained = (
                len(m["attempt"].strip()) if m.get("attempt") else 0
            )  # trained from the space after it
            spans.append((start + untrained, start + len(body)))
        pos = start + len(body) + 1
    if add_generation_prompt:
        parts.append(f"{START}model\n")
    return "".join(parts), spans


def render(
    messages: Any,
    tokenizer: Any,
    *,
    add_generation_prompt: bool = False,
    system: SystemPolicy = "fold",
    train_on: TrainOn = "all",
    where: str = "conversation",
) -> Rendered:
    """Conversation → Rendered(text, input_ids, loss_mask). The one entry point every stage uses."""
    msgs = normalize(messages, system, where)
    if add_generation_prompt and msgs[-1]["role"] != "user":
        raise ChatFormatError(f"{where}: a generation prompt needs the conversation to end with a user turn")
    text, spans = render_text(msgs, add_generation_prompt, train_on)
    ids, mask = tokenize_with_mask(text, spans, tokenizer)
    if not ids or ids[0] != tokenizer.bos_token_id or ids.count(tokenizer.bos_token_id) != 1:
        raise ChatFormatError(f"{where}: the tokenizer did not give exactly one <bos> at position 0")
    return Rendered(text, ids, mask)


_TEMPLATE = """{#- posttrain: Gemma turns as training rendered them; system policy: POLICY -#}
{%- if messages is not sequence or messages is string or messages | length == 0 -%}
    {{- raise_exception('a conversation is a non-empty list of messages') -}}
{%- endif -%}
{%- for message in messages -%}
    {%- if message is not mapping or 'role' not in message or 'content' not in message -%}
        {{- raise_exception("turn " ~ loop.index ~ ": a message needs 'role' and 'content'") -}}
    {%- endif -%}
    {%- if message['content'] is not string -%}
        {{- raise_exception('turn ' ~ loop.index ~ ': content must be a string') -}}
    {%- endif -%}
    {%- if message['content'] | trim == '' -%}
        {{- raise_exception('turn ' ~ loop.index ~ ': ' ~ message['role'] ~ ' message is empty') -}}
    {%- endif -%}
    {%- for token in ['<bos>', '<eos>', '<pad>', '<start_of_turn>', '<end_of_turn>'] -%}
        {%- if token in message['content'] -%}
            {{- raise_exception('turn ' ~ loop.index ~ ': content contains the control token ' ~ token) -}}
        {%- endif -%}
    {%- endfor -%}
    {%- if message['attempt'] is defined -%}
        {%- if message['role'] not in ['assistant', 'model'] -%}
            {{- raise_exception('turn ' ~ loop.index ~ ": only a model turn may carry an 'attempt'") -}}
        {%- elif message['attempt'] is not string or message['attempt'] | trim == '' -%}
            {{- raise_exception('turn ' ~ loop.index ~ ": 'attempt' must be a non-empty string") -}}
        {%- endif -%}
        {%- for token in ['<bos>', '<eos>', '<pad>', '<start_of_turn>', '<end_of_turn>'] -%}
            {%- if token in message['attempt'] -%}
                {{- raise_exception('turn ' ~ loop.index ~ ': attempt contains the control token ' ~ token) -}}
            {%- endif -%}
        {%- endfor -%}
    {%- endif -%}
    {%- if message['role'] == 'system' -%}
        {%- if 'POLICY' == 'reject' -%}
            {{- raise_exception('system messages are rejected (chat.system: reject); Gemma has none') -}}
        {%- elif not loop.first -%}
            {{- raise_exception('turn ' ~ loop.index ~ ': a system message may only come first') -}}
        {%- endif -%}
    {%- elif message['role'] not in ['user', 'assistant', 'model'] -%}
        {{- raise_exception('turn ' ~ loop.index ~ ": unknown role; use 'user' or 'assistant' (or 'system' first)") -}}
    {%- endif -%}
{%- endfor -%}
{%- if messages[0]['role'] == 'system' -%}
    {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = '' -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- if loop_messages | length == 0 -%}
    {{- raise_exception('the conversation has no user turn') -}}
{%- endif -%}
{{- bos_token -}}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{- raise_exception('roles alternate user/assistant, starting with user') -}}
    {%- endif -%}
    {%- set role = 'user' if message['role'] == 'user' else 'model' -%}
    {%- set attempt = (message['attempt'] | trim + ' ') if message['attempt'] is defined else '' -%}
    {{- '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') + attempt + message['content'] | trim + '<end_of_turn>\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {%- if loop_messages[-1]['role'] != 'user' -%}
        {{- raise_exception('a generation prompt needs the conversation to end with a user turn') -}}
    {%- endif -%}
    {{- '<start_of_turn>model\n' -}}
{%- endif -%}
"""


def chat_template(system: SystemPolicy = "fold") -> str:
    """The chat template every exported tokenizer carries: `apply_chat_template(messages, tokenize=False,
    add_generation_prompt=…)` gives `render`'s text with system policy `system` (a system message folded into the
    first user turn, or refused), and raises where `render` raises."""
    if system not in ("fold", "reject"):
        raise ValueError(f"system policy {system!r} is not one of fold, reject")
    return _TEMPLATE.replace("POLICY", system)


def tokenize_with_mask(
    text: str, spans: list[tuple[int, int]], tokenizer: Any
) -> tuple[list[int], list[int]]:
    """Tokenize `text` once; a token is trained when its first character lies in a trained span."""
    if not getattr(tokenizer, "is_fast", False):
        raise ChatFormatError("the renderer needs a fast tokenizer (it maps the mask through token offsets)")
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    mask = []
    for start, end in enc["offset_mapping"]:
        mask.append(int(any(a <= start < b for a, b in spans) and end > start))
    return ids, mask


def final_response(messages: Sequence[dict[str, str]]) -> str | None:
    """The conversation's final model turn (role `assistant` or `model`) as rendered, its `attempt` included, or
    None where it ends on another."""
    last = messages[-1] if messages else None
    return turn_text(last) if last is not None and ROLE_NAMES.get(last["role"]) == "model" else None


def prompt_messages(messages: Sequence[dict[str, str]]) -> list[dict[str, str]]:
    """A conversation without its final model turn (what a policy is asked to continue)."""
    msgs = list(messages)
    return msgs[:-1] if final_response(msgs) is not None else msgs


def stop_ids(tokenizer: Any) -> list[int]:
    """The ids generation stops on: `<eos>` and, when the tokenizer has it, `<end_of_turn>`."""
    stops = [tokenizer.eos_token_id]
    end = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    if isinstance(end, int) and end != tokenizer.unk_token_id:
        stops.append(end)
    return stops


def trained_text(r: Rendered, tokenizer: Any) -> list[str]:
    """Decode each contiguous run of trained tokens (what the loss sees), for checks and `posttrain render`."""
    runs, cur = [], []
    for tid, m in zip(r.input_ids, r.loss_mask):
        if m:
            cur.append(tid)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return [tokenizer.decode(run, skip_special_tokens=False) for run in runs]


def _short(x: Any, n: int = 60) -> str:
    s = repr(x)
    return s if len(s) <= n else s[: n - 3] + "..."
