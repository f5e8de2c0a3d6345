"""What RL could move in a policy, per task family, measured before any RL runs (`posttrain headroom`).

RL with a verifier (or an RM that agrees with it) can only promote right answers that the policy already samples.
For each family of the built-in world's held-out prompts this draws one greedy answer and `k` samples at the
policy's sampling temperature and reports:

    greedy       the greedy score (what the world score counts)
    pass@1       the mean score of a sample
    pass@k       the chance that at least one of k samples is right (unbiased estimator of Chen et al., 2021)
    p_right|wrong  over the prompts that greedy gets wrong, the mean share of samples that are right: the
                 probability mass RL has to grow past the greedy answer's to flip it
    mixed_from_wrong  of the prompt groups whose k samples are neither all right nor all wrong (the only groups
                 with a non-zero leave-one-out advantage), the share that greedy gets wrong: the rest only sharpen
                 answers greedy already gives
    guess        the share of the family's prompts whose answer is the family's most common one: what answering
                 that one constant scores (letter counts: "2" is right for ~0.3 of them; a sum: ~0.03)

A family is at the edge of competence — where RL has something to do — when pass@k − greedy ≥ 0.4 and
p_right|wrong ≥ guess + 0.2 (`GATE`); a policy far below (p_right|wrong ≈ 0.05) needs many times more
probability on an answer it rarely samples, one far above has nothing left to gain, and right samples no more
frequent than the guess are luck among few answers rather than a skill that RL could reinforce. The figures are
estimates over the prompts drawn: with 100 prompts a family a score's standard error is up to 0.05.

    posttrain headroom runs/tiny/sft/model --recipe recipes/tiny/pipeline.yaml --per-task 100 --k 16
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from typing import Any

from posttrain import world
from posttrain.config import ModelSpec, Recipe, SamplingConfig
from posttrain.generation import generate, prompt_ids, reference_lengths, world_eval
from posttrain.modeling import load_causal_lm, load_tokenizer

# pass@k − greedy, and the share of right samples where greedy is wrong, over the family's guess rate
GATE = {"lift": 0.4, "p_right_when_wrong": 0.2}


def pass_at_k(n: int, c: int, k: int) -> float:
    """P(at least one of k samples is right) from n samples of which c are right, without replacement:
    1 − C(n−c, k) / C(n, k) (the unbiased estimator of Chen et al., 2021). k ≤ n."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def guess_rate(answers: list[str]) -> float:
    """The share of `answers` equal to the most common one: the score of answering that constant everywhere."""
    return max(Counter(answers).values()) / len(answers) if answers else 0.0


def family_figures(
    greedy: list[float], samples: list[list[float]], k: int, answers: list[str] | None = None
) -> dict[str, Any]:
    """One family's figures from its prompts' greedy scores (P,) and sample scores (P, n ≥ k), each 0 or 1, and
    their gold answers (P,) for the guess rate (None without them: taken as 0 by the edge test)."""
    n = len(greedy)
    rights = [sum(s) for s in samples]
    wrong = [i for i in range(n) if greedy[i] < 1]
    mixed = [i for i in range(n) if 0 < rights[i] < len(samples[i])]
    fig = {
        "n": n,
        "greedy": sum(greedy) / n,
        "pass@1": sum(r / len(s) for r, s in zip(rights, samples)) / n,
        f"pass@{k}": sum(pass_at_k(len(s), int(r), k) for r, s in zip(rights, samples)) / n,
        "p_right_when_wrong": (
            sum(rights[i] / len(samples[i]) for i in wrong) / len(wrong) if wrong else None
        ),
        "mixed_from_wrong": sum(greedy[i] < 1 for i in mixed) / len(mixed) if mixed else None,
        "guess": guess_rate(answers) if answers else None,  # no one constant answers several families
    }
    fig["lift"] = fig[f"pass@{k}"] - fig["greedy"]
    fig["edge"] = (
        fig["lift"] >= GATE["lift"]
        and fig["p_right_when_wrong"] is not None
        and fig["p_right_when_wrong"] >= (fig["guess"] or 0.0) + GATE["p_right_when_wrong"]
    )
    return fig


