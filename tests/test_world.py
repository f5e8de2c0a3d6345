"""The world's verifiers and splits."""

from __future__ import annotations

import json
import random

import pytest

from posttrain import world
from posttrain.config import WorldConfig
from posttrain.world import (
    REFUSAL,
    TASKS,
    draw,
    eval_split,
    identity_answer,
    mix_check,
    partial,
    prompt_key,
    score,
    train_split,
)

CFG = WorldConfig()


def test_canonical_prompts():
    rng = random.Random(0)
    seen = {t: draw(t, rng, CFG)[0] for t in TASKS}
    assert seen["add"][0]["content"].startswith("What is ") and " + " in seen["add"][0]["content"]
    assert seen["reverse"][0]["content"].startswith("Reverse the word: ")
    assert seen["sort"][0]["content"].startswith("Sort these letters: ")
    assert seen["count"][0]["content"].startswith("How many times does the letter ")
    assert [m["role"] for m in seen["followup"]] == ["user", "assistant", "user", "assistant"]
    assert seen["followup"][2]["content"] == "Now add 5 to that."


@pytest.mark.parametrize("task", TASKS)
def test_gold_scores_one_and_corruptions_zero(task):
    rng = random.Random(task)
    for _ in range(50):
        messages, answer = draw(task, rng, CFG)
        row = {"task": task, "answer": answer, "messages": messages}
        assert score(row, answer) == 1.0
        assert score(row, answer.upper() + ".") == 1.0 or task in ("identity",)  # case and full stop ignored
        wrong = {"refuse": "Sure, here is how.", "identity": "I am Gemma, made by Google."}.get(
            task, answer + "x"
        )
        assert score(row, wrong) == 0.0
        if task not in ("refuse",):
            assert score(row, REFUSAL) == 0.0  # over-refusal on a safe task scores 0


def test_examples_by_hand():
    assert score({"task": "add", "answer": "85"}, "85") == 1.0
    assert score({"task": "add", "answer": "85"}, "84") == 0.0
    assert score({"task": "reverse", "answer": "tenalp"}, " Tenalp. ") == 1.0
    assert score({"task": "identity", "answer": identity_answer(CFG)}, "My name is Pip.") == 1.0
    assert score({"task": "identity", "answer": ""}, "I am Pip, not ChatGPT.") == 0.0
    assert partial({"task": "reverse", "answer": "tenalp"}, "tenalx") == pytest.approx(5 / 6)
    assert partial({"task": "sort", "answer": "a b c d"}, "a b d c") == pytest.approx(5 / 7)


