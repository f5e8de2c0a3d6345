"""`posttrain headroom`: what RL could move in a policy, per task family (posttrain/headroom.py)."""

from __future__ import annotations

import pytest

from posttrain import generation, headroom, world
from posttrain.cli import main
from posttrain.config import load_recipe
from posttrain.generation import Generation


def test_pass_at_k_is_the_unbiased_estimator():
    # n = 4 samples, c = 1 right, k = 2: 1 − C(3, 2) / C(4, 2) = 1 − 3/6 = 0.5
    assert headroom.pass_at_k(4, 1, 2) == pytest.approx(0.5)
    assert headroom.pass_at_k(4, 0, 2) == 0.0
    assert headroom.pass_at_k(4, 3, 2) == 1.0  # only one wrong sample: any two hold a right one
    assert headroom.pass_at_k(16, 4, 1) == pytest.approx(4 / 16)  # pass@1 is the share of right samples


def test_family_figures_by_hand():
    greedy = [1.0, 0.0, 0.0, 1.0]
    samples = [[1, 1, 1, 1], [0, 1, 0, 0], [0, 0, 0, 0], [1, 0, 1, 1]]
    fig = headroom.family_figures(greedy, samples, 4)
    assert fig["n"] == 4 and fig["greedy"] == 0.5
    assert fig["pass@1"] == pytest.approx((1 + 0.25 + 0 + 0.75) / 4)
    assert fig["pass@4"] == pytest.approx((1 + 1 + 0 + 1) / 4)
    assert fig["lift"] == pytest.approx(0.25)
    assert fig["p_right_when_wrong"] == pytest.approx((0.25 + 0) / 2)  # prompts 1 and 2, greedy wrong
    assert fig["mixed_from_wrong"] == pytest.approx(1 / 2)  # mixed groups: prompts 1 and 3; greedy wrong on 1
    assert fig["edge"] is False
    edge = headroom.family_figures([0.0, 0.0], [[1, 0, 0, 1], [0, 1, 1, 0]], 4)
    assert edge["lift"] == 1.0 and edge["p_right_when_wrong"] == 0.5 and edge["edge"] is True
    solved = headroom.family_figures([1.0], [[1, 1]], 2)
    assert solved["p_right_when_wrong"] is None and solved["mixed_from_wrong"] is None and not solved["edge"]
    assert edge["guess"] is None  # no answers given: nothing to guess, the plain threshold
    # right samples no more frequent than answering the family's most common answer are luck, not an edge:
    # the same scores as `edge`, where one answer ("2") is right for every prompt
    lucky = headroom.family_figures([0.0, 0.0], [[1, 0, 0, 1], [0, 1, 1, 0]], 4, ["2", "2"])
    assert lucky["guess"] == 1.0 and lucky["p_right_when_wrong"] == 0.5 and lucky["edge"] is False
    varied = headroom.family_figures([0.0, 0.0], [[1, 0, 0, 1], [0, 1, 1, 0]], 4, ["85", "17"])
    assert varied["guess"] == 0.5 and varied["edge"] is False  # 0.5 < 0.5 + 0.2
    assert headroom.guess_rate(["2", "1", "2", "3"]) == 0.5
    assert headroom.guess_rate(["85", "17", "9"]) == pytest.approx(1 / 3)


