"""Batched generation: equals one-by-one, stops at <end_of_turn>, marks truncation; one <bos> per prompt."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

from posttrain.config import ChatConfig, ModelSpec, SamplingConfig, TrainConfig, from_dict
from posttrain.engines.sft import make_trainer, sft_args, to_dataset, tokenize_rows
from posttrain.generation import generate, prompt_ids, world_eval
from posttrain.modeling import load_causal_lm

CHAT = ChatConfig(max_length=128)
QUESTIONS = ["Hi", "What is 2 + 3?", "Reverse the word: planet", "Sort these letters: d b a c", "Who are you?",
             "How many times does the letter a appear in banana?", "x"]  # fmt: skip


def _prompts(tok, max_new=16):
    return [prompt_ids([{"role": "user", "content": q}], tok, CHAT, max_new) for q in QUESTIONS]


def test_prompt_has_one_bos_and_ends_with_the_generation_prompt(tiny_tokenizer):
    for p in _prompts(tiny_tokenizer):
        assert p[0] == tiny_tokenizer.bos_token_id and p.count(tiny_tokenizer.bos_token_id) == 1
        assert tiny_tokenizer.decode(p, skip_special_tokens=False).endswith(
            "<end_of_turn>\n<start_of_turn>model\n"
        )


def test_long_prompt_is_cut_from_the_left_to_leave_room(tiny_tokenizer):
    p = prompt_ids([{"role": "user", "content": "y" * 300}], tiny_tokenizer, CHAT, 32)
    assert len(p) == CHAT.max_length - 32 and p[0] == tiny_tokenizer.bos_token_id


@pytest.mark.stage
def test_batched_greedy_equals_one_by_one(tiny_tokenizer):
    model = load_causal_lm(ModelSpec(preset="tiny-teacher"), tiny_tokenizer, seed=3)
    prompts = _prompts(tiny_tokenizer)
    cfg = SamplingConfig(max_new_tokens=12, temperature=0.0, batch_size=len(prompts), engine="hf")
    batched = generate(model, tiny_tokenizer, prompts, cfg)
    single = [generate(model, tiny_tokenizer, [p], cfg)[0] for p in prompts]
    assert [g.ids for g in batched] == [g.ids for g in single]
    assert len({len(p) for p in prompts}) > 1  # the batch really was left-padded


def test_batches_group_prompts_by_expected_response_length(tiny_tokenizer, monkeypatch):
    """With `lengths` (the reference responses' lengths) a batch holds prompts whose responses are expected to be
    alike in length, longest first, whatever the prompts' own lengths; the results stay in the input order and a
    greedy answer is the one each prompt gets alone."""
    from posttrain.generation import reference_lengths

    model = load_causal_lm(ModelSpec(preset="tiny-student"), tiny_tokenizer, seed=0)
    prompts = _prompts(tiny_tokenizer)
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": "z" * n}]}
            for q, n in zip(QUESTIONS, [3, 40, 5, 30, 4, 50, 2])]  # fmt: skip
    rows[-1]["messages"].pop()  # a bare prompt: nothing expected of it
    rows[3]["messages"][-1]["role"] = "model"  # the model's turn under Gemma's name
    expected = reference_lengths(rows)
    assert expected == [3, 40, 5, 30, 4, 50, 0]
    batches = []
    real = type(model).generate

    def spy(self, input_ids=None, **kw):
        batches.append(sorted(input_ids[i][input_ids[i] != tiny_tokenizer.pad_token_id].tolist()
                              for i in range(input_ids.shape[0])))  # fmt: skip
        return real(self, input_ids=input_ids, **kw)

    monkeypatch.setattr(type(model), "generate", spy)
    cfg = SamplingConfig(max_new_tokens=8, temperature=0.0, batch_size=3, engine="hf")
    grouped = generate(model, tiny_tokenizer, prompts, cfg, lengths=expected)
    want = [[5, 1, 3], [2, 4, 0], [6]]  # by expected length: 50 40 30 | 5 4 3 | 0
    assert batches == [sorted(prompts[i] for i in b) for b in want]
    assert [g.ids for g in grouped] == [generate(model, tiny_tokenizer, [p], cfg)[0].ids for p in prompts]
    with pytest.raises(ValueError, match="2 expected lengths for 7 prompts"):
        generate(model, tiny_tokenizer, prompts, cfg, lengths=[1, 2])


def test_sampling_split_in_parts_equals_sampling_whole(tiny_tokenizer):
    """What n processes sample with parts (r, n) is what one process samples: each batch has its own seed."""
    from posttrain.dist import merge_parts
    from posttrain.generation import part_size

    model = load_causal_lm(ModelSpec(preset="tiny-student"), tiny_tokenizer, seed=0)
    prompts = _prompts(tiny_tokenizer) * 3
    cfg = SamplingConfig(max_new_tokens=6, temperature=1.0, batch_size=2, engine="hf")
    expected = [7, 3, 3, 9, 0, 3, 1] * 3  # aligned with prompts * 3: ties, each prompt's length three times
    for lengths in (None, expected):
        whole = generate(model, tiny_tokenizer, prompts, cfg, seed=5, lengths=lengths)
        parts = [
            generate(model, tiny_tokenizer, prompts, cfg, seed=5, part=(r, 3), lengths=lengths)
            for r in range(3)
        ]
        assert [sum(g is not None for g in p) for p in parts] == [
            part_size(len(prompts), 2, (r, 3)) for r in range(3)
        ]
        merged = [next(p[i] for p in parts if p[i] is not None) for i in range(len(prompts))]
        assert [g.ids for g in merged] == [g.ids for g in whole]
        assert merge_parts(whole) is whole  # one process: nothing to gather
        assert len({tuple(g.ids) for g in whole}) > 1  # really sampled


def test_generation_leaves_the_callers_random_state_as_it_was(tiny_tokenizer):
    """An evaluation inside a training run (greedy or sampled) must not reset the run's sampling state: the
    numbers drawn after it are the ones drawn without it."""
    model = load_causal_lm(ModelSpec(preset="tiny-student"), tiny_tokenizer, seed=0)
    torch.manual_seed(123)
    expected = torch.rand(4)
    for temperature in (0.0, 1.0):
        torch.manual_seed(123)
        generate(
            model,
            tiny_tokenizer,
            _prompts(tiny_tokenizer),
            SamplingConfig(max_new_tokens=4, temperature=temperature),
        )
        assert torch.equal(torch.rand(4), expected), temperature


@pytest.mark.stage
def test_untrained_model_is_marked_truncated(tiny_tokenizer):
    model = load_causal_lm(ModelSpec(preset="tiny-student"), tiny_tokenizer, seed=0)
    gens = generate(
        model, tiny_tokenizer, _prompts(tiny_tokenizer), SamplingConfig(max_new_tokens=4, temperature=0)
    )
    for g in gens:
        assert g.truncated == (len(g.ids) == 4)


@pytest.mark.stage
def test_trained_model_stops_at_end_of_turn(tiny_tokenizer, tmp_path):
    """After SFT on short answers the model emits <end_of_turn> (it is trained) and generation stops there."""
    rows = [{"id": str(i), "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": "ok"}]}
            for i, q in enumerate(QUESTIONS)]  # fmt: skip
    cfg = from_dict(TrainConfig, {"steps": 40, "batch_size": 7, "learning_rate": 1e-2, "warmup_ratio": 0.0,
                                  "logging_steps": 40, "save_steps": 1000})  # fmt: skip
    model = load_causal_lm(ModelSpec(preset="tiny-student"), tiny_tokenizer, seed=0)
    args = sft_args(cfg, tmp_path, 0, CHAT.max_length, False, False, "t")
    make_trainer(model, tiny_tokenizer, to_dataset(tokenize_rows(rows, tiny_tokenizer, CHAT)), None, cfg, args,
                 lambda r: None).train()  # fmt: skip
    sampling = SamplingConfig(max_new_tokens=20, temperature=0.0)
    gens = generate(model, tiny_tokenizer, _prompts(tiny_tokenizer, 20), sampling)
    assert [g.text for g in gens] == ["ok"] * len(QUESTIONS)
    assert not any(g.truncated for g in gens)
    # the raw output: "ok" then <end_of_turn>, then only padding (batch members that stopped)
    end = tiny_tokenizer.convert_tokens_to_ids("<end_of_turn>")
    p = _prompts(tiny_tokenizer, 20)[0]
    raw = model.generate(input_ids=torch.tensor([p]), max_new_tokens=20, do_sample=False)[
        0, len(p) :
    ].tolist()
    assert raw == tiny_tokenizer.convert_tokens_to_ids(["o", "k"]) + [end]
    rows_eval = [{"id": "e", "task": "add", "answer": "ok", "messages": rows[0]["messages"]}]
    res = world_eval(model, tiny_tokenizer, rows_eval, CHAT, "Pip", 20)
    assert res["score"] == 1.0 and res["per_task"] == {"add": 1.0} and res["truncation_rate"] == 0.0


# ------------------------------------------------------------------------------------ the vLLM engine (stub)
STUBS = str(Path(__file__).parent / "stubs")  # tests/stubs/vllm: a stand-in for vllm, which needs a GPU


def test_engine_groups_split_the_processes_by_tensor_parallel_size():
    from posttrain.generation import engine_group

    assert [engine_group(r, 8, 1) for r in (0, 3, 7)] == [(0, 8, True), (3, 8, True), (7, 8, True)]
    # 2 GPUs an engine: ranks 0,1 share engine 0 (rank 0 writes), 6,7 engine 3
    assert [engine_group(r, 8, 2) for r in (0, 1, 6, 7)] == [
        (0, 4, True),
        (0, 4, False),
        (3, 4, True),
        (3, 4, False),
    ]
    with pytest.raises(ValueError, match="tensor_parallel_size: 3 must divide the 8 processes"):
        engine_group(0, 8, 3)


def test_an_engine_that_drops_gemma_2_s_soft_caps_or_window_is_refused(tiny_tokenizer):
    from posttrain.generation import check_engine_config
    from posttrain.modeling import preset_config

    model = preset_config("tiny-teacher", tiny_tokenizer)
    check_engine_config(copy.deepcopy(model), model)  # the same config: accepted
    for key in ("attn_logit_softcapping", "final_logit_softcapping", "sliding_window"):
        engine = copy.deepcopy(model)
        setattr(engine, key, None)
        with pytest.raises(RuntimeError, match=rf"{key}: engine None, checkpoint {getattr(model, key)!r}"):
            check_engine_config(engine, model)


def test_engine_choice_vllm_needs_vllm_and_auto_needs_a_gpu_too(monkeypatch):
    from posttrain.engines.rollouts import engine_fields
    from posttrain.generation import use_vllm, vllm_installed

    assert not vllm_installed()  # this environment has none: the stub comes onto the path below
    assert use_vllm("hf") is False and use_vllm("auto") is False
    assert engine_fields("auto", "colocate", "rlhf") == {"use_vllm": False}
    with pytest.raises(RuntimeError, match="rlhf.engine is 'vllm' but vllm is not installed here"):
        engine_fields("vllm", "colocate", "rlhf")
    monkeypatch.syspath_prepend(STUBS)
    assert use_vllm("vllm") is True and use_vllm("auto") is torch.cuda.is_available()
    assert engine_fields("vllm", "server", "distill") == {"use_vllm": True, "vllm_mode": "server"}


def test_the_rlhf_stage_hands_its_engine_to_trl_s_config(monkeypatch, tmp_path):
    """`rlhf.engine: vllm` becomes RLOOConfig's use_vllm with the section's vllm_mode; TRL's other vLLM keys pass
    through `train.trl`."""
    from posttrain.config import load_recipe
    from posttrain.stages.rlhf import rloo_args

    monkeypatch.syspath_prepend(STUBS)
    root = Path(__file__).resolve().parents[1]
    recipe = load_recipe(root / "recipes/tiny/smoke.yaml", ["rlhf.engine=vllm",
                         "rlhf.train.trl={vllm_gpu_memory_utilization: 0.25}"])  # fmt: skip
    name, cfg = next(iter(recipe.rlhf.resolved().items()))
    args = rloo_args(recipe, name, cfg, tmp_path)
    assert (args.use_vllm, args.vllm_mode, args.vllm_gpu_memory_utilization) == (True, "colocate", 0.25)
    hf = load_recipe(root / "recipes/tiny/smoke.yaml", ["rlhf.engine=hf"])
    assert rloo_args(hf, name, hf.rlhf.resolved()[name], tmp_path).use_vllm is False


EOT_SCALE = 10.0  # 2 of the 28 greedy responses below end their turn (after 7 tokens), 26 are cut off


@pytest.mark.stage
def test_the_vllm_engine_s_shards_hold_what_hf_generate_writes(tiny_tokenizer, tmp_path, monkeypatch):
    """The generate stage's shards from a vLLM engine (the stand-in: HF greedy decoding, a prompt at a time, the stop
    token kept in the ids as vLLM keeps it) equal HF generate's at batch 1, both greedy, on a random teacher made
    to end its turn now and then (its `<end_of_turn>` embedding enlarged): some responses end, some are cut off."""
    import json

    from posttrain.config import load_recipe
    from posttrain.stages.generate import write_shards

    teacher = tmp_path / "teacher"
    model = load_causal_lm(ModelSpec(preset="tiny-teacher"), tiny_tokenizer, seed=5)
    with torch.no_grad():
        model.get_input_embeddings().weight[tiny_tokenizer.convert_tokens_to_ids("<end_of_turn>")] *= (
            EOT_SCALE
        )
    model.save_pretrained(teacher)
    tiny_tokenizer.save_pretrained(teacher)
    spec = ModelSpec(name_or_path=str(teacher))
    rows = [{"id": str(i), "messages": [{"role": "user", "content": q * (1 + i % 3)}]}
            for i, q in enumerate(QUESTIONS * 4)]  # fmt: skip
    prompts = [prompt_ids(r["messages"], tiny_tokenizer, CHAT, 16) for r in rows]
    root = Path(__file__).resolve().parents[1]
    monkeypatch.syspath_prepend(STUBS)
    monkeypatch.delitem(sys.modules, "vllm", raising=False)
    shards = {}
    for engine in ("hf", "vllm"):
        recipe = load_recipe(root / "recipes/tiny/smoke.yaml", [f"generate.engine={engine}", "generate.temperature=0",
                             "generate.batch_size=1", "generate.max_new_tokens=16", "generate.shard_size=8"])  # fmt: skip
        (tmp_path / engine).mkdir()
        used, _ = write_shards(recipe, spec, tiny_tokenizer, rows, prompts, list(range(0, len(rows), 8)),
                               tmp_path / engine)  # fmt: skip
        assert used == engine
        shards[engine] = {f.name: f.read_text() for f in sorted((tmp_path / engine).iterdir())}
    sys.modules.pop("vllm", None)
    assert shards["vllm"] == shards["hf"] and len(shards["hf"]) == 4
    gens = [json.loads(x) for text in shards["hf"].values() for x in text.splitlines()]
    assert 0 < sum(g["truncated"] for g in gens) < len(gens) and any(g["response"] for g in gens)


def test_generation_leaves_the_caller_s_random_sequence_as_it_was(tiny_tokenizer):
    """An evaluation in the middle of training samples with seeds of its own on a copy of the random state: the
    training's sampling sequence goes on as if it had not run (a global reseed made runs share their noise)."""
    model = load_causal_lm(ModelSpec(preset="tiny-student"), tiny_tokenizer, seed=1)
    cfg = SamplingConfig(max_new_tokens=4, temperature=1.0, batch_size=4, engine="hf")
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    first = generate(model, tiny_tokenizer, _prompts(tiny_tokenizer), cfg, seed=0)
    assert torch.equal(torch.rand(3), expected)
    again = generate(model, tiny_tokenizer, _prompts(tiny_tokenizer), cfg, seed=0)
    assert [g.ids for g in again] == [g.ids for g in first]  # its own seeds: the same samples
