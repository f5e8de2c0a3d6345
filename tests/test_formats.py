"""TRL's standard dataset formats beside ours, from JSONL and from Hugging Face datasets (the client patched at
`datasets.load_dataset`), and the one bad-row policy of both."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from posttrain.chat import ChatFormatError
from posttrain.config import RMConfig
from posttrain.data.formats import DataError, check_row, read_rows
from posttrain.data.sources import hf_rows, read_source

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = {  # every example file of data/README.md and the format it is checked as
    "conversations.jsonl": "conversations", "prompt_completion.jsonl": "conversations",
    "prompt_completion_conversational.jsonl": "conversations", "prompts.jsonl": "prompts",
    "prompt_only.jsonl": "prompts", "preferences.jsonl": "preferences",
    "preferences_implicit.jsonl": "preferences", "preferences_text.jsonl": "preferences",
}  # fmt: skip


def u(t):
    return {"role": "user", "content": t}


def a(t):
    return {"role": "assistant", "content": t}


def s(t):
    return {"role": "system", "content": t}


def test_every_example_file_is_shown_in_the_data_readme_and_validates():
    readme = (ROOT / "data" / "README.md").read_text()
    assert {p.name for p in (ROOT / "data" / "examples").glob("*.jsonl")} == set(EXAMPLES)
    for name, fmt in EXAMPLES.items():
        assert f"examples/{name}" in readme, name
        rows, bad = read_rows(str(ROOT / "data" / "examples" / name), fmt)
        assert rows and not bad, name
        key = "messages" if fmt != "preferences" else "chosen"
        assert all(isinstance(r[key], list) for r in rows), name  # converted to our format


@pytest.mark.parametrize(
    "name", ["prompt_completion.jsonl", "preferences_implicit.jsonl", "prompt_only.jsonl"]
)
def test_the_validate_command_accepts_trl_formats(name):
    path = ROOT / "data" / "examples" / name
    out = subprocess.run([sys.executable, "-m", "posttrain", "validate", str(path), "--format", EXAMPLES[name]],
                         capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 0 and "all valid" in out.stdout, out.stdout + out.stderr


CONVERTED = [  # (fmt, TRL row, our row)
    ("conversations", {"prompt": "hi", "completion": "hello", "id": "x"},
     {"id": "x", "messages": [u("hi"), a("hello")]}),
    ("conversations", {"prompt": [s("be brief"), u("hi")], "completion": [a("hello")]},
     {"messages": [s("be brief"), u("hi"), a("hello")]}),
    ("prompts", {"prompt": "hi"}, {"messages": [u("hi")]}),
    ("prompts", {"prompt": [u("2 + 2?")], "completion": [a("4")]}, {"messages": [u("2 + 2?")]}),
    ("preferences", {"prompt": "2 + 2?", "chosen": "4", "rejected": "5"},
     {"prompt": [u("2 + 2?")], "chosen": [a("4")], "rejected": [a("5")]}),
    ("preferences", {"chosen": [u("2 + 2?"), a("4")], "rejected": [u("2 + 2?"), a("5")], "score": 1},
     {"score": 1, "prompt": [u("2 + 2?")], "chosen": [a("4")], "rejected": [a("5")]}),
    # implicit, multi-turn, the responses differing in their last turn: every shared turn up to the last user one
    ("preferences", {"chosen": [u("3 + 4?"), a("7"), u("plus 5?"), a("12")],
                     "rejected": [u("3 + 4?"), a("7"), u("plus 5?"), a("13")]},
     {"prompt": [u("3 + 4?"), a("7"), u("plus 5?")], "chosen": [a("12")], "rejected": [a("13")]}),
    # implicit, the responses equal in their first turn: the prompt stops at the last shared user turn
    ("preferences", {"chosen": [u("q"), a("same"), u("more?"), a("yes")], "rejected": [u("q"), a("same")]},
     {"prompt": [u("q")], "chosen": [a("same"), u("more?"), a("yes")], "rejected": [a("same")]}),
    # explicit prompt repeated at the start of chosen and rejected (HuggingFaceH4/ultrafeedback_binarized)
    ("preferences", {"prompt": "2 + 2?", "chosen": [u("2 + 2?"), a("4")], "rejected": [u("2 + 2?"), a("5")]},
     {"prompt": [u("2 + 2?")], "chosen": [a("4")], "rejected": [a("5")]}),
]  # fmt: skip


@pytest.mark.parametrize("fmt, row, ours", CONVERTED)
def test_trl_rows_become_ours(fmt, row, ours):
    assert check_row(row, fmt, "f.jsonl:1") == ours
    assert check_row(ours, fmt, "f.jsonl:1") == ours  # ours stays as it is


REFUSED = [
    ("conversations", {"text": "plain text"}, "a 'text' row is language-modelling data"),
    ("conversations", {"prompt": "hi"}, "missing field 'messages' (or TRL's 'prompt' and 'completion')"),
    ("conversations", {"prompt": "hi", "completion": 3}, "completion must be a string or a list of messages"),
    ("preferences", {"chosen": "The sky is blue.", "rejected": "The sky is green."},
     "without a 'prompt' field, chosen and rejected must be whole conversations"),
    ("preferences", {"chosen": [u("a"), a("x")], "rejected": [u("b"), a("y")]}, "share no user turn"),
    ("preferences", {"chosen": [u("a"), a("x")], "rejected": [u("a")]}, "has no response after the shared"),
    ("preferences", {"chosen": [u("a"), a("x")], "rejected": [u("a"), a("x")]}, "chosen and rejected are identical"),
    ("preferences", {"prompt": "q", "chosen": [a("x"), u("y")], "rejected": "z"},
     "chosen must end with an assistant turn"),
]  # fmt: skip


@pytest.mark.parametrize("fmt, row, message", REFUSED)
def test_rows_of_no_format_are_refused_with_their_place(fmt, row, message):
    with pytest.raises(ChatFormatError) as e:
        check_row(row, fmt, "f.jsonl:7")
    assert str(e.value).startswith("f.jsonl:7") and message in str(e.value)


def _lines(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_jsonl_bad_rows_are_dropped_up_to_the_limit_else_all_listed(tmp_path):
    good = {"prompt": "q", "completion": "a"}
    p = _lines(tmp_path / "d.jsonl", [good] * 8 + ["{broken", {"prompt": "only"}])
    rows, bad = read_rows(str(p), "conversations", max_bad=0.2, key="data.max_bad_fraction")
    assert len(rows) == 8 and [b.split(": ")[0] for b in bad] == [f"{p}:9", f"{p}:10"]
    with pytest.raises(DataError) as e:
        read_rows(str(p), "conversations", max_bad=0.1, key="data.max_bad_fraction")
    msg = str(e.value)
    assert f"{p}:9: not valid JSON" in msg and f"{p}:10: missing field 'messages'" in msg
    assert "2 of 10 rows of" in msg and "limit data.max_bad_fraction 0.1" in msg
    with pytest.raises(DataError, match=r"no such file"):
        read_rows(str(tmp_path / "missing.jsonl"), "conversations")


def _dataset(rows: list[dict]):
    import datasets

    return datasets.Dataset.from_list(rows)


@pytest.fixture
def hub(monkeypatch):
    """`datasets.load_dataset` patched: {(name, split): rows} served as in-memory datasets; an unknown split
    raises as the real client does."""
    import datasets

    served: dict[tuple[str, str], list[dict]] = {}

    def load_dataset(name, split=None, streaming=False, **kw):
        if (name, split) not in served:
            raise ValueError(
                f'Unknown split "{split}". Should be one of {sorted(s for n, s in served if n == name)}.'
            )
        return _dataset(served[(name, split)])

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return served


ULTRA = "HuggingFaceH4/ultrafeedback_binarized"


def _ultra_row(i: int, bad: bool = False) -> dict:
    q = f"What is {i} + 1?"
    return {"prompt": q, "prompt_id": f"p{i}", "score_chosen": 8.0, "score_rejected": 3.0,
            "chosen": [u(q), a(str(i + 1))], "rejected": [u(q), a("" if bad else str(i + 2))]}  # fmt: skip


def test_hub_preferences_with_named_splits_and_the_bad_row_policy(hub):
    hub[(ULTRA, "train_prefs")] = [_ultra_row(i) for i in range(9)] + [_ultra_row(9, bad=True)]
    hub[(ULTRA, "test_prefs")] = [_ultra_row(i) for i in range(3)]
    rm = RMConfig(source="hf", train_file=ULTRA, eval_file=ULTRA, hf_train_split="train_prefs",
                  hf_eval_split="test_prefs", max_bad_fraction=0.1)  # fmt: skip
    from posttrain.stages.rm import read_pairs

    train, ev, counts = read_pairs(rm, "fold")
    assert len(train) == 9 and len(ev) == 3 and counts["bad_rows"] == 1
    assert train[0]["prompt"] == [u("What is 0 + 1?")] and train[0]["chosen"] == [a("1")]
    assert train[0]["_where"] == f"{ULTRA}:train_prefs:0" and train[0]["prompt_id"] == "p0"
    with pytest.raises(DataError) as e:  # the same rows with no bad row allowed
        read_source("hf", ULTRA, "train_prefs", "preferences", "fold", 0.0, "rm.max_bad_fraction")
    assert f"{ULTRA}:train_prefs:9 (rejected), turn 2: assistant message is empty" in str(e.value)
    assert "limit rm.max_bad_fraction 0.0" in str(e.value)
    with pytest.raises(DataError, match=r"cannot load split 'train' of dataset .*Unknown split"):
        read_source("hf", ULTRA, "train", "preferences", "fold", 0.0, "rm.max_bad_fraction")


def test_the_validate_command_reads_a_dataset_split(hub, capsys):
    from posttrain.cli import main

    hub[("org/chat", "train_sft")] = [{"messages": [u("hi"), a("hello")]}, {"messages": [u("hi")]}]
    assert main(["validate", "org/chat", "--split", "train_sft"]) == 1
    out = capsys.readouterr().out
    assert "org/chat:train_sft:1: a conversation must end with an assistant turn" in out
    assert "org/chat:train_sft:0" not in out
    rows, errors = hf_rows("org/chat", "train_sft", "prompts", "fold")
    assert len(rows) == 1 and rows[0]["id"] == "train_sft-000001" and len(errors) == 1


def test_the_readme_command_for_a_hub_split(hub, capsys):
    from posttrain.cli import main

    hub[(ULTRA, "train_prefs")] = [_ultra_row(i) for i in range(1200)]
    assert (
        main(["validate", ULTRA, "--split", "train_prefs", "--format", "preferences", "--rows", "1000"]) == 0
    )
    assert f"{ULTRA}: 1000 rows, all valid (preferences)" in capsys.readouterr().out


@pytest.mark.stage
def test_the_data_stage_reads_trl_rows_and_drops_bad_ones_within_the_limit(tmp_path):
    train = _lines(tmp_path / "train.jsonl", [{"prompt": f"What is {i} + {i + 3}?", "completion": str(2 * i + 3)}
                                               for i in range(40)] + [{"prompt": "no completion"}])  # fmt: skip
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"extends: {ROOT / 'recipes/tiny/pipeline.yaml'}\nname: trl\noutput_dir: {tmp_path / 'runs'}\n"
                      f"data:\n  source: jsonl\n  train: {train}\n  max_bad_fraction: 0.05\n")  # fmt: skip
    out = subprocess.run([sys.executable, "-m", "posttrain", "stage", "data", str(recipe)],
                         capture_output=True, text=True, cwd=ROOT)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert (
        f"[data] train: dropped 1 bad row(s) (data.max_bad_fraction 0.05): {train}:41: missing field"
        in out.stdout
    )
    folder = tmp_path / "runs" / "trl" / "data"
    report = json.loads((folder / "data_report.json").read_text())
    assert report["bad_rows"]["train"]["count"] == 1
    assert "| dropped: bad rows (data.max_bad_fraction) | 1 |" in (folder / "data_report.md").read_text()
    rows = [json.loads(x) for x in (folder / "data" / "train.jsonl").read_text().splitlines()]
    assert rows and all(r["messages"][0]["role"] == "user" and "prompt" not in r for r in rows)
