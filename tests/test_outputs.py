"""Exported models read back by the runner: complete files, no empty tensors, shards the index names."""

from __future__ import annotations

import json

import torch
from safetensors.torch import save_file

from posttrain.outputs import check_exported


def _model(folder, tensors, name="model.safetensors"):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text("{}")
    save_file(tensors, str(folder / name))


def test_a_complete_export_checks_out(tmp_path):
    _model(tmp_path / "stage" / "model", {"a": torch.ones(3, 2), "b": torch.zeros(4, dtype=torch.bfloat16)})
    _model(tmp_path / "stage" / "run1" / "model", {"c": torch.ones(1)})
    assert check_exported(tmp_path / "stage") == ([], 3)


def test_empty_truncated_and_missing_shards_are_named(tmp_path):
    _model(
        tmp_path / "s" / "model", {"w": torch.ones(2, 2), "ghost": torch.empty(0)}
    )  # a ZeRO-3 save without gather
    problems, _ = check_exported(tmp_path / "s")
    assert problems == [f"{tmp_path}/s/model/model.safetensors: tensor ghost is empty (shape [0])"]

    _model(tmp_path / "t" / "model", {"w": torch.ones(64, 64)})
    f = tmp_path / "t" / "model" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    assert "truncated" in check_exported(tmp_path / "t")[0][0]

    _model(tmp_path / "u" / "model", {"w": torch.ones(2)}, "model-00001-of-00002.safetensors")
    index = {"weight_map": {"w": "model-00001-of-00002.safetensors", "v": "model-00002-of-00002.safetensors"}}
    (tmp_path / "u" / "model" / "model.safetensors.index.json").write_text(json.dumps(index))
    assert check_exported(tmp_path / "u")[0] == [
        f"{tmp_path}/u/model/model.safetensors.index.json: names shard model-00002-of-00002.safetensors that is missing"
    ]

    (tmp_path / "v" / "model").mkdir(parents=True)
    (tmp_path / "v" / "model" / "config.json").write_text("{}")
    assert check_exported(tmp_path / "v")[0] == [f"{tmp_path}/v/model: no *.safetensors weights"]


def test_the_report_tells_stale_and_failed_stages_from_current_ones(tmp_path):
    from posttrain.report import stage_states, stage_table

    def done(stage, h, parents):
        (tmp_path / stage).mkdir()
        (tmp_path / stage / "DONE").write_text(json.dumps({"config_hash": h, "parents": parents}))

    done("data", "d1", {})
    done("sft", "s2", {"data": "d1"})  # rerun with a new config
    done("rm", "r1", {"data": "d1", "sft": "s1"})  # made from the older sft
    done("rlhf", "l1", {"rm": "r1"})  # its rm still matches, but that rm is stale
    done("distill", "t1", {"sft": "s1"})
    (tmp_path / "distill.partial").mkdir()  # the rerun on the new sft failed
    done("generate", "g1", {"data": "d1"})
    (tmp_path / "generate.partial").mkdir()  # an attempt with another config failed; the output stands
    states = {k: v[1] for k, v in stage_states(tmp_path).items()}
    assert states == {"data": "done", "generate": "done", "sft": "done", "distill": "failed or incomplete",
                      "rm": "stale (made from an older sft)", "rlhf": "stale (made from an older rm)"}  # fmt: skip
    assert "| `rm` | stale (made from an older sft) |" in stage_table(tmp_path)