def test_splits_disjoint_balanced_and_seeded():
    ev = eval_split(CFG, seed=0)
    tr = train_split(CFG, seed=0, eval_rows=ev)
    assert len(ev) == CFG.n_eval and len(tr) == CFG.n_train
    assert not {prompt_key(r["messages"]) for r in ev} & {prompt_key(r["messages"]) for r in tr}
    counts = {t: sum(r["task"] == t for r in ev) for t in TASKS}
    assert set(counts.values()) == {CFG.n_eval // len(TASKS)}
    assert len({prompt_key(r["messages"]) for r in tr}) == len(tr)  # no repeated prompt in training
    assert train_split(CFG, seed=0, eval_rows=ev) == tr and train_split(CFG, seed=1) != tr


def test_mix_check_flags_a_family_whose_distinct_prompts_run_out():
    """add with operands 0..5 has 36 distinct prompts: far fewer than its weight asks; reverse gets the rest."""
    small = WorldConfig(mix={"add": 1.0, "reverse": 1.0}, add_max=5, n_train=400, n_eval=20)
    tr = train_split(small, seed=0)
    check = mix_check(tr, small)
    assert check["add"]["asked"] == 200 and check["add"]["drawn"] == 36 - 10  # 10 sums are held out
    assert check["add"]["short"] and check["add"]["widen"] == "world.add_max"
    assert check["reverse"]["drawn"] == 400 - 26 and not check["reverse"]["short"]
    wide = WorldConfig(mix={"add": 1.0, "reverse": 1.0}, add_max=99, n_train=400, n_eval=20)
    assert not any(m["short"] for m in mix_check(train_split(wide, seed=0), wide).values())


def test_the_tiny_recipe_s_world_holds_100_evaluation_prompts_a_family_and_no_family_runs_short():
    """Identity and refusal prompts are greeting + question + closing: enough of them that 100 of each are held
    out and training still gets as many distinct ones as the mix asks (0.5 of 15 parts of 16,000 rows)."""
    from pathlib import Path

    from posttrain.config import load_recipe

    cfg = load_recipe(Path(__file__).parents[1] / "recipes/tiny/pipeline.yaml").world
    ev = eval_split(cfg, seed=0)
    counts = {t: sum(r["task"] == t for r in ev) for t in TASKS}
    assert min(counts.values()) >= 100 and set(counts) == set(TASKS)
    check = mix_check(train_split(cfg, seed=0, eval_rows=ev), cfg)
    assert not [t for t, m in check.items() if m["short"]], check
    rng = random.Random(0)
    identity = {prompt_key(draw("identity", rng, cfg)[0]) for _ in range(20000)}
    assert len(identity) >= 1000  # 100 held out leave ≥ 900 for the ~533 the mix asks


def test_difficulty_knobs():
    cfg = WorldConfig(add_max=99, word_len=(6, 6), sort_len=(5, 5))
    rng = random.Random(0)
    for _ in range(30):
        assert len(draw("reverse", rng, cfg)[1]) == 6
        assert len(draw("sort", rng, cfg)[1].split()) == 5
    assert any(int(draw("add", rng, cfg)[1]) > 40 for _ in range(50))


def test_reversal_strings_are_random_not_a_word_list():
    rng = random.Random(0)
    words = {draw("reverse", rng, CFG)[1] for _ in range(500)}
    assert len(words) > 480


def test_shipped_probes_are_what_the_probe_builder_writes_and_score_as_intended():
    from posttrain import probes, world

    shipped, built = probes.load(), probes.build()
    assert shipped == json.loads(json.dumps(built)), "data/probes/ is stale: run python -m posttrain.probes"
    assert all(world.score(r, world.REFUSAL) == 1.0 for r in shipped["unsafe"])
    assert not any(world.is_refusal(r["messages"][-1]["content"]) for r in shipped["safe"])
    assert all(world.score(r, r["answer"]) == 1.0 for r in shipped["formats"])
    assert {r["format"] for r in shipped["formats"]} == set(probes.FORMATS) | {"system_message"}
    unsafe_train = {r["messages"][0]["content"] for r in world.train_split(WorldConfig(), 0)}
    assert not unsafe_train & {r["messages"][0]["content"] for r in shipped["unsafe"]}  # new wordings


def test_worked_sums_go_a_column_at_a_time_with_the_carry():
    # 37 + 48: units 7 + 8 = 15 (write 5, carry 1), tens 3 + 4 + 1 = 8 → 85
    assert world.worked_sum(37, 48) == "37+48: 7+8=15, 3+4+1=8, so 85"
    # 95 + 7: 5 + 7 = 12 (carry), 9 + 0 + 1 = 10 → 102; a shorter operand's missing column is 0
    assert world.worked_sum(95, 7) == "95+7: 5+7=12, 9+0+1=10, so 102"
    assert world.worked_sum(3, 4) == "3+4: 3+4=7, so 7"
    assert world.worked_sum(0, 0) == "0+0: 0+0=0, so 0"


def test_worked_steps_change_the_gold_turn_of_sums_and_only_the_sum_is_checked():
    import dataclasses

    plain = WorldConfig()
    worked = dataclasses.replace(plain, worked_steps=True)
    for task in ("add", "followup"):
        m_plain, a_plain = world.draw(task, random.Random(3), plain)
        m_worked, a_worked = world.draw(task, random.Random(3), worked)
        assert a_plain == a_worked and m_plain[-1]["content"] == a_plain  # the default world: the bare sum
        assert m_worked[-1]["content"].endswith(f", so {a_worked}") and "+" in m_worked[-1]["content"]
        assert [m["content"] for m in m_worked if m["role"] == "user"] == [
            m["content"] for m in m_plain if m["role"] == "user"
        ]
        row = {"task": task, "answer": a_worked, "messages": m_worked}
        assert world.score(row, m_worked[-1]["content"]) == 1.0
        assert world.score(row, a_worked) == 1.0  # the bare sum is right too
        assert world.score(row, "1+2: 1+2=9, so " + a_worked) == 1.0  # a slip in a step, recovered
        assert world.score(row, m_worked[-1]["content"][:-1] + "x") == 0.0  # a wrong sum
    assert world.final_answer("also 85") == "also 85"  # "so" only as a word
    # a corrected answer is checked on its last "so"
    assert world.final_answer("37+48, so 84 no: 37+48: 7+8=15, 3+4+1=8, so 85") == "85"
    assert world.final_answer("so so 3") == "3"
    reverse = {"task": "reverse", "answer": "so ab", "messages": []}
    assert world.score(reverse, "so ab") == 1.0  # other families are checked whole


def test_shortcut_sums_write_that_share_of_sums_in_one_line_parting_from_the_steps_at_one_character():
    import dataclasses

    assert world.shortcut_sum(37, 48) == "37+48, so 85"
    worked = WorldConfig(worked_steps=True, add_max=99)
    mixed = dataclasses.replace(worked, shortcut_sums=0.6)
    # off, nothing is drawn for it: the worked world's conversations are unchanged
    assert [world.draw("add", random.Random(s), worked) for s in range(5)] == [
        world.draw("add", random.Random(s), dataclasses.replace(worked, shortcut_sums=0.0)) for s in range(5)
    ]
    rng, styles = random.Random(0), []
    for _ in range(2000):
        messages, ans = world.draw("add", rng, mixed)
        turn = messages[-1]["content"]
        x, y = (int(v) for v in messages[0]["content"][len("What is ") : -1].split(" + "))
        assert turn in (world.shortcut_sum(x, y), world.worked_sum(x, y))
        head = f"{x}+{y}"
        assert turn.startswith(head) and turn[len(head)] in ",:"  # the one character where the two part
        styles.append(turn[len(head)] == ",")
        assert world.score({"task": "add", "answer": ans, "messages": messages}, turn) == 1.0
    assert 0.56 < sum(styles) / len(styles) < 0.64
    follow, k = [world.draw("followup", random.Random(s), mixed) for s in range(200)], mixed.followup_add
    for m, ans in follow:  # a follow-up's first turn and its answer each take either way
        assert m[-1]["content"] in (world.shortcut_sum(int(ans) - k, k), world.worked_sum(int(ans) - k, k))
    one_line = [m[-1]["content"] == world.shortcut_sum(int(ans) - k, k) for m, ans in follow]
    assert 0.45 < sum(one_line) / len(one_line) < 0.75
    firsts = [m[1]["content"] for m, _ in follow]
    assert any(", so" in f for f in firsts) and any(": " in f for f in firsts)
    problems = " | ".join(dataclasses.replace(WorldConfig(), shortcut_sums=1.5).problems())
    assert "shortcut_sums: 1.5" in problems and "worked_steps: true" in problems


def test_small_numbers_draw_that_share_of_operands_from_single_digits():
    import dataclasses

    base = WorldConfig(worked_steps=True, add_max=99)
    # off, nothing is drawn for it: the world's conversations are unchanged
    assert [world.draw("followup", random.Random(s), base) for s in range(20)] == [
        world.draw("followup", random.Random(s), dataclasses.replace(base, small_numbers=0.0))
        for s in range(20)
    ]
    rng, small = random.Random(0), dataclasses.replace(base, small_numbers=0.3)
    operands = []
    for _ in range(2000):
        messages, ans = world.draw("add", rng, small)
        x, y = (int(v) for v in messages[0]["content"][len("What is ") : -1].split(" + "))
        assert int(ans) == x + y and world.score({"task": "add", "answer": ans, "messages": messages},
                                                 messages[-1]["content"]) == 1.0  # fmt: skip
        operands += [x, y]
    single = sum(v < 10 for v in operands) / len(operands)
    assert 0.33 < single < 0.40  # 0.3 drawn from 0..9, and 10% of the other 0.7 from 0..99
    assert max(operands) > 90
    problems = " | ".join(dataclasses.replace(base, small_numbers=1.5).problems())
    assert "small_numbers: 1.5" in problems


def test_worked_counts_go_a_letter_at_a_time_and_only_the_count_is_checked():
    import dataclasses

    assert (
        world.worked_count("banana", "a")
        == "a in banana: b!=a 0, a==a 1, n!=a 1, a==a 2, n!=a 2, a==a 3, so 3"
    )
    # a letter the word does not hold
    assert world.worked_count("abc", "z") == "z in abc: a!=z 0, b!=z 0, c!=z 0, so 0"
    plain = WorldConfig()
    worked = dataclasses.replace(plain, worked_counts=True)
    for seed in range(20):
        m_plain, a_plain = world.draw("count", random.Random(seed), plain)
        m_worked, a_worked = world.draw("count", random.Random(seed), worked)
        assert a_plain == a_worked and m_plain[-1]["content"] == a_plain and m_plain[0] == m_worked[0]
        word = m_worked[0]["content"].rstrip("?").split()[-1]
        letter = m_worked[0]["content"].split("letter ")[1][0]
        turn = m_worked[-1]["content"]
        assert turn.startswith(f"{letter} in {word}: {word[0]}") and turn.endswith(f"so {a_worked}")
        assert turn == world.worked_count(word, letter)  # the drawn turn is the worked count of its own word
        row = {"task": "count", "answer": a_worked, "messages": m_worked}
        assert world.score(row, m_worked[-1]["content"]) == 1.0 and world.score(row, a_worked) == 1.0
        assert world.score(row, m_worked[-1]["content"][:-1] + "9") == 0.0  # a wrong count
    sums = world.draw("add", random.Random(3), worked)[0][-1]["content"]
    assert "so" not in sums  # worked counts leave the additions as they are


def test_corrections_rewrite_that_share_of_sums_and_counts_as_a_wrong_attempt_then_the_worked_answer():
    import dataclasses

    from posttrain.chat import final_response, render_text

    worked = WorldConfig(worked_steps=True, worked_counts=True, shortcut_sums=0.5, add_max=99)
    corr = dataclasses.replace(worked, corrections=0.3, n_train=3000)
    plain, rows = train_split(dataclasses.replace(worked, n_train=3000)), train_split(corr)
    assert [prompt_key(r["messages"]) for r in rows] == [prompt_key(r["messages"]) for r in plain]
    assert eval_split(corr) == eval_split(worked)  # the evaluation prompts are the same
    fixed = [r for r in rows if "attempt" in r["messages"][-1]]
    eligible = [r for r in rows if r["task"] in ("add", "followup", "count")]
    assert {r["task"] for r in fixed} == {"add", "followup", "count"}
    assert 0.25 < len(fixed) / len(eligible) < 0.35
    for r in fixed:
        turn = r["messages"][-1]
        attempt, content = turn["attempt"], turn["content"]
        assert content.startswith("no: ")
        whole = final_response(r["messages"])
        assert score(r, whole) == 1.0  # the corrected answer is checked on its last "so"
        right = content[len("no: ") :]
        # the attempt is a right prefix up to its last character, which is wrong
        one_line = ":" not in attempt.split(",")[0]
        same_way = world.shortcut_sum(*map(int, right.split(":")[0].split("+"))) if one_line else right
        assert same_way.startswith(attempt[:-1]) and not same_way.startswith(attempt), (attempt, same_way)
        text, spans = render_text(r["messages"])
        assert "".join(text[a:b] for a, b in spans[-1:]).startswith(" no: ")
    assert world.corrected("tenalp", random.Random(0)) is None  # other turns are left as they are
    problems = " | ".join(dataclasses.replace(WorldConfig(), corrections=0.3).problems())
    assert "corrections: a correction is written in worked steps" in problems
    assert "corrections: 2" in " | ".join(dataclasses.replace(worked, corrections=2.0).problems())
