"""SFT over TRL's SFTTrainer fed by the renderer: real steps on the tiny student, the guards, accumulation, LoRA."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from posttrain.config import ChatConfig, ConfigError, ModelSpec, TrainConfig, from_dict, load_recipe
from posttrain.engines.sft import make_trainer, sft_args, to_dataset, tokenize_rows
from posttrain.engines.trainer import TrainingError, check_log, finalize, last_checkpoint
from posttrain.modeling import load_causal_lm

ROOT = Path(__file__).resolve().parents[1]
CHAT = ChatConfig(max_length=96)
ROWS = [
    {"id": f"r{i}", "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
    for i, (q, a) in enumerate(
        [
            ("What is 2 + 3?", "5"),
            ("Reverse the word: cat", "tac"),
            ("Who are you?", "I am Pip."),
            ("Sort these letters: c a b", "a b c"),
        ]
    )  # fmt: skip
]


def _trainer(tok, tmp_path, rows=ROWS, seed=0, wandb=False, **kw):
    cfg = from_dict(TrainConfig, {"steps": 4, "batch_size": 4, "learning_rate": 1e-2, "warmup_ratio": 0.0,
                         "lr_scheduler": "constant", "save_steps": 1000, "logging_steps": 1, **kw})  # fmt: skip
    model = load_causal_lm(ModelSpec(preset="tiny-student"), tok, seed=seed)
    args = sft_args(cfg, tmp_path / "ckpt", seed, CHAT.max_length, False, wandb, "test")
    logs: list[dict] = []
    trainer = make_trainer(
        model, tok, to_dataset(tokenize_rows(rows, tok, CHAT)), None, cfg, args, logs.append
    )
    return trainer, cfg, logs


def test_labels_are_the_renderers_mask(tiny_tokenizer):
    ex = tokenize_rows(ROWS[:1], tiny_tokenizer, CHAT)[0]
    trained = [t for t in ex["labels"] if t != -100]
    assert tiny_tokenizer.decode(trained, skip_special_tokens=False) == "5<end_of_turn>"
    assert (
        ex["input_ids"][0] == tiny_tokenizer.bos_token_id
        and ex["input_ids"].count(tiny_tokenizer.bos_token_id) == 1
    )


def test_row_without_room_for_its_response_is_an_error(tiny_tokenizer):
    long = [
        {
            "id": "long",
            "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x" * 200}],
        }
    ]
    with pytest.raises(TrainingError, match="long: no trained token fits"):
        tokenize_rows(long, tiny_tokenizer, CHAT)


@pytest.mark.stage
def test_real_steps_change_every_parameter_and_lower_the_loss(tiny_tokenizer, tmp_path):
    trainer, cfg, logs = _trainer(tiny_tokenizer, tmp_path, steps=12)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    unchanged = [n for n, p in trainer.model.named_parameters() if torch.equal(p.detach(), before[n])]
    assert unchanged == []
    losses = [r["loss"] for r in logs if "loss" in r]
    assert all(math.isfinite(x) for x in losses) and len(losses) == 12
    assert losses[-1] < 0.5 * losses[0]  # the same 4 conversations every step: the loss must fall
    assert all("step" in r for r in logs)


@pytest.mark.stage
def test_gradient_accumulation_1x4_equals_4x1(tiny_tokenizer, tmp_path):
    """One optimizer step over the same 4 conversations: batch 4 × accum 1 vs batch 1 × accum 4 (SGD, so the
    update is the gradient itself)."""
    trained = []
    for bs, acc in ((4, 1), (1, 4)):
        tr, _, _ = _trainer(tiny_tokenizer, tmp_path / f"{bs}x{acc}", steps=1, batch_size=bs, grad_accum=acc,
                            max_grad_norm=1e9, trl={"optim": "sgd"})  # fmt: skip
        init = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
        tr.train()
        trained.append({n: p.detach() - init[n] for n, p in tr.model.named_parameters()})
    worst = max((trained[0][n] - trained[1][n]).abs().max().item() for n in trained[0])
    scale = max(trained[0][n].abs().max().item() for n in trained[0])
    assert scale > 1e-4  # the step did something
    assert worst < 1e-5, worst


def test_length_buckets_cut_each_batch_by_length_and_train_as_one_batch(tiny_tokenizer, tmp_path):
    """length_buckets 2: the step's 4 rows come as 2 micro-batches, the shorter rows in one and the longer in the
    other, each padded to its own longest row; the update equals one batch of the same 4 rows (SGD)."""
    trained = []
    for buckets in (1, 2):
        tr, _, _ = _trainer(tiny_tokenizer, tmp_path / f"b{buckets}", steps=1, length_buckets=buckets,
                            max_grad_norm=1e9, trl={"optim": "sgd"}, seed=0)  # fmt: skip
        if buckets == 2:
            micro = list(tr.get_train_dataloader())[:2]
            lens = [m["attention_mask"].sum(-1).tolist() for m in micro]
            assert sum(len(x) for x in lens) == 4
            assert max(lens[0]) <= min(lens[1]) or max(lens[1]) <= min(lens[0])
            assert [m["input_ids"].shape[1] for m in micro] == [
                max(x) for x in lens
            ]  # padded to its own longest
            assert tr._get_train_sampler().seed == tr.args.data_seed
        init = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
        tr.train()
        trained.append({n: p.detach() - init[n] for n, p in tr.model.named_parameters()})
    worst = max((trained[0][n] - trained[1][n]).abs().max().item() for n in trained[0])
    assert max(trained[0][n].abs().max().item() for n in trained[0]) > 1e-4
    assert worst < 1e-5, worst


def test_length_buckets_must_divide_the_batch_and_serve_sft_stages_only():
    with pytest.raises(ConfigError, match="length_buckets: 3 must divide batch_size"):
        from_dict(TrainConfig, {"batch_size": 4, "length_buckets": 3})
    with pytest.raises(ConfigError, match="rlhf.train.length_buckets: only the SFT stages"):
        load_recipe(ROOT / "recipes/tiny/pipeline.yaml", ["rlhf.train.length_buckets=2"])


@pytest.mark.stage
def test_micro_batch_without_trained_token_is_an_error(tiny_tokenizer, tmp_path):
    trainer, _, _ = _trainer(tiny_tokenizer, tmp_path)
    ex = tokenize_rows(ROWS, tiny_tokenizer, CHAT)
    for e in ex:
        e["labels"] = [-100] * len(e["labels"])
    trainer.train_dataset = to_dataset(ex)
    with pytest.raises(TrainingError, match="no trained token"):
        trainer.train()


def test_loss_zero_with_nan_grad_norm_is_fatal():
    with pytest.raises(TrainingError, match="loss 0.0 with grad norm nan"):
        check_log(3, {"loss": 0.0, "grad_norm": float("nan")})
    with pytest.raises(TrainingError, match="loss is inf"):
        check_log(3, {"loss": float("inf"), "grad_norm": 1.0})
    assert check_log(3, {"loss": 0.5, "grad_norm": 1.0, "note": "x"}) == {
        "step": 3,
        "loss": 0.5,
        "grad_norm": 1.0,
    }


def test_trl_passthrough_keys_are_checked():
    with pytest.raises(ConfigError) as e:
        from_dict(TrainConfig, {"trl": {"optimm": "sgd", "max_steps": 3}, "steps": 0})
    msg = str(e.value)
    assert "trl.optimm: not a trl.SFTConfig field; did you mean 'optim'?" in msg
    assert "trl.max_steps: set by the recipe's own key" in msg
    assert "steps: 0 must be at least 1" in msg


@pytest.mark.stage
def test_lora_adapter_saves_loads_and_merges(tiny_tokenizer, tmp_path):
    from peft import PeftModel

    trainer, cfg, _ = _trainer(tiny_tokenizer, tmp_path, steps=3, lora={"enabled": True, "r": 4, "alpha": 8})
    assert cfg.lora.enabled and cfg.lora.r == 4
    trainer.train()
    trainer.model.save_pretrained(tmp_path / "adapter")
    merged = finalize(trainer, cfg)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    base = load_causal_lm(ModelSpec(preset="tiny-student"), tiny_tokenizer, seed=0)
    assert any(not torch.equal(p, base.state_dict()[n]) for n, p in merged.state_dict().items())
    reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter").merge_and_unload()
    ids = torch.tensor([tokenize_rows(ROWS[:1], tiny_tokenizer, CHAT)[0]["input_ids"]])
    torch.testing.assert_close(reloaded(ids).logits, merged(ids).logits, atol=1e-5, rtol=1e-5)
    assert torch.equal(reloaded.lm_head.weight, reloaded.model.embed_tokens.weight)


@pytest.mark.stage
def test_checkpoints_are_complete_and_resume_continues(tiny_tokenizer, tmp_path):
    trainer, _, logs = _trainer(tiny_tokenizer, tmp_path, steps=4, save_steps=2)
    trainer.train()
    full = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    ckpt = last_checkpoint(tmp_path / "ckpt")
    assert ckpt is not None and ckpt.name == "checkpoint-4"
    (tmp_path / "ckpt" / "checkpoint-9").mkdir()  # a half-written one (no trainer state) is never picked
    assert last_checkpoint(tmp_path / "ckpt").name == "checkpoint-4"
    resumed, _, _ = _trainer(tiny_tokenizer, tmp_path / "again", steps=4, save_steps=2)
    resumed.train(resume_from_checkpoint=str(tmp_path / "ckpt" / "checkpoint-2"))
    for n, p in resumed.model.named_parameters():
        torch.testing.assert_close(p.detach(), full[n], atol=1e-6, rtol=1e-5)


@pytest.mark.stage
def test_checkpoint_retention_and_weights_only_checkpoints(tiny_tokenizer, tmp_path, capsys):
    from posttrain.engines.trainer import train_resuming

    trainer, _, _ = _trainer(
        tiny_tokenizer, tmp_path, steps=6, save_steps=2
    )  # the defaults: 2 kept, optimizer
    trainer.train()
    kept = sorted(p.name for p in (tmp_path / "ckpt").glob("checkpoint-*"))
    assert (
        kept == ["checkpoint-4", "checkpoint-6"]
        and (tmp_path / "ckpt" / "checkpoint-6" / "optimizer.pt").exists()
    )
    lean, _, _ = _trainer(tiny_tokenizer, tmp_path / "lean", steps=6, save_steps=2, keep_checkpoints=1,
                          save_optimizer=False)  # fmt: skip
    lean.train()
    ckpts = list((tmp_path / "lean" / "ckpt").glob("checkpoint-*"))
    assert [p.name for p in ckpts] == ["checkpoint-6"] and not (ckpts[0] / "optimizer.pt").exists()
    size = lambda d: sum(f.stat().st_size for f in d.rglob("*") if f.is_file())  # noqa: E731
    assert size(ckpts[0]) < size(tmp_path / "ckpt" / "checkpoint-6") / 2  # Adam's state: twice the weights
    assert last_checkpoint(ckpts[0].parent) is None and last_checkpoint(ckpts[0].parent, weights_only=True)
    again, _, _ = _trainer(tiny_tokenizer, tmp_path / "lean", steps=6, save_steps=2, keep_checkpoints=1,
                           save_optimizer=False)  # fmt: skip
    train_resuming(again, tmp_path / "lean" / "ckpt", tmp_path / "lean" / "metrics.jsonl", "sft")
    assert "hold no optimizer state (save_optimizer: false): training starts over" in capsys.readouterr().out


def test_retention_keys_and_hub_uploads_are_recipe_keys_not_trl_ones():
    from posttrain.config import ConfigError

    for key, says in (("save_total_limit", "'keep_checkpoints'"), ("save_only_model", "'save_optimizer'"),
                      ("push_to_hub", "posttrain push RUN/STAGE --repo-id ID")):  # fmt: skip
        with pytest.raises(ConfigError, match=f"trl.{key}: .*{says}"):
            from_dict(TrainConfig, {"trl": {key: True}})
    with pytest.raises(ConfigError, match="keep_checkpoints: 0 must be at least 1"):
        from_dict(TrainConfig, {"keep_checkpoints": 0})


def test_packing_with_eager_attention_is_refused(tmp_path):
    """Packed sequences attend across their boundaries under eager attention (measured: logits of the second
    sequence change by ~0.7), so the recipe refuses it before any model loads."""
    from posttrain.config import load_recipe

    with pytest.raises(ConfigError, match="sft.packing: packed sequences would attend to each other"):
        load_recipe("recipes/tiny/pipeline.yaml", ["sft.packing=true"])
    flash = ["sft.packing=true", "model.attn_implementation=flash_attention_2"]
    with pytest.raises(ConfigError, match="length_buckets: packed rows have no padding"):
        load_recipe("recipes/tiny/pipeline.yaml", flash)  # the tiny recipe cuts its batches in 2
    r = load_recipe("recipes/tiny/pipeline.yaml", [*flash, "sft.length_buckets=1"])
    assert r.sft.packing


WANDB_KEYS = ("WANDB_MODE", "WANDB_DIR", "WANDB_PROJECT", "WANDB_RUN_GROUP", "WANDB_JOB_TYPE")


@pytest.fixture
def clean_wandb_env(monkeypatch):
    for k in WANDB_KEYS:  # set then delete: monkeypatch restores the original state whatever the test sets
        monkeypatch.setenv(k, "x")
        monkeypatch.delenv(k)
    monkeypatch.setenv("WANDB_SILENT", "true")


def test_wandb_runs_offline_in_the_run_folder_one_run_per_stage_grouped_by_recipe_run(
    tiny_tokenizer, tmp_path, clean_wandb_env
):
    import os

    from posttrain.config import TrackingConfig
    from posttrain.engines.trainer import tracking_env

    tracking_env(TrackingConfig(wandb=True), "tiny", "sft", tmp_path / "run")
    assert {k: os.environ[k] for k in WANDB_KEYS} == {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path / "run"),
        "WANDB_PROJECT": "posttrain", "WANDB_RUN_GROUP": "tiny", "WANDB_JOB_TYPE": "sft"}  # fmt: skip
    trainer, _, logs = _trainer(tiny_tokenizer, tmp_path, wandb=True, steps=2)
    assert [type(c).__name__ for c in trainer.callback_handler.callbacks].count("SafeWandb") == 1
    trainer.train()
    import wandb

    assert wandb.run is None  # finished with the training run
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("run-*.wandb")), runs
    assert len([r for r in logs if "loss" in r]) == 2


def test_a_failing_tracker_never_stops_training(
    tiny_tokenizer, tmp_path, clean_wandb_env, monkeypatch, capsys
):
    import wandb

    def broken(*args, **kwargs):
        raise ConnectionError("no route to the wandb server")

    monkeypatch.setattr(wandb, "init", broken)
    monkeypatch.setenv("WANDB_MODE", "online")
    trainer, _, logs = _trainer(tiny_tokenizer, tmp_path, wandb=True, steps=2)
    trainer.train()
    assert len([r for r in logs if "loss" in r]) == 2
    err = capsys.readouterr().err
    assert err.count("[tracking] wandb failed, training goes on without it: ConnectionError") == 1, err


@pytest.mark.stage
def test_train_resuming_continues_from_the_last_checkpoint_and_drops_later_metric_rows(
    tiny_tokenizer, tmp_path, capsys
):
    import json
    import shutil

    from posttrain.engines.trainer import train_resuming

    first, _, _ = _trainer(tiny_tokenizer, tmp_path, steps=4, save_steps=2)
    first.train()
    shutil.rmtree(
        tmp_path / "ckpt" / "checkpoint-4"
    )  # killed after step 3: the last complete checkpoint is 2
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3)))
    again, _, _ = _trainer(tiny_tokenizer, tmp_path, steps=4, save_steps=2)
    result = train_resuming(again, tmp_path / "ckpt", metrics, "sft")
    assert f"[sft] resuming from {tmp_path / 'ckpt' / 'checkpoint-2'} (step 2)" in capsys.readouterr().out
    assert [json.loads(x)["step"] for x in metrics.read_text().splitlines()] == [1, 2]
    assert again.state.global_step == 4 and result.global_step == 4
    for n, p in again.model.named_parameters():
        torch.testing.assert_close(
            p.detach(), dict(first.model.named_parameters())[n].detach(), atol=1e-6, rtol=1e-5
        )
    fresh, _, _ = _trainer(tiny_tokenizer, tmp_path / "fresh", steps=1)
    train_resuming(
        fresh, tmp_path / "ckpt", metrics, "sft", resume=False
    )  # a new run ignores old checkpoints
    assert "resuming" not in capsys.readouterr().out