def test_the_rl_section_judges_each_run_prompt_by_prompt_and_names_reward_hacking(tmp_path):
    from posttrain.report import rl_section

    (tmp_path / "rlhf").mkdir()
    (tmp_path / "rlhf" / "DONE").write_text(json.dumps({"config_hash": "l1", "parents": {}}))
    start = [1.0] * 20 + [0.0] * 20

    def run(name, reward_end, scores_end, keep_scores=True, reward_start=-1.0):
        def side(reward, scores):
            return {"kl": 0.1, "kl_k3": 0.1, "length": 5.0, "reward": reward, "world_score": sum(scores) / len(scores),
                    **({"world_scores": scores} if keep_scores else {})}  # fmt: skip

        (tmp_path / "rlhf" / name).mkdir()
        (tmp_path / "rlhf" / name / "figures.json").write_text(json.dumps(
            {"run": name, "kl_coef": 0.1, "anchor": "init", "start": side(reward_start, start), "end": side(reward_end, scores_end)}
        ))  # fmt: skip

    run("hacked", 2.0, [0.0] * 20 + [0.0] * 19 + [1.0])  # 20 worse, 1 better while the RM reward rose
    run("noisy", 2.0, [1.0] * 19 + [0.0] + [1.0] + [0.0] * 19)  # 1 worse, 1 better
    run("lost", -2.0, [0.0] * 20 + [0.0] * 20)  # worse, and the RM saw it: no hacking
    run("old", 2.0, [0.0] * 40, keep_scores=False)  # figures from before per-prompt scores were kept
    run("verifiers", None, start, reward_start=None)  # RL against the world's verifiers: no RM reward
    rows = {
        line.split(" | ")[0].strip("| "): line
        for line in rl_section(tmp_path).splitlines()
        if line.startswith("| ")
    }
    # five runs compared with one start: each p is the exact one-sided sign test's × 5
    assert "+1 / −20 of 40 (p 5.25e-05): **worse** — **reward hacking**" in rows["hacked"]
    assert "+1 / −1 of 40 (p 1): noise |" in rows["noisy"]
    assert "+0 / −20 of 40 (p 4.77e-06): **worse** |" in rows["lost"] and "hacking" not in rows["lost"]
    assert "| 0.500 → 0.000 |  | 5.0 |" in rows["old"]
    assert "| – → – |" in rows["verifiers"] and "None" not in rows["verifiers"]


def test_an_rl_run_whose_gain_in_one_family_hides_a_fall_in_another_is_named_reward_hacking_in_that_family():
    """40 sums and 40 counts: the run gains 20 sums and loses 15 counts (overall +20 / −15: noise) while the RM
    reward rose; the counts' fall is beyond noise even corrected for 2 families × 2 runs."""
    from posttrain.report import families_that_fell, world_verdict

    tasks = ["add"] * 40 + ["count"] * 40
    before = [0.0] * 20 + [1.0] * 20 + [1.0] * 20 + [0.0] * 20
    after = [1.0] * 40 + [1.0] * 5 + [0.0] * 35

    def side(reward, scores, with_tasks=True):
        return {"reward": reward, "world_scores": scores, **({"world_tasks": tasks} if with_tasks else {})}

    text = world_verdict(side(-2.0, before), side(-1.0, after), comparisons=2)
    assert text.startswith("+20 / −15 of 80 (p ") and ": noise; fell: count +0 / −15 (p " in text
    assert text.endswith("— **reward hacking** in count: the RM reward rose while it fell")
    seen_by_rm = world_verdict(side(-2.0, before), side(-3.0, after), comparisons=2)
    assert "fell: count" in seen_by_rm and "reward hacking" not in seen_by_rm
    assert [t for t, _ in families_that_fell(side(-2.0, before), side(-1.0, after), 2)] == ["count"]
    no_tasks = world_verdict(side(-2.0, before, False), side(-1.0, after, False), 2)
    assert no_tasks.endswith(": noise")
    assert families_that_fell(side(-2.0, before), side(-1.0, before), 2) == []


