"""The smoke recipe end to end through the runner: data → teacher → generate → sft → distill → rm → rlhf (two runs)
→ merge, each its own process;
reruns skip; a changed key reruns exactly the affected stages; a killed generate stage resumes from its shards."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from posttrain import runner
from posttrain.config import load_recipe
from posttrain.outputs import read_done

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "recipes" / "tiny" / "smoke.yaml")


def _run(*args: str) -> str:
    p = subprocess.run([sys.executable, "-m", "posttrain", *args], capture_output=True, text=True, cwd=ROOT)
    first = p.stderr.find("Traceback")  # the first failure's own trace, before the launcher's summary
    assert p.returncode == 0, (
        p.stdout[-3000:] + (p.stderr[first : first + 4000] if first >= 0 else "") + p.stderr[-3000:]
    )
    return p.stdout


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    log = _run("run", SMOKE, f"--set=output_dir={out}")
    return out / "tiny-smoke", log


@pytest.mark.stage
def test_every_stage_runs_and_hands_over(smoke_run):
    run, log = smoke_run
    for stage in ("data", "teacher", "generate", "sft", "distill", "rm", "rlhf", "merge", "eval"):
        assert read_done(run / stage) is not None, stage
        assert not (run / f"{stage}.partial").exists()
    for stage in ("teacher", "sft"):
        assert (run / stage / "model" / "model.safetensors").exists()
        assert not (run / stage / "checkpoints").exists()
        summary = json.loads((run / stage / "metrics.jsonl").read_text().splitlines()[-1])
        assert summary["summary"] and summary["train_loss"] > 0
        ev = json.loads((run / stage / "eval.json").read_text())
        assert set(ev["after"]["per_task"]) == {
            "add",
            "reverse",
            "sort",
            "count",
            "identity",
            "refuse",
            "followup",
        }
    mix = json.loads((run / "data" / "data_report.json").read_text())["mix"]
    assert set(mix) == set(load_recipe(SMOKE).world.mix) and "World task families" in log
    # the sft stage's parent is generate, whose parents are data and teacher
    assert set(read_done(run / "sft")["parents"]) == {"generate"}
    assert set(read_done(run / "generate")["parents"]) == {"data", "teacher"}
    rows = [json.loads(x) for x in (run / "generate" / "data" / "train.jsonl").read_text().splitlines()]
    assert rows and all(r["meta"]["teacher"].endswith("teacher/model") for r in rows)
    recipe = load_recipe(SMOKE)
    assert all(r["meta"]["sampling"]["temperature"] == recipe.generate.temperature for r in rows)
    assert "## Teacher responses" in log and "## Reward model" in log
    for stage in ("teacher", "sft", "distill", "rm", "rlhf", "merge"):  # read back by the runner
        assert f"[run] {stage}: exported models read back complete (" in log, stage
    assert "## World evaluation" in log and "| sft: trained | **" in log and "| teacher: untrained |" in log
    assert set(read_done(run / "rm")["parents"]) == {"data", "distill", "teacher"}  # pairs from RL's start
    gate = json.loads((run / "rm" / "rm_report.json").read_text())
    assert gate["held_out"]["pairs"] > 0 and 0 <= gate["held_out"]["accuracy"] <= 1
    assert (run / "rm" / "model" / "model.safetensors").exists()


@pytest.mark.stage
def test_distill_rlhf_and_merge_hand_over(smoke_run):
    import torch

    from posttrain.config import ModelSpec, SamplingConfig
    from posttrain.generation import generate
    from posttrain.modeling import load_causal_lm, load_tokenizer

    run, log = smoke_run
    assert set(read_done(run / "distill")["parents"]) == {"sft", "generate", "teacher"}
    ev = json.loads((run / "distill" / "eval.json").read_text())
    assert {"sft", "distill", "teacher", "gap_closed"} <= set(ev)
    rows = [json.loads(x) for x in (run / "distill" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert steps and all("completions/mean_length" in r and "completions/clipped_ratio" in r for r in steps)
    # RL starts from the distilled student; two runs, each with its model, figures and curves
    assert set(read_done(run / "rlhf")["parents"]) == {"data", "distill", "rm"}
    evals = [json.loads(x) for x in (run / "data" / "data" / "eval.jsonl").read_text().splitlines()]
    for name in ("kl0.02", "kl0.1"):
        folder = run / "rlhf" / name
        assert (folder / "model" / "model.safetensors").exists() and (
            folder / "curves.png"
        ).stat().st_size > 0
        fig = json.loads((folder / "figures.json").read_text())
        assert fig["kl_coef"] == float(name[2:]) and {"reward", "kl", "kl_k3", "world_score"} <= set(
            fig["end"]
        )
        assert fig["end"]["world_tasks"] == [r["task"] for r in evals][: len(fig["end"]["world_scores"])]
        rl_rows = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
        assert all(
            {"reward", "reward_std", "kl", "kl_k3", "entropy"} <= set(r) for r in rl_rows if "loss" in r
        )
    # the merge: start, both runs and the merges in one table and plot; the saved merge loads and generates
    points = json.loads((run / "merge" / "points.json").read_text())
    assert [p["kind"] for p in points].count("run") == 2 and any(p["kind"] == "merge" for p in points)
    assert (run / "merge" / "reward_kl.png").stat().st_size > 0 and "## Merge" in log
    tok = load_tokenizer(ModelSpec(name_or_path=str(run / "merge" / "model")))
    merged = load_causal_lm(ModelSpec(name_or_path=str(run / "merge" / "model")), tok)
    assert torch.equal(merged.lm_head.weight, merged.model.embed_tokens.weight)
    prompt = tok(
        "<bos><start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n", add_special_tokens=False
    )
    with torch.no_grad():
        assert torch.isfinite(merged(input_ids=torch.tensor([prompt["input_ids"]])).logits).all()
    gens = generate(merged, tok, [prompt["input_ids"]], SamplingConfig(max_new_tokens=4, temperature=0.0))
    # a barely trained model may answer with an immediate <end_of_turn>: tokens, or a stop within the budget
    assert len(gens) == 1 and not gens[0].malformed and (len(gens[0].ids) >= 1 or not gens[0].truncated)


EXPORTED = ["teacher", "sft", "distill", "rm", "rlhf/kl0.02", "rlhf/kl0.1", "merge"]


@pytest.mark.stage
def test_every_exported_model_has_training_s_chat_template_and_a_card(smoke_run):
    from transformers import AutoTokenizer

    from posttrain.chat import chat_template, render

    run, _ = smoke_run
    conversation = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is 2 + 3?"},
                    {"role": "assistant", "content": "5"}, {"role": "user", "content": "And 4 + 4?"}]  # fmt: skip
    for label in EXPORTED:
        model = run / label / "model"
        tok = AutoTokenizer.from_pretrained(model)  # as any other tool reads it
        assert tok.chat_template == chat_template("fold"), label
        ours = render(conversation, tok, add_generation_prompt=True)
        assert tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True) == ours.text
        card = (model / "README.md").read_text()
        done = read_done(run / label.split("/")[0])
        assert f"# tiny-smoke/{label}" in card and f"| config hash | `{done['config_hash']}`" in card, label
        assert all(f"`{p}` (`{h}`)" in card for p, h in done["parents"].items()), label
        assert "system policy `fold`" in card and "## Figures" in card and "| figure | value |" in card, label
    card = (run / "rlhf" / "kl0.02" / "model" / "README.md").read_text()
    end = json.loads((run / "rlhf" / "kl0.02" / "figures.json").read_text())["end"]
    assert f"| kl | {end['kl']:.4g} |" in card  # an RL run's own figures


@pytest.mark.stage
def test_the_reward_model_reads_as_a_sequence_classifier_and_its_card_says_what_the_score_is(smoke_run):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from posttrain.chat import render
    from posttrain.reward import last_token_rewards

    run, _ = smoke_run
    path = run / "rm" / "model"
    tok = AutoTokenizer.from_pretrained(path)
    model, info = AutoModelForSequenceClassification.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and model.config.num_labels == 1
    ids = render(
        [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"}], tok
    ).input_ids
    x = torch.tensor([ids])
    with torch.no_grad():
        logit = model(input_ids=x).logits[0, 0].item()
        w = model.config.posttrain_likelihood_weight
        model.config.posttrain_likelihood_weight = 0.0  # the head's part of posttrain's reward
        head = last_token_rewards(model, x, torch.ones_like(x)).item()
    assert abs(logit - head) < 1e-5
    card = (path / "README.md").read_text()
    assert (
        "AutoModelForSequenceClassification.from_pretrained" in card
        and "pipeline_tag: text-classification" in card
    )
    assert w > 0 and f"adds {w:g} × the model's own log-likelihood" in card
    # the report's and the card's standard read is what transformers gives on the held-out pairs
    from posttrain.config import load_recipe as recipe_of
    from posttrain.engines.reward_model import tokenize_pairs

    pairs = [json.loads(x) for x in (run / "rm" / "data" / "eval.jsonl").read_text().splitlines()]
    ex, _ = tokenize_pairs(pairs, tok, recipe_of(SMOKE).chat)
    with torch.no_grad():
        wins = [bool(model(input_ids=torch.tensor([e["chosen_ids"]])).logits[0, 0]
                     > model(input_ids=torch.tensor([e["rejected_ids"]])).logits[0, 0]) for e in ex]  # fmt: skip
    read = json.loads((run / "rm" / "rm_report.json").read_text())["trained_head"]["accuracy"]
    assert read == pytest.approx(sum(wins) / len(wins), abs=1e-4)
    assert f"as transformers reads it, it ranks {read:.4g}" in card
    assert "Read as any library reads the saved model" in (run / "rm" / "rm_report.md").read_text()


@pytest.mark.stage
def test_the_readme_s_push_commands_upload_the_model_folders_only(smoke_run, monkeypatch):
    import huggingface_hub

    from posttrain.cli import main

    run, _ = smoke_run
    uploads = []

    class Api:  # the hub client at its API boundary
        def __init__(self, token=None):
            assert token == "hf_test"

        def create_repo(self, repo_id, private=False, **kw):
            uploads.append(("repo", repo_id, private))

        def upload_folder(self, repo_id, folder_path, **kw):
            uploads.append(("files", repo_id, sorted(p.name for p in Path(folder_path).rglob("*"))))
            return "https://huggingface.co/commit"

    monkeypatch.setattr(huggingface_hub, "HfApi", Api)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_test")
    assert main(["push", str(run / "merge"), "--repo-id", "me/tiny-merge", "--private"]) == 0
    assert main(["push", str(run / "rlhf" / "kl0.02"), "--repo-id", "me/tiny-rl-kl0.02"]) == 0
    assert uploads[0] == ("repo", "me/tiny-merge", True) and uploads[2] == (
        "repo",
        "me/tiny-rl-kl0.02",
        False,
    )
    for _, _, files in (uploads[1], uploads[3]):
        assert {"README.md", "model.safetensors", "config.json", "chat_template.jinja"} <= set(files)
        assert not any(f.startswith("checkpoint") or f in ("DONE", "metrics.jsonl") for f in files)


@pytest.mark.stage
def test_rerun_skips_and_a_changed_key_reruns_only_what_depends_on_it(smoke_run):
    run, _ = smoke_run
    out = str(run.parent)
    log = _run("run", SMOKE, f"--set=output_dir={out}", "--dry-run")
    assert log.count("[run] skip") == 9
    log = _run("run", SMOKE, f"--set=output_dir={out}", "--set=sft.learning_rate=1e-3", "--dry-run")
    assert "skip data" in log and "skip teacher" in log and "skip generate" in log
    assert "[run] sft (config or parents changed)" in log and "[run] rm (config or parents changed)" in log
    assert "[run] merge (config or parents changed)" in log
    log = _run("run", SMOKE, f"--set=output_dir={out}", "--set=rlhf.kl_coef=0.2", "--dry-run")
    assert (
        log.count("[run] skip") == 6
        and "[run] rlhf (config" in log
        and "[run] eval (config" in log
        and "[run] merge (config" in log
    )
    log = _run("run", SMOKE, f"--set=output_dir={out}", "--set=generate.temperature=0.9", "--dry-run")
    assert "skip teacher" in log and "[run] generate (config" in log and "[run] sft (config" in log
    log = _run("run", SMOKE, f"--set=output_dir={out}", "--from", "generate", "--dry-run")
    assert "skip teacher" in log and "[run] generate (forced)" in log and "[run] rm (forced)" in log
    log = _run("run", SMOKE, f"--set=output_dir={out}", "--only", "teacher", "--force", "--dry-run")
    assert "skip data" in log and "[run] teacher (forced)" in log and "sft" not in log


@pytest.mark.stage
def test_killed_generate_resumes_from_its_last_shard(smoke_run, monkeypatch):
    import posttrain.generation as generation
    from posttrain.stages import generate as stage

    run, _ = smoke_run
    recipe = load_recipe(SMOKE, [f"output_dir={run.parent}"])
    first = (run / "generate" / "data" / "train.jsonl").read_text()
    real, calls = generation.generate, []

    def dies_on_second_shard(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return real(*a, **k)

    monkeypatch.setattr(generation, "generate", dies_on_second_shard)
    with pytest.raises(KeyboardInterrupt):
        stage.main(recipe, runner.parents_of(recipe, "generate"))
    assert read_done(run / "generate") is not None  # the finished output is untouched
    assert len(list((run / "generate.partial" / "shards").glob("*.jsonl"))) == 1
    calls.clear()
    monkeypatch.setattr(generation, "generate", lambda *a, **k: calls.append(1) or real(*a, **k))
    stage.main(recipe, runner.parents_of(recipe, "generate"))
    n_rows = len((run / "data" / "data" / "train.jsonl").read_text().splitlines())
    n_shards = -(-n_rows // recipe.generate.shard_size)
    assert n_shards >= 3
    assert len(calls) == n_shards - 1  # the finished shard was not generated again
    assert (run / "generate" / "data" / "train.jsonl").read_text() == first  # same result as uninterrupted


@pytest.mark.stage
def test_an_rm_taught_the_lms_log_probabilities_is_read_by_its_head_alone(smoke_run, tmp_path):
    """rm.likelihood_targets: the stage trains with the per-position term (logged), says so in its report, and
    saves a plain sequence classifier: no likelihood term in its config, its logit is posttrain's reward."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from posttrain.chat import render
    from posttrain.reward import last_token_rewards

    run, _ = smoke_run
    sets = [f"--set=output_dir={tmp_path}", "--set=rm.likelihood_weight=0", "--set=rm.likelihood_targets=1",
            "--set=rm.min_accuracy=0"]  # fmt: skip
    _run("run", SMOKE, *sets, "--only", "rm", "--reuse", str(run))
    out = tmp_path / "tiny-smoke" / "rm"
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any(row.get("likelihood_mse", 0) > 0 for row in logged)
    assert "`rm.likelihood_targets`" in (out / "rm_report.md").read_text()
    model = AutoModelForSequenceClassification.from_pretrained(out / "model").eval()
    assert not getattr(model.config, "posttrain_likelihood_weight", 0.0)
    ids = render([{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"}],
                 AutoTokenizer.from_pretrained(out / "model")).input_ids  # fmt: skip
    x = torch.tensor([ids])
    with torch.no_grad():
        logit, ours = (
            model(input_ids=x).logits[0, 0].item(),
            last_token_rewards(model, x, torch.ones_like(x)).item(),
        )
    assert abs(logit - ours) < 1e-5


@pytest.mark.stage
def test_rm_below_the_gate_fails_with_its_figures_and_keeps_the_last_good_rm(smoke_run):
    from posttrain.stages import rm

    run, _ = smoke_run
    good = (run / "rm" / "DONE").read_text()
    recipe = load_recipe(
        SMOKE, [f"output_dir={run.parent}", "rm.min_accuracy=1.0", "rm.train.learning_rate=1e-12"]
    )
    with pytest.raises(rm.GateError, match=r"held-out accuracy 0\.\d+ < rm.min_accuracy 1.0 \(loss"):
        rm.main(recipe, runner.parents_of(recipe, "rm"))
    assert (run / "rm" / "DONE").read_text() == good
    assert (run / "rm.partial" / "rm_report.md").exists() and not (run / "rm.partial" / "DONE").exists()
    # the runner does not retrain an RM that failed its gate with the same config; --force would
    sets = [
        f"--set=output_dir={run.parent}",
        "--set=rm.min_accuracy=1.0",
        "--set=rm.train.learning_rate=1e-12",
    ]
    p = subprocess.run([sys.executable, "-m", "posttrain", "run", SMOKE, "--only", "rm", *sets],
                       capture_output=True, text=True, cwd=ROOT)  # fmt: skip
    assert p.returncode == 1 and "rm: failed its quality gate with this config earlier" in p.stderr
    assert "[run] rm (" not in p.stdout and "< rm.min_accuracy 1.0" in p.stderr
    assert "[run] stage rm failed its quality gate; later stages were not started" in p.stderr


def test_bench_prints_the_generation_ratio(capsys):
    from posttrain import bench

    assert bench.main(["--recipe", SMOKE, "--prompts", "3", "--real-shape", ""]) == 0
    out = capsys.readouterr().out
    assert "| generation, 3 prompts" in out and "faster (outputs identical: 3/3)" in out


@pytest.mark.stage
def test_eval_stage_report_and_cli(smoke_run):
    run, log = smoke_run
    ev = json.loads((run / "eval" / "eval.json").read_text())
    assert list(ev) == ["sft", "distill", "rlhf/kl0.02", "rlhf/kl0.1", "merge"]
    assert (
        ev["sft"]["kl"] == 0.0 and ev["distill"]["win_rate_vs"] == "sft" and 0 <= ev["merge"]["win_rate"] <= 1
    )
    for key in (
        "world_score",
        "reward",
        "kl_k3",
        "refusal_unsafe",
        "refusal_safe",
        "identity",
        "format_spread",
    ):
        assert all(key in r for r in ev.values()), key
    assert len(ev["sft"]["per_format"]) == 6
    # the run ends with the report; `posttrain report` rewrites it, `posttrain eval` measures one model
    assert f"[run] report: {run}/report.md" in log
    md = (run / "report.md").read_text()
    for part in ("| `merge` | done |", "## World evaluation", "## RL runs", "## Evaluation of every model",
                 "merge/reward_kl.png", "rlhf/kl0.1/curves.png"):  # fmt: skip
        assert part in md, part
    html = (run / "report.html").read_text()
    assert "<table>" in html and '<img src="merge/reward_kl.png"' in html
    (run / "report.md").unlink()
    assert "## RL runs" in _run("report", str(run)) and (run / "report.md").exists()
    out = _run("eval", str(run / "merge" / "model"), "--recipe", SMOKE, f"--set=output_dir={run.parent}")
    assert "## Evaluation of every model" in out and "refuses unsafe" in out


@pytest.mark.stage
def test_reuse_takes_finished_stages_from_another_run(smoke_run, tmp_path):
    run, _ = smoke_run
    log = _run("run", SMOKE, f"--set=output_dir={tmp_path}", "--only", "sft", "--reuse", str(run))
    for stage in ("data", "teacher", "generate", "sft"):
        assert f"[run] reuse {run}/{stage}" in log
        assert read_done(tmp_path / "tiny-smoke" / stage) == read_done(run / stage)
    assert "[run] sft (" not in log  # nothing recomputed


TRAINS = {"sft": "sft", "rm": "rm.train"}  # a training stage → its TrainConfig's section


def _stage_cmd(stage: str, out: Path, *extra: str) -> list[str]:
    key = TRAINS[stage]
    return [sys.executable, "-m", "posttrain", "stage", stage, SMOKE, f"--set=output_dir={out}", f"--set={key}.steps=200",
            f"--set={key}.save_steps=40", f"--set={key}.logging_steps=40", *extra]  # fmt: skip


def _interrupt(stage: str, out: Path, sig: int) -> int:
    """Start the stage, wait for its first complete checkpoint, send `sig`; returns the exit code. SIGTERM goes
    to `posttrain run` alone, which passes it on to the stage's process."""
    import signal
    import time

    cmd = _stage_cmd(stage, out)
    if sig == signal.SIGTERM:
        cmd = [sys.executable, "-m", "posttrain", "run", *cmd[5:], "--only", stage]
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first = out / "tiny-smoke" / f"{stage}.partial" / "checkpoints" / "checkpoint-40" / "trainer_state.json"
    deadline = time.time() + 300
    while not first.exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert p.poll() is None, "the stage ended before it could be interrupted"
    p.send_signal(sig)
    log = p.communicate(timeout=300)[0]
    if sig == signal.SIGTERM:
        assert "stopped by SIGTERM at step" in log, log[-2000:]
        assert f"[run] stage {stage} stopped on SIGTERM" in log, log[-2000:]
    return p.returncode


def _resumes_to_the_same_weights(stage: str, parent: str, smoke_run, tmp_path) -> None:
    """An uninterrupted run of `stage`, one stopped by SIGTERM and one killed with -9, both rerun: all three end
    with the same weights. `parent`: the stage whose finished outputs (and those before it) come from the smoke
    run."""
    import signal

    import torch
    from safetensors.torch import load_file

    from posttrain.errors import STOPPED_EXIT

    run, _ = smoke_run
    outs = {name: tmp_path / name for name in ("whole", "sigterm", "kill9")}
    for out in outs.values():  # the same parents, taken from the smoke run
        _run("run", SMOKE, f"--set=output_dir={out}", "--only", parent, "--reuse", str(run))
    whole = subprocess.run(_stage_cmd(stage, outs["whole"]), cwd=ROOT, capture_output=True, text=True)
    assert whole.returncode == 0, whole.stderr[-2000:]
    assert _interrupt(stage, outs["sigterm"], signal.SIGTERM) == STOPPED_EXIT
    assert _interrupt(stage, outs["kill9"], signal.SIGKILL) == -signal.SIGKILL
    expected = load_file(outs["whole"] / "tiny-smoke" / stage / "model" / "model.safetensors")
    for name in ("sigterm", "kill9"):
        partial = outs[name] / "tiny-smoke" / f"{stage}.partial"
        assert not (outs[name] / "tiny-smoke" / stage).exists() and (partial / "checkpoints").exists()
        again = subprocess.run(_stage_cmd(stage, outs[name]), cwd=ROOT, capture_output=True, text=True)
        assert again.returncode == 0 and "resuming from" in again.stdout, (
            again.stdout[-2000:] + again.stderr[-2000:]
        )
        got = load_file(outs[name] / "tiny-smoke" / stage / "model" / "model.safetensors")
        assert got.keys() == expected.keys()
        assert all(torch.allclose(got[k], expected[k], atol=1e-6) for k in expected), name


@pytest.mark.stage
def test_sigterm_and_kill_9_resume_to_the_same_weights_as_an_uninterrupted_run(smoke_run, tmp_path):
    _resumes_to_the_same_weights("sft", "generate", smoke_run, tmp_path)


@pytest.mark.slow
@pytest.mark.stage
def test_the_reward_model_resumes_after_sigterm_and_kill_9_to_the_same_weights(smoke_run, tmp_path):
    """The sft test above for the reward model's trainer (pairs in one micro-batch, its own checkpoints): about
    5 minutes here, so `make test-all` runs it."""
    _resumes_to_the_same_weights("rm", "distill", smoke_run, tmp_path)


def _sft_8_steps(run: Path, out: Path, *extra: str) -> tuple[list[float], dict, str]:
    """sft for 8 steps through the runner on the smoke run's data: (loss per step, final weights, log)."""
    from safetensors.torch import load_file

    args = [SMOKE, f"--set=output_dir={out}", "--set=sft.steps=8", "--set=sft.logging_steps=1",
            "--set=sft.save_steps=4", *extra]  # fmt: skip
    log = _run("run", *args, "--only", "sft", "--reuse", str(run))
    folder = out / "tiny-smoke" / "sft"
    assert read_done(folder) is not None and not (folder.parent / "sft.partial").exists()
    rows = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    assert sum(r.get("summary", False) for r in rows) == 1  # one writer
    return [r["loss"] for r in rows if "loss" in r], load_file(folder / "model" / "model.safetensors"), log


@pytest.fixture(scope="module")
def one_process_sft(smoke_run, tmp_path_factory):
    return _sft_8_steps(smoke_run[0], tmp_path_factory.mktemp("one"), "--set=sft.batch_size=8")


def _same_training(one, two) -> None:
    import torch

    assert len(one[0]) == len(two[0]) == 8
    assert one[0] == pytest.approx(two[0], rel=1e-4), (one[0], two[0])
    # 8 Adam steps at lr 3e-3: the processes' gradients are summed in another order, and Adam's normalisation
    # enlarges that fp32 rounding where a gradient is near zero (measured: up to 4e-5 with DDP, 2e-4 with ZeRO-3)
    assert all(torch.allclose(one[1][k], two[1][k], atol=5e-4) for k in one[1])


@pytest.mark.dist
def test_two_gloo_processes_train_like_one_with_the_same_global_batch(smoke_run, one_process_sft, tmp_path):
    """sft with the ddp-cpu launcher (2 processes × batch 4) against one process × batch 8."""
    two = _sft_8_steps(smoke_run[0], tmp_path, "--set=sft.batch_size=4", "--set=launchers.sft=ddp-cpu")
    assert "ddp-cpu.yaml" in two[2] and "ddp-cpu.yaml" not in one_process_sft[2]
    assert "[sft] data parallel over 2 processes: global batch 8" in two[2], two[2][-3000:]
    _same_training(one_process_sft, two)


def _zero3_launcher(folder: Path, port: int) -> Path:
    """An accelerate config: DeepSpeed ZeRO-3 over 2 CPU processes, every tensor sharded (persistence threshold 0)."""
    ds = folder / "ds3.json"
    ds.write_text(json.dumps({
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                              "stage3_gather_16bit_weights_on_model_save": True},
        "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
    }))  # fmt: skip
    launcher = folder / "zero3-2cpu.yaml"
    launcher.write_text(
        "distributed_type: DEEPSPEED\n"
        f"deepspeed_config: {{deepspeed_config_file: {ds}, zero3_init_flag: true}}\n"
        f"num_machines: 1\nnum_processes: 2\nmachine_rank: 0\nmain_process_port: {port}\nrdzv_backend: static\n"
    )
    return launcher


@pytest.mark.dist
def test_zero3_over_two_gloo_processes_trains_and_saves_like_one(
    smoke_run, one_process_sft, tmp_path, monkeypatch
):
    """DeepSpeed ZeRO-3 with every tensor sharded (persistence threshold 0): the policy is created partitioned (in
    no process is it ever whole), evaluation generates from the sharded model and the saved model holds the
    gathered weights."""
    launcher = _zero3_launcher(tmp_path, 29513)
    monkeypatch.setenv("POSTTRAIN_RECORD_LOADS", str(tmp_path / "loads.jsonl"))
    two = _sft_8_steps(
        smoke_run[0], tmp_path / "out", "--set=sft.batch_size=4", f"--set=launchers.sft={launcher}"
    )
    assert "[sft] data parallel over 2 processes: global batch 8" in two[2], two[2][-3000:]
    _same_training(one_process_sft, two)
    loads = _loads(tmp_path / "loads.jsonl")
    assert sorted(r["rank"] for r in loads) == [0, 1] and all(
        r["zero3"] and r["partitioned"] for r in loads
    ), loads


def _loads(path: Path) -> list[dict]:
    """The models the stages created (`POSTTRAIN_RECORD_LOADS`): kind, rank, under ZeRO-3, partitioned."""
    return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.mark.dist
def test_under_zero3_the_distill_and_rm_stages_create_every_model_partitioned(
    smoke_run, tmp_path, monkeypatch
):
    """distill (student and teacher) and rm (the reward model) under ZeRO-3 over 2 gloo processes: every model
    they train or score with is created partitioned. (The RM's likelihood term reads the embeddings outside their
    module, which ZeRO-3 refuses: it is off here.) Distillation trains each sample until the teacher's first unlikely
    token, which reads the partitioned teacher's tokens through its gathered output projection."""
    run, _ = smoke_run
    zero3 = _zero3_launcher(tmp_path, 29515)
    monkeypatch.setenv("POSTTRAIN_RECORD_LOADS", str(tmp_path / "loads.jsonl"))
    sets = [f"--set=output_dir={tmp_path}"] + [
        f"--set={k}" for k in (f"launchers.rm={zero3}", f"launchers.distill={zero3}", "rm.likelihood_weight=0",
                               "rm.train.batch_size=4", "distill.train.batch_size=4",
                               "distill.train_until_teacher_below=0.1")
    ]  # fmt: skip
    _run("run", SMOKE, *sets, "--only", "rm,distill", "--force", "--reuse", str(run))
    rows = [
        json.loads(x)
        for x in (tmp_path / "tiny-smoke" / "distill" / "metrics.jsonl").read_text().splitlines()
    ]
    shares = [r["trained_token_share"] for r in rows if "trained_token_share" in r]
    assert shares and all(0.0 < x <= 1.0 for x in shares), rows
    sharded = [r for r in _loads(tmp_path / "loads.jsonl") if r["zero3"]]
    assert all(r["partitioned"] for r in sharded), sharded
    kinds = sorted((r["kind"], r["rank"]) for r in sharded)
    # distill: the student and the teacher in each process; rm: the reward model in each process
    assert kinds == [("causal_lm", 0), ("causal_lm", 0), ("causal_lm", 1), ("causal_lm", 1),
                     ("reward_model", 0), ("reward_model", 1)], kinds  # fmt: skip


@pytest.mark.stage
def test_sweep_runs_each_variant_sharing_finished_stages_and_writes_one_table(smoke_run, tmp_path):
    run, _ = smoke_run
    lr = load_recipe(SMOKE).sft.learning_rate
    log = _run("sweep", SMOKE, "--grid", f"sft.learning_rate=1e-3,{lr}", "--only", "sft",
               f"--set=output_dir={tmp_path}", "--reuse", str(run))  # fmt: skip
    assert "[sweep] 2 variants of tiny-smoke" in log
    first, second = tmp_path / "tiny-smoke-learning_rate1e-3", tmp_path / f"tiny-smoke-learning_rate{lr}"
    for variant in (first, second):
        for stage in ("data", "teacher", "generate"):  # upstream of the change: taken, not recomputed
            assert f"[run] reuse {run}/{stage} for {variant}/{stage}" in log
    assert log.count("posttrain stage sft") == 1  # the default learning rate's sft is the smoke run's
    assert read_done(second / "sft") == read_done(run / "sft") != read_done(first / "sft")
    table = (tmp_path / "sweep-tiny-smoke-sft.learning_rate.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith(("| 1e-3 |", f"| {lr} |"))]
    assert len(rows) == 2 and all(len(r.split("|")) == len(rows[0].split("|")) for r in rows)
    assert "sft world_score" in table and "sft train_loss" in table
    repeat = f"`posttrain sweep {SMOKE} --grid sft.learning_rate=1e-3,{lr} --seeds 1 --only sft"
    assert repeat in table  # the command that repeats the sweep
    assert f"--set output_dir={tmp_path} --reuse {run}`" in table


@pytest.mark.dist
def test_generate_in_two_processes_writes_what_one_process_wrote(smoke_run, tmp_path):
    run, _ = smoke_run
    log = _run("run", SMOKE, f"--set=output_dir={tmp_path}", "--set=launchers.generate=ddp-cpu", "--only", "generate",
               "--force", "--reuse", str(run))  # fmt: skip
    assert "ddp-cpu.yaml" in log and "[generate] 2 processes: process r writes shards r, r + 2, …" in log, (
        log[-3000:]
    )

    def rows(folder: Path, split: str) -> list[dict]:
        out = [
            json.loads(x) for x in (folder / "generate" / "data" / f"{split}.jsonl").read_text().splitlines()
        ]
        for r in out:
            r.get("meta", {}).pop("teacher", None)  # the teacher's folder: this run's, not the smoke run's
        return out

    for split in ("train", "eval"):
        assert rows(tmp_path / "tiny-smoke", split) == rows(run, split), split
    shards = [
        json.loads(x)
        for x in (tmp_path / "tiny-smoke" / "generate" / "metrics.jsonl").read_text().splitlines()
    ]
    assert sum(r.get("prompts", 0) for r in shards if "shard" in r) == load_recipe(SMOKE).world.n_train


@pytest.mark.dist
def test_rm_distill_and_rlhf_in_two_gloo_processes(smoke_run, tmp_path, monkeypatch):
    """rm and distill with the ddp-cpu launcher, rlhf (two runs, one after the other) under ZeRO-3, each in 2
    processes × batch 4 (the smoke run's global batch 8): the RM's pairs are the one-process run's (sampling split
    by batch) and so are its first steps; distill and rlhf train, save and log once."""
    run, _ = smoke_run
    zero3 = _zero3_launcher(tmp_path, 29514)
    sets = [f"--set=output_dir={tmp_path}"] + [
        f"--set={k}" for k in ("launchers.rm=ddp-cpu", "launchers.distill=ddp-cpu", f"launchers.rlhf={zero3}",
                               "rm.train.batch_size=4", "distill.train.batch_size=4", "rlhf.train.batch_size=4")
    ]  # fmt: skip
    monkeypatch.setenv("POSTTRAIN_RECORD_LOADS", str(tmp_path / "loads.jsonl"))
    log = _run("run", SMOKE, *sets, "--only", "distill,rlhf", "--reuse", str(run))
    sharded = [
        r for r in _loads(tmp_path / "loads.jsonl") if r["zero3"]
    ]  # rlhf's: a policy and the RM per run
    assert all(r["partitioned"] for r in sharded) and len(sharded) == 2 * 2 * len(
        load_recipe(SMOKE).rlhf.resolved()
    )
    ddp = f"--config_file {ROOT / 'recipes' / 'accelerate' / 'ddp-cpu.yaml'} -m posttrain stage"
    assert log.count(ddp) == 2 and log.count(f"--config_file {zero3} -m posttrain stage rlhf") == 1, log[
        -3000:
    ]
    two = tmp_path / "tiny-smoke"
    for split in ("train", "eval"):
        pairs = Path("rm") / "data" / f"{split}.jsonl"
        assert (two / pairs).read_text() == (run / pairs).read_text(), split
    # the first epoch's steps are the one-process run's (later epochs are reshuffled per sampler)
    n_pairs = len((run / "rm" / "data" / "train.jsonl").read_text().splitlines())
    assert n_pairs >= 2 * 8, f"{n_pairs} RM training pairs: step 2 is not a full batch of the first epoch"
    one_rm, two_rm = (
        [json.loads(x) for x in (r / "rm" / "metrics.jsonl").read_text().splitlines()][0] for r in (run, two)
    )
    assert one_rm["step"] == two_rm["step"] == 2
    assert (one_rm["loss"], one_rm["grad_norm"]) == pytest.approx(
        (two_rm["loss"], two_rm["grad_norm"]), rel=1e-4
    )
    for folder in (two / "rm", two / "distill", two / "rlhf"):
        rows = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
        assert sum(r.get("summary", False) for r in rows) == 1, folder  # one writer
    for model in (two / "distill" / "model", *(two / "rlhf").glob("*/model")):
        assert (model / "model.safetensors").exists(), model
    assert len(list((two / "rlhf").glob("*/RUN_DONE"))) == len(load_recipe(SMOKE).rlhf.resolved())


@pytest.mark.stage
def test_the_generate_stage_builds_one_vllm_engine_and_hands_it_the_recipe_s_sampling(
    smoke_run, tmp_path, monkeypatch
):
    """`generate.engine: vllm` through the runner, with a stand-in engine (tests/stubs/vllm): one engine for the
    whole stage over its shards, the recipe's sampling settings handed to it, the stage finished. (That the engine's
    outputs become the rows HF generation writes: tests/test_generation.py.)"""
    from transformers import AutoTokenizer

    run, _ = smoke_run
    recipe = load_recipe(SMOKE)
    monkeypatch.setenv("PYTHONPATH", str(ROOT / "tests" / "stubs"))
    monkeypatch.setenv("STUB_VLLM_LOG", str(tmp_path / "vllm.jsonl"))
    log = _run("run", SMOKE, f"--set=output_dir={tmp_path}", "--set=generate.engine=vllm",
               "--set=generate.temperature=0", "--only", "generate", "--force", "--reuse", str(run))  # fmt: skip
    assert "[generate] engine: vllm (generate.engine: vllm)" in log
    assert "[run] generation engine of generate: vllm (one engine per GPU, for the whole stage)" in log
    assert read_done(tmp_path / "tiny-smoke" / "generate") is not None
    report = json.loads((tmp_path / "tiny-smoke" / "generate" / "generate_report.json").read_text())
    assert report["throughput"]["engine"] == "vllm" and report["rows_in"] == recipe.world.n_train
    events = [json.loads(x) for x in (tmp_path / "vllm.jsonl").read_text().splitlines()]
    engines = [e for e in events if e["event"] == "engine"]
    calls = [e for e in events if e["event"] == "generate"]
    assert len(engines) == 1 and engines[0]["model"].endswith("teacher/model"), engines
    assert engines[0]["tensor_parallel_size"] == 1 and "distributed_executor_backend" not in engines[0]
    assert engines[0]["max_model_len"] == recipe.chat.max_length
    n, shard = recipe.world.n_train, recipe.generate.shard_size
    assert len(calls) == -(-n // shard) > 1 and sum(c["prompts"] for c in calls) == n
    tok = AutoTokenizer.from_pretrained(run / "teacher" / "model")
    stops = sorted([tok.eos_token_id, tok.convert_tokens_to_ids("<end_of_turn>")])
    for p in (p for c in calls for p in c["params"]):
        assert (p["temperature"], p["top_p"], p["top_k"]) == (0.0, 1.0, -1)
        assert p["max_tokens"] == recipe.generate.max_new_tokens and sorted(p["stop_token_ids"]) == stops
