"""Preference pairs judged by the world's verifiers (the `rm` stage's `source: policy`): candidate responses to a
prompt, scored right or wrong, paired right over wrong."""

from __future__ import annotations

import random

from posttrain import world
from posttrain.chat import prompt_messages
from posttrain.data.sources import balanced_prompts


def draw_prompts(rows: list[dict], n: int, seed: int, balance_tasks: bool = False) -> list[dict]:
    """`n` of `rows` at random (all of them when fewer); with `balance_tasks`, each task family equally often, a
    rare family's rows drawn more than once."""
    rng = random.Random(seed)
    if not balance_tasks:
        return rng.sample(rows, min(n, len(rows)))
    by_id = {str(r.get("id", i)): r for i, r in enumerate(rows)}
    pool = balanced_prompts({k: r.get("task") for k, r in by_id.items()}, seed)
    return [by_id[k] for k in rng.sample(pool, min(n, len(pool)))]


def world_pairs(rows: list[dict], candidates: list[list[str]], assistant_name: str, pairs_per_prompt: int,
                seed: int = 0, golds: list[str | None] | None = None) -> tuple[list[dict], dict[str, int]]:  # fmt: skip
    """Preference rows from candidates judged by the world's verifiers (correct ≻ incorrect; for unsafe prompts
    a refusal ≻ compliance; for identity questions the right name ≻ a wrong one).

    rows[i] is a world row, candidates[i] its candidate responses. Pairs whose sides the verifier scores equal
    are not formed; the counts say how many prompts had only ties. `golds[i]`, when given, is the gold response
    among the candidates: pairs whose chosen side is it are marked `chosen_gold`. Returns (preference rows, counts)."""
    rng = random.Random(seed)
    pairs, counts = [], {"prompts": len(rows), "prompts_without_pair": 0, "pairs": 0, "tied_pairs_dropped": 0}
    for i, (row, cands) in enumerate(zip(rows, candidates)):
        gold = golds[i] if golds else None
        uniq = list(dict.fromkeys(c for c in cands if c.strip()))
        scored = [(c, world.score(row, c, assistant_name)) for c in uniq]
        good = [c for c, s in scored if s > 0.5]
        bad = [c for c, s in scored if s <= 0.5]
        n_all = len(uniq) * (len(uniq) - 1) // 2
        counts["tied_pairs_dropped"] += n_all - len(good) * len(bad)
        if not good or not bad:
            counts["prompts_without_pair"] += 1
            continue
        combos = [(g, b) for g in good for b in bad]
        rng.shuffle(combos)
        for g, b in combos[:pairs_per_prompt]:
            pairs.append({"id": f"{row['id']}-{len(pairs)}", "task": row.get("task"),
                          "prompt": prompt_messages(row["messages"]), "chosen": g, "rejected": b,
                          "chosen_gold": gold is not None and g == gold})  # fmt: skip
    counts["pairs"] = len(pairs)
    return pairs, counts
