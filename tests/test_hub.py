"""`posttrain push`: the finished model folder only, card included, through `huggingface_hub.HfApi` (patched at its
API boundary: `get_token`, `HfApi.create_repo`, `HfApi.upload_folder`); clear errors before any upload."""

from __future__ import annotations

from pathlib import Path

import huggingface_hub
import pytest

from posttrain.chat import chat_template
from posttrain.config import ModelSpec
from posttrain.hub import PushError, push
from posttrain.modeling import load_causal_lm, save_model
from posttrain.outputs import StageOutput


class FakeApi:
    calls: list[tuple[str, dict]] = []

    def __init__(self, token=None):
        FakeApi.calls.append(("init", {"token": token}))

    def create_repo(self, repo_id, **kw):
        FakeApi.calls.append(("create_repo", {"repo_id": repo_id, **kw}))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, **kw):
        files = sorted(p.name for p in Path(kw["folder_path"]).iterdir())
        FakeApi.calls.append(("upload_folder", {**kw, "files": files}))
        return type("Commit", (), {"commit_url": f"https://huggingface.co/{kw['repo_id']}/commit/abc"})()


@pytest.fixture
def hub(monkeypatch):
    FakeApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_test")
    return FakeApi.calls


def _finished_stage(tmp_path: Path, tokenizer, template: str | None = "fold") -> Path:
    with StageOutput(tmp_path / "runs" / "r" / "sft", "sft", {"lr": 1}, {"generate": "abc123"}) as out:
        model = load_causal_lm(ModelSpec(preset="tiny-student"), tokenizer)
        save_model(model, tokenizer, out.path / "model", chat_template=template and chat_template(template))
        (out.path / "checkpoints" / "checkpoint-2").mkdir(parents=True)  # never uploaded
        (out.path / "checkpoints" / "checkpoint-2" / "optimizer.pt").write_bytes(b"x")
        out.summary = {"world_score": 0.5}
    return out.final


def test_push_uploads_the_model_folder_only_with_its_card(hub, tmp_path, tiny_tokenizer, capsys):
    from posttrain.cli import main

    stage = _finished_stage(tmp_path, tiny_tokenizer)
    assert main(["push", str(stage), "--repo-id", "me/tiny-sft", "--private"]) == 0
    assert "https://huggingface.co/me/tiny-sft/commit/abc" in capsys.readouterr().out
    calls = dict(hub)
    assert calls["init"] == {"token": "hf_test"}
    assert calls["create_repo"] == {
        "repo_id": "me/tiny-sft",
        "private": True,
        "exist_ok": True,
        "repo_type": "model",
    }
    upload = calls["upload_folder"]
    assert upload["folder_path"] == str(stage / "model") and upload["repo_id"] == "me/tiny-sft"
    assert {"README.md", "config.json", "model.safetensors", "chat_template.jinja"} <= set(upload["files"])
    assert "checkpoints" not in upload["files"] and "DONE" not in upload["files"]
    assert "posttrain: r/sft (config " in upload["commit_message"]
    card = (stage / "model" / "README.md").read_text()
    assert "| parents | `generate` (`abc123`) |" in card and "| world_score | 0.5 |" in card


def test_no_token_is_a_clear_error_and_nothing_is_uploaded(hub, tmp_path, tiny_tokenizer, monkeypatch):
    stage = _finished_stage(tmp_path, tiny_tokenizer)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(
        PushError, match=r"no Hugging Face token: log in with `hf auth login` \(or set HF_TOKEN\)"
    ):
        push(stage, "me/tiny-sft")
    assert hub == []


def test_what_cannot_be_pushed_is_refused_before_the_hub(hub, tmp_path, tiny_tokenizer):
    stage = _finished_stage(tmp_path, tiny_tokenizer)
    with pytest.raises(PushError, match="is not a hub repo id"):
        push(stage, "not/a/repo")
    with pytest.raises(PushError, match="has no exported model"):
        push(stage.parent, "me/x")
    partial = stage.with_name("sft.partial")
    stage.rename(partial)
    with pytest.raises(PushError, match=r"unfinished or failed attempt \(\.partial\)"):
        push(partial, "me/x")
    old = _finished_stage(tmp_path / "old", tiny_tokenizer, template=None)  # the hub template, not training's
    with pytest.raises(PushError, match="does not carry posttrain's chat template"):
        push(old / "model", "me/x")
    assert hub == []
