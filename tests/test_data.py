"""Validation (every bad row as file:line: reason), lengths, filters measured on labelled world data."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from posttrain.chat import render
from posttrain.config import ChatConfig, DefectRates, FilterConfig, WorldConfig, load_recipe
from posttrain.data.filters import apply_filters
from posttrain.data.formats import DataError, length_check, read_rows, truncate_left
from posttrain.data.sources import balanced_prompts
from posttrain.world import eval_split, raw_dataset

ROOT = Path(__file__).resolve().parents[1]


def u(t):
    return {"role": "user", "content": t}


def a(t):
    return {"role": "assistant", "content": t}


BAD_LINES = [
    json.dumps({"messages": [u("fine"), a("ok")]}),  # 1 good
    "{not json",  # 2 syntax
    json.dumps({"text": "no messages"}),  # 3 missing field
    json.dumps({"messages": [u("a"), u("b"), a("c")]}),  # 4 alternation
    json.dumps({"messages": [u("a"), a("   ")]}),  # 5 empty content
    json.dumps({"messages": [u("a"), {"role": "robot", "content": "x"}]}),  # 6 unknown role
    json.dumps({"messages": [u("only a prompt")]}),  # 7 not a conversation
    json.dumps(["a", "list"]),  # 8 not an object
    "",  # 9 blank: skipped
    json.dumps({"messages": [u("hi"), a("there"), {"role": "system", "content": "late"}]}),  # 10 late system
]
EXPECTED = {
    2: "not valid JSON",
    3: "missing field 'messages'",
    4: "turn 2: expected a assistant turn",
    5: "turn 2: assistant message is empty",
    6: "turn 2: unknown role 'robot'",
    7: "must end with an assistant turn",
    8: "a row is a JSON object",
    10: "turn 3: a system message may only come first",
}


@pytest.fixture
def bad_file(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text("\n".join(BAD_LINES) + "\n")
    return p


def _check_listing(text: str, path: Path) -> None:
    for line, fragment in EXPECTED.items():
        starts = (f"{path}:{line}:", f"{path}:{line},")
        assert any(row.startswith(starts) and fragment in row for row in text.splitlines()), (line, text)
    assert not any(f"{path}:{n}{c}" in text for n in (1, 9) for c in ":,")


def test_read_rows_lists_every_bad_row(bad_file):
    with pytest.raises(DataError) as e:
        read_rows(str(bad_file), "conversations")
    assert len(e.value.errors) == len(EXPECTED)
    _check_listing(str(e.value), bad_file)


def test_validate_cli_lists_every_bad_row(bad_file):
    out = subprocess.run(
        [sys.executable, "-m", "posttrain", "validate", str(bad_file)], capture_output=True, text=True
    )
    assert out.returncode == 1
    _check_listing(out.stdout, bad_file)
    good = subprocess.run(
        [sys.executable, "-m", "posttrain", "validate", str(ROOT / "data/examples/conversations.jsonl")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert good.returncode == 0 and "all valid" in good.stdout


def test_data_stage_lists_every_bad_row(bad_file, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"extends: {ROOT / 'recipes/tiny/pipeline.yaml'}\nname: bad\noutput_dir: {tmp_path / 'runs'}\n"
        f"data:\n  source: jsonl\n  train: {bad_file}\n"
    )
    out = subprocess.run(
        [sys.executable, "-m", "posttrain", "stage", "data", str(recipe)], capture_output=True, text=True
    )
    assert out.returncode == 1
    _check_listing(out.stderr, bad_file)
    assert not (tmp_path / "runs" / "bad" / "data").exists()


def test_preference_rows(tmp_path):
    p = tmp_path / "prefs.jsonl"
    rows = [
        {"prompt": [u("What is 2 + 2?")], "chosen": [a("4")], "rejected": [a("5")]},
        {"prompt": [u("q")], "chosen": [a("x")]},
        {"prompt": [u("q")], "chosen": [a("same")], "rejected": [a("same")]},
        {"prompt": [u("q"), a("no")], "chosen": [a("x")], "rejected": [a("y")]},
    ]
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(DataError) as e:
        read_rows(str(p), "preferences")
    msg = str(e.value)
    assert f"{p}:2: missing field 'rejected'" in msg
    assert f"{p}:3: chosen and rejected are identical" in msg
    assert f"{p}:4: the prompt must end with a user turn" in msg
    assert f"{p}:1:" not in msg


def test_truncation_cuts_prompt_from_left_never_the_response(tiny_tokenizer):
    long_prompt = [u("x" * 200), a("first answer"), u("What is 2 + 2?"), a("4")]
    r = render(long_prompt, tiny_tokenizer, train_on="last")
    t = truncate_left(r, 64)
    assert t is not None and len(t.input_ids) == 64 and t.input_ids[0] == tiny_tokenizer.bos_token_id
    assert t.input_ids[-sum(t.loss_mask) - 1 :] == r.input_ids[-sum(r.loss_mask) - 1 :]
    assert sum(t.loss_mask) == sum(r.loss_mask)
    assert truncate_left(render([u("q"), a("y" * 100)], tiny_tokenizer), 64) is None
    rows = [{"id": "long", "messages": [u("q"), a("y" * 100)]}, {"id": "ok", "messages": [u("q"), a("y")]}]
    kept, dropped, _ = length_check(rows, "conversations", tiny_tokenizer, ChatConfig(max_length=64))
    assert [r["id"] for r in kept] == ["ok"] and dropped == {"response_too_long": ["long"]}


FILTER_OF = {
    "pii": "pii", "unsafe": "unsafe", "wrong_identity": "identity", "contamination": "contamination",
    "duplicate": "duplicate", "near_duplicate": "near_duplicate",
}  # fmt: skip


@pytest.mark.parametrize("defect", list(FILTER_OF))
def test_each_filter_removes_its_defect_and_spares_clean_rows(defect):
    cfg = WorldConfig(defects=DefectRates(**{d: 0.05 for d in FILTER_OF}))
    ev = eval_split(cfg, seed=3)
    raw = raw_dataset(cfg, 3000, seed=3, eval_rows=ev)
    only = {k: False for k in FILTER_OF.values()} | {FILTER_OF[defect]: True}
    kept, report = apply_filters(
        raw, FilterConfig(**only, unsafe_patterns=str(ROOT / "data/filters/unsafe_patterns.txt")), ev
    )
    kept_ids = {r["id"] for r in kept}
    total = Counter(r["meta"]["defect"] for r in raw)
    removed = Counter(r["meta"]["defect"] for r in raw if r["id"] not in kept_ids)
    recall, clean_loss = removed[defect] / total[defect], removed[None] / total[None]
    print(
        f"filter {FILTER_OF[defect]}: removes {recall:.1%} of {defect} rows, {clean_loss:.2%} of clean rows"
    )
    assert recall >= 0.95
    assert clean_loss < 0.02


def test_every_recipe_data_section_has_its_pattern_file():
    recipe = load_recipe(ROOT / "recipes/tiny/pipeline.yaml")
    assert (
        Path(recipe.data.filters.unsafe_patterns).is_file()
        or (ROOT / recipe.data.filters.unsafe_patterns).is_file()
    )


def test_too_many_dropped_is_an_error_that_says_the_limit():
    from posttrain.data.formats import DataError, check_dropped

    check_dropped(
        "train", 5, 100, 0.05, "data.max_dropped_fraction", "rows do not fit", "raise it"
    )  # at the limit
    with pytest.raises(
        DataError, match=r"train: 6 of 100 rows do not fit \(6.0%\); limit data.max_dropped_fraction 0.05"
    ):
        check_dropped("train", 6, 100, 0.05, "data.max_dropped_fraction", "rows do not fit", "raise it")
    check_dropped("eval", 0, 0, 0.0, "k", "d", "f")  # nothing to drop from


def test_balanced_prompts_draw_each_family_equally():
    tasks = {f"a{i}": "add" for i in range(6)} | {"i0": "identity", "i1": "identity"} | {"x": None}
    keys = balanced_prompts(tasks, seed=3)
    assert len(keys) == 18  # 3 families × the largest one's 6
    assert sorted(k for k in keys if k.startswith("a")) == sorted(tasks)[:6]  # each add prompt once
    assert keys.count("i0") == keys.count("i1") == 3 and keys.count("x") == 6
    assert balanced_prompts(tasks, seed=3) == keys and balanced_prompts({}, 0) == []