def measure(
    model, tokenizer: Any, rows: list[dict], recipe: Recipe, k: int, temperature: float, seed: int = 0,
    progress: Any = None,
) -> dict[str, dict[str, Any]]:  # fmt: skip
    """{task: family_figures} for `rows` (world rows with `task` and `answer`), plus "all" over every row."""
    max_new, batch = recipe.eval.max_new_tokens, recipe.eval.batch_size
    name = recipe.world.assistant_name
    prompts = [prompt_ids(r["messages"], tokenizer, recipe.chat, max_new, r.get("id", "?")) for r in rows]
    sample_cfg = SamplingConfig(
        max_new_tokens=max_new, temperature=temperature, batch_size=batch, engine="hf"
    )
    greedy = world_eval(model, tokenizer, rows, recipe.chat, name, max_new, batch)["scores"]
    if progress is not None:
        progress.update(len(rows))
    expected = [n for n in reference_lengths(rows) for _ in range(k)]  # batches of similar expected length
    sampled = generate(model, tokenizer, [p for p in prompts for _ in range(k)], sample_cfg, seed, progress,
                       lengths=expected)  # fmt: skip
    by_task: dict[str, tuple[list, list, list]] = defaultdict(lambda: ([], [], []))
    for i, r in enumerate(rows):
        s = [world.score(r, g.text, name) for g in sampled[i * k : (i + 1) * k]]
        for key in (r["task"], "all"):
            by_task[key][0].append(greedy[i])
            by_task[key][1].append(s)
            by_task[key][2].append(r["answer"])
    ordered = sorted(by_task.items(), key=lambda x: x[0] == "all")  # a guess is one family's constant answer
    return {t: family_figures(g, s, k, None if t == "all" else a) for t, (g, s, a) in ordered}


def run(
    recipe: Recipe, model_path: str, per_task: int, k: int, temperature: float, seed: int
) -> dict[str, Any]:
    """Load the model at `model_path` and measure it on `per_task` prompts per family of the recipe's world, a
    new draw (seed + 1) of its evaluation split. They are distinct from one another, not from training prompts:
    where a family has few distinct prompts (addition to 20 has 441) the training data holds most of them, as it
    holds the prompts RL trains on."""
    from tqdm import tqdm

    tasks = [t for t, w in recipe.world.mix.items() if w > 0]
    rows = world.eval_split(recipe.world, seed=seed + 1, n=per_task * len(tasks))
    spec = ModelSpec(name_or_path=model_path, dtype=recipe.model.dtype)
    tokenizer = load_tokenizer(spec)
    model = load_causal_lm(spec, tokenizer).eval()
    with tqdm(total=len(rows) * (k + 1), desc="headroom", unit="answer") as bar:
        figures = measure(model, tokenizer, rows, recipe, k, temperature, seed, bar)
    return {
        "model": model_path,
        "k": k,
        "temperature": temperature,
        "per_task": per_task,
        "families": figures,
    }


def markdown(result: dict[str, Any]) -> str:
    """The figures as a table, one row per family, with the gate's verdict."""
    k = result["k"]
    lines = [
        f"Headroom of {result['model']} (k = {k} samples at T = {result['temperature']:g}, "
        f"{result['per_task']} prompts a family; edge: pass@{k} − greedy ≥ {GATE['lift']}, "
        f"p_right|wrong ≥ guess + {GATE['p_right_when_wrong']})",
        "",
        f"| family | n | greedy | pass@1 | pass@{k} | lift | p_right\\|wrong | guess | mixed from wrong | edge |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|:---:|",
    ]

    def f(x: float | None) -> str:
        return "–" if x is None else f"{x:.2f}"

    for t, v in result["families"].items():
        lines.append(f"| {t} | {v['n']} | {f(v['greedy'])} | {f(v['pass@1'])} | {f(v[f'pass@{k}'])} | "
                     f"{f(v['lift'])} | {f(v['p_right_when_wrong'])} | {f(v['guess'])} | "
                     f"{f(v['mixed_from_wrong'])} | {'yes' if v['edge'] else 'no'} |")  # fmt: skip
    return "\n".join(lines)