def test_the_world_table_gives_each_model_its_gain_over_its_start_with_a_noise_band(tmp_path):
    from posttrain.report import world_table

    def done(stage, h, parents):
        (tmp_path / stage).mkdir()
        (tmp_path / stage / "DONE").write_text(json.dumps({"config_hash": h, "parents": parents}))

    def res(scores):
        return {
            "score": sum(scores) / len(scores),
            "per_task": {"add": sum(scores) / len(scores)},
            "scores": scores,
        }

    untrained, sft, distilled = [0.0] * 40, [1.0] * 30 + [0.0] * 10, [1.0] * 30 + [0.0] * 10
    distilled[30:33] = [1.0] * 3  # 3 better, none worse: p = 1/8, noise
    done("sft", "s1", {})
    (tmp_path / "sft" / "eval.json").write_text(json.dumps({"before": res(untrained), "after": res(sft)}))
    done("distill", "d1", {"sft": "s1"})
    (tmp_path / "distill" / "eval.json").write_text(json.dumps(
        {"sft": res(sft), "distill": res(distilled), "teacher": res([1.0] * 40)}))  # fmt: skip
    rows = {line.split(" | ")[0].strip("| "): line for line in world_table(tmp_path).splitlines()
            if line.startswith("| ")}  # fmt: skip
    # 30 of 40 better: +0.750 ± 1.96 · sd / √40, sd² = 40 · 0.75 · 0.25 / 39
    band = 1.96 * (40 * 0.75 * 0.25 / 39 / 40) ** 0.5
    assert f"untrained: +0.750 ± {band:.3f} (+30 / −0, p 9.31e-10): **better**" in rows["sft: trained"]
    assert "sft: +0.075 ± " in rows["distill"] and "(+3 / −0, p 0.125): noise" in rows["distill"]
    assert rows["teacher: from the recipe"].count("±") == 0  # a named teacher has no start in this run


def test_the_report_names_a_failed_gate_with_its_figures(tmp_path):
    from posttrain.report import stage_states, stage_table

    partial = tmp_path / "rm.partial"
    partial.mkdir()
    (partial / "GATE_FAILED").write_text("reward model gate: held-out accuracy 0.851 < rm.min_accuracy 0.9\n")
    held_out = {"accuracy": 0.8505, "loss": 0.238, "length_correlation": 0.163}
    (partial / "rm_report.json").write_text(json.dumps({"held_out": held_out, "min_accuracy": 0.9}))
    (tmp_path / "sft.partial").mkdir()  # killed midway: no gate involved
    states = {k: v[1] for k, v in stage_states(tmp_path).items()}
    assert states == {"sft": "failed or incomplete", "rm": "failed its quality gate"}
    assert ("| `rm` | failed its quality gate |  | heldout_accuracy 0.851 < min_accuracy 0.900, heldout_loss 0.238, "
            "length_correlation 0.163 |") in stage_table(tmp_path)  # fmt: skip


def test_a_sweep_table_gives_each_evaluated_models_world_score(tmp_path):
    from posttrain.report import sweep_table

    runs = []
    for window, score in (("64", 0.59), ("32", 0.36)):
        folder = tmp_path / f"w{window}" / "eval"
        folder.mkdir(parents=True)
        (folder / "DONE").write_text(json.dumps({"config_hash": window, "parents": {}}))
        summary = {"summary": True, "wall_time_s": 30.0, "sft": {"world_score": score, "kl": 0.0}}
        (folder / "metrics.jsonl").write_text(json.dumps(summary) + "\n")
        runs.append(({"eval.sliding_window": window}, folder.parent))
    table = sweep_table(runs, ["eval"])
    assert "| eval.sliding_window | eval sft world | run |" in table
    assert "| 64 | 0.590 |" in table and "| 32 | 0.360 |" in table


def test_the_recorded_commit_says_when_tracked_files_differ_from_it(tmp_path, monkeypatch):
    """A model trained from uncommitted changes records "<commit>+dirty": the commit alone would not rebuild it."""
    import subprocess

    from posttrain.outputs import git_commit

    monkeypatch.chdir(tmp_path)
    assert git_commit() is None  # not a checkout
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    (tmp_path / "world.py").write_text("a = 1\n")
    subprocess.run([*git, "add", "world.py"], check=True)
    subprocess.run([*git, "commit", "-qm", "one"], check=True)
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    (tmp_path / "notes.txt").write_text("untracked files do not count\n")
    assert git_commit() == head
    (tmp_path / "world.py").write_text("a = 2\n")
    assert git_commit() == head + "+dirty"