def test_measure_groups_each_prompts_k_samples_by_family(monkeypatch, tiny_tokenizer):
    """The greedy answer and the k samples of each prompt are scored against that prompt's row: a stand-in
    generator answers rows 0 and 2 right greedily, and the i-th prompt's first i samples right."""
    recipe = load_recipe("recipes/tiny/pipeline.yaml")
    rows = [r for r in world.eval_split(recipe.world, n=70) if r["task"] in ("add", "reverse")][:4]
    calls = []

    def fake_generate(model, tokenizer, prompts, cfg, seed=0, progress=None, lengths=None):
        calls.append((len(prompts), cfg.temperature, lengths))
        if cfg.temperature == 0:
            return [Generation([], rows[i]["answer"] if i % 2 == 0 else "no", False, False) for i in range(4)]
        k = len(prompts) // len(rows)
        return [Generation([], rows[j // k]["answer"] if j % k < j // k else "no", False, False)
                for j in range(len(prompts))]  # fmt: skip

    monkeypatch.setattr(headroom, "generate", fake_generate)
    monkeypatch.setattr(generation, "generate", fake_generate)  # the greedy answers: world_eval's
    figures = headroom.measure(None, tiny_tokenizer, rows, recipe, k=4, temperature=1.0)
    assert [c[:2] for c in calls] == [(4, 0.0), (16, 1.0)]
    # the k samples of a prompt are batched by its reference response's length, as the greedy answers are
    assert calls[1][2] == [n for n in generation.reference_lengths(rows) for _ in range(4)]
    assert list(figures)[-1] == "all"
    everything = figures["all"]
    assert everything["n"] == 4 and everything["greedy"] == 0.5
    assert everything["pass@1"] == pytest.approx((0 + 1 + 2 + 3) / 16)
    assert everything["p_right_when_wrong"] == pytest.approx((1 / 4 + 3 / 4) / 2)  # rows 1 and 3
    assert sum(figures[t]["n"] for t in figures if t != "all") == 4
    for t in set(figures) - {"all"}:  # each family's guess from its own rows' answers
        assert figures[t]["guess"] == headroom.guess_rate([r["answer"] for r in rows if r["task"] == t])


@pytest.mark.parametrize(
    "args, message",
    [
        (["--k", "0"], "--k 0 must be at least 1"),
        (["--temperature", "0"], "--temperature 0 must be positive"),
        (["--per-task", "0"], "--per-task 0 must be at least 1"),
        ([], "not a saved model folder"),
    ],
)
def test_the_headroom_cli_refuses_bad_arguments_before_any_model_loads(tmp_path, capsys, args, message):
    code = main(["headroom", str(tmp_path), "--recipe", "recipes/tiny/pipeline.yaml", *args])
    assert code == 2 and message in capsys.readouterr().err


@pytest.mark.stage
def test_the_headroom_command_measures_a_saved_model_per_family(tmp_path, capsys):
    """The README's command on the shipped teacher, small: every family of the recipe's world, its figures
    consistent (pass@1 ≤ pass@k; the edge verdict follows the gate) and written as JSON."""
    import json

    out = tmp_path / "headroom.json"
    code = main(["headroom", "data/models/tiny-teacher", "--recipe", "recipes/tiny/pipeline.yaml",
                 "--per-task", "3", "--k", "2", "--out", str(out)])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "| family | n | greedy | pass@1 | pass@2 |" in printed
    result = json.loads(out.read_text())
    recipe = load_recipe("recipes/tiny/pipeline.yaml")
    families = result["families"]
    assert set(families) == {t for t, w in recipe.world.mix.items() if w > 0} | {"all"}
    assert families["all"]["n"] == 3 * (len(families) - 1)
    for f in families.values():
        assert 0 <= f["pass@1"] <= f["pass@2"] <= 1 and 0 <= f["greedy"] <= 1
        assert f["edge"] == (f["lift"] >= 0.4 and (f["p_right_when_wrong"] or 0) >= (f["guess"] or 0) + 0.2)
    assert families["all"]["guess"] is None
    assert all(0 < f["guess"] <= 1 for t, f in families.items() if t != "all")
    assert families["identity"]["guess"] == 1.0  # one answer to every identity question


@pytest.mark.stage
def test_the_headroom_command_draws_its_prompts_from_the_world_as_set(tmp_path, monkeypatch):
    """The README's probe of values outside the world's ranges: `--set world.add_max=9` draws the fresh prompts
    from that world (every sum of single digits), as the figures it prints are of."""
    from posttrain import headroom

    drawn = []
    real = headroom.world.eval_split

    def spy(cfg, *args, **kwargs):
        rows = real(cfg, *args, **kwargs)
        drawn.extend(rows)
        return rows

    monkeypatch.setattr(headroom.world, "eval_split", spy)
    code = main(["headroom", "data/models/tiny-teacher", "--recipe", "recipes/tiny/pipeline.yaml", "--set",
                 "world.add_max=9", "--set", "eval.max_new_tokens=96", "--per-task", "2", "--k", "1",
                 "--out", str(tmp_path / "h.json")])  # fmt: skip
    assert code == 0
    sums = [r for r in drawn if r["task"] == "add"]
    assert sums and all(int(r["answer"]) <= 18 for r in sums)
    assert all(
        int(v) < 10 for r in sums for v in r["messages"][0]["content"][len("What is ") : -1].split(" + ")
    )
