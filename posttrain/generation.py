"""Batched generation from rendered prompts, and the world evaluation built on it.

Prompts are rendered by the project's renderer (one `<bos>`, ending in `<start_of_turn>model\\n`), left-padded by
hand with the pad id and an attention mask, and generated with HF `generate` and its KV cache. Batches are formed
longest first, by the length of the response expected of each prompt where that is known (`reference_lengths`:
HF runs a batch until its longest response stops), then by the prompt's own length, so that a batch carries little
padding; results come back in the input order. Generation stops on `<end_of_turn>` and `<eos>`; a response that
reaches `max_new_tokens` without a stop is marked truncated. With `temperature: 0` decoding is greedy. vLLM
(`engine: vllm`, or `auto` on a GPU where vllm is installed) takes the same token ids and stop ids.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from posttrain.chat import CONTROL_TOKENS, final_response, prompt_messages, render, stop_ids
from posttrain.config import SamplingConfig


@dataclass
class Generation:
    ids: list[int]  # generated ids, without the stop token
    text: str
    truncated: bool  # no stop within max_new_tokens
    malformed: bool  # contains a control token (it would forge a turn)


def prompt_ids(
    messages: list[dict], tokenizer: Any, chat: Any, max_new_tokens: int, where: str = "?"
) -> list[int]:
    """The prompt part of a conversation, rendered with the generation prompt, cut from the left to leave room
    for `max_new_tokens` within `chat.max_length`."""
    r = render(
        prompt_messages(messages), tokenizer, add_generation_prompt=True, system=chat.system, where=where
    )
    room = max(chat.max_length - max_new_tokens, 8)
    ids = r.input_ids
    return ids if len(ids) <= room else ids[:1] + ids[len(ids) - room + 1 :]


def decode(ids: list[int], tokenizer: Any, stops: list[int], max_new: int) -> Generation:
    """Generated ids → the response before the first stop token (pads dropped); truncated when no stop came
    within `max_new` tokens, malformed when the text holds a control token."""
    cut = next((i for i, t in enumerate(ids) if t in stops), None)
    body = ids if cut is None else ids[:cut]
    body = [t for t in body if t != tokenizer.pad_token_id]
    text = tokenizer.decode(body, skip_special_tokens=False)
    return Generation(
        ids=body, text=text.strip(), truncated=cut is None and len(ids) >= max_new,
        malformed=any(tok in text for tok in CONTROL_TOKENS),
    )  # fmt: skip


def use_vllm(engine: str, key: str = "generate.engine") -> bool:
    """Whether a stage generates with vLLM: `vllm` (refused where vllm is not installed, naming `key`), `hf`, or
    `auto` = vLLM where it is installed and a GPU is present."""
    if engine == "hf":
        return False
    if not vllm_installed():
        if engine == "vllm":
            raise RuntimeError(
                f"{key} is 'vllm' but vllm is not installed here; pip install vllm, or set 'hf'"
            )
        return False
    import torch

    return engine == "vllm" or torch.cuda.is_available()


def vllm_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def generate(
    model,
    tokenizer: Any,
    prompts: list[list[int]],
    cfg: SamplingConfig,
    seed: int = 0,
    progress: Any = None,
    part: tuple[int, int] = (0, 1),
    lengths: list[int] | None = None,
) -> list[Generation]:
    """Generate one response per prompt (token ids). `progress`: a tqdm bar advanced by prompts done.

    Prompts go in batches by expected response length (`lengths`, e.g. `reference_lengths`; none: all equal),
    then by prompt length, longest first, so that a batch's responses end at about the same step. Each batch is
    sampled with its own seed (`seed` + its position) on a copy of the random state, which is left as it was
    (`torch.random.fork_rng`). With `part=(r, n)` only every n-th batch from the r-th is generated (the others
    are None): n processes with parts (0, n) … (n-1, n) together produce exactly what one process produces
    (`posttrain.dist.merge_parts`)."""
    import torch

    with torch.no_grad():
        return _generate(model, tokenizer, prompts, cfg, seed, progress, part, lengths)


def reference_lengths(rows: list[dict]) -> list[int]:
    """Each row's reference response length in characters (its final message, where that is the model's; 0 where
    the row is a bare prompt): how long a response to it will likely be, for `generate`'s batches."""
    return [len(final_response(r["messages"]) or "") for r in rows]


def part_size(n: int, batch_size: int, part: tuple[int, int]) -> int:
    """How many of n prompts `generate(..., part=part)` answers."""
    starts = range(0, n, batch_size)
    return sum(min(batch_size, n - b) for k, b in enumerate(starts) if k % part[1] == part[0])


def _generate(model, tokenizer, prompts, cfg, seed, progress, part=(0, 1), lengths=None):
    import torch

    stops = stop_ids(tokenizer)
    expected = [0] * len(prompts) if lengths is None else lengths
    if len(expected) != len(prompts):
        raise ValueError(f"generate: {len(expected)} expected lengths for {len(prompts)} prompts")
    order = sorted(range(len(prompts)), key=lambda i: (-expected[i], -len(prompts[i])))
    out: list[Generation | None] = [None] * len(prompts)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    for k, b in enumerate(range(0, len(order), cfg.batch_size)):
        if k % part[1] != part[0]:
            continue
        idx = order[b : b + cfg.batch_size]
        width = max(len(prompts[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            p = prompts[i]
            ids[row, width - len(p) :] = torch.tensor(p)
            mask[row, width - len(p) :] = 1
        sample = cfg.temperature > 0
        # each batch sampled with its own seed, on a copy of the random state: a training stage that evaluates
        # mid-run keeps its own sampling sequence (and RL runs do not share the evaluation's noise)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed + b)
            gen = model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=cfg.max_new_tokens,
                do_sample=sample, temperature=cfg.temperature if sample else None,
                top_p=cfg.top_p if sample else None, top_k=cfg.top_k if sample else None,
                eos_token_id=stops, pad_token_id=pad,
            )  # fmt: skip
        for row, i in enumerate(idx):
            out[i] = decode(gen[row, width:].tolist(), tokenizer, stops, cfg.max_new_tokens)
        if progress is not None:
            progress.update(len(idx))
    model.train(was_training)
    return out  # type: ignore[return-value]


def engine_group(rank: int, world: int, tensor_parallel: int) -> tuple[int, int, bool]:
    """Processes sharing one vLLM engine: `tensor_parallel` consecutive ranks form a group (as TRL's colocate mode
    groups them). Returns (this process's group, the number of groups, whether it writes its group's output)."""
    if tensor_parallel < 1 or world % tensor_parallel:
        raise ValueError(
            f"generate.tensor_parallel_size: {tensor_parallel} must divide the {world} processes of the stage"
        )
    return rank // tensor_parallel, world // tensor_parallel, rank % tensor_parallel == 0


def vllm_engine(model_dir: str, cfg: SamplingConfig, seed: int, max_model_len: int | None = None):
    """One vLLM engine for the whole stage in this process. In several processes (`accelerate launch`) each group
    of `cfg.tensor_parallel_size` consecutive ranks shares one engine on its GPUs through vLLM's
    `external_launcher` (as TRL's colocate mode builds it), each group answering its own prompts. The engine's
    model config is checked against the checkpoint's: Gemma 2's soft-caps and sliding window kept
    (`check_engine_config`)."""
    from transformers import AutoConfig
    from vllm import LLM

    from posttrain.dist import rank, world_size

    group, _, _ = engine_group(rank(), world_size(), cfg.tensor_parallel_size)
    extra = {"distributed_executor_backend": "external_launcher"} if world_size() > 1 else {}
    llm = LLM(
        model=model_dir, dtype="bfloat16", seed=seed + group, tensor_parallel_size=cfg.tensor_parallel_size,
        gpu_memory_utilization=cfg.gpu_memory_utilization, max_model_len=max_model_len, **extra,
    )  # fmt: skip
    check_engine_config(llm.llm_engine.model_config.hf_config, AutoConfig.from_pretrained(model_dir))
    return llm


SOFTCAP_KEYS = (
    "attn_logit_softcapping",
    "final_logit_softcapping",
    "sliding_window",
    "query_pre_attn_scalar",
)


def check_engine_config(engine_config: Any, model_config: Any) -> None:
    """A generation engine must compute what the checkpoint computes: for Gemma 2 the attention and final-logit
    soft-caps, the sliding window and the query scale as the checkpoint's config has them (an engine that drops a
    soft-cap samples from another distribution than the one trained and scored). A mismatch is refused."""
    if getattr(model_config, "model_type", None) != "gemma2":
        return
    wrong = [
        f"{k}: engine {getattr(engine_config, k, None)!r}, checkpoint {getattr(model_config, k, None)!r}"
        for k in SOFTCAP_KEYS
        if getattr(engine_config, k, None) != getattr(model_config, k, None)
    ]
    if wrong:
        raise RuntimeError(
            "the generation engine's Gemma 2 config differs from the checkpoint's ("
            + "; ".join(wrong)
            + "): it would not sample from the trained model; use engine 'hf' or a vLLM "
            "version that keeps Gemma 2's soft-capping and sliding window"
        )


def generate_vllm(llm, tokenizer: Any, prompts: list[list[int]], cfg: SamplingConfig, seed: int = 0):
    """The same contract as `generate`, on a vLLM engine built once for the stage (`vllm_engine`): the same
    prompt ids, stop ids and sampling settings (top-k 0 = off), each prompt seeded by `seed` + its position."""
    from vllm import SamplingParams, TokensPrompt

    stops = stop_ids(tokenizer)
    params = [
        SamplingParams(
            n=1, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k or -1,
            max_tokens=cfg.max_new_tokens, stop_token_ids=stops, seed=seed + i,
        )
        for i in range(len(prompts))
    ]  # fmt: skip
    results = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    return [decode(list(r.outputs[0].token_ids), tokenizer, stops, cfg.max_new_tokens) for r in results]


# ------------------------------------------------------------------------------------------ world evaluation


def world_eval(
    model, tokenizer: Any, rows: list[dict], chat: Any, assistant_name: str, max_new_tokens: int = 64,
    batch_size: int = 64,
) -> dict[str, Any]:  # fmt: skip
    """Greedy responses to the world's evaluation prompts, scored by its verifiers.

    Returns {"score", "per_task": {task: score}, "n", "scores" (one per row, in order), "truncation_rate",
    "mean_length", "examples": [...]}."""
    from posttrain import world

    cfg = SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0, batch_size=batch_size, engine="hf")
    t0 = time.time()
    prompts = [prompt_ids(r["messages"], tokenizer, chat, max_new_tokens, r.get("id", "?")) for r in rows]
    gens = generate(model, tokenizer, prompts, cfg, lengths=reference_lengths(rows))
    scores = [world.score(r, g.text, assistant_name) for r, g in zip(rows, gens)]
    by_task: dict[str, list[float]] = defaultdict(list)
    for r, s in zip(rows, scores):
        by_task[r["task"]].append(s)
    return {
        "score": sum(scores) / max(len(scores), 1),
        "per_task": {t: sum(v) / len(v) for t, v in sorted(by_task.items())},
        "n": len(rows),
        "scores": scores,
        "truncation_rate": sum(g.truncated for g in gens) / max(len(gens), 1),
        "mean_length": sum(len(g.ids) for g in gens) / max(len(gens), 1),
        "seconds": round(time.time() - t0, 2),
        "examples": [
            {
                "prompt": r["messages"][-2]["content"] if len(r["messages"]) > 1 else "",
                "response": g.text,
                "answer": r.get("answer"),
            }
            for r, g in list(zip(rows, gens))[:: max(len(rows) // 7, 1)][:7]
        ],  # fmt: skip
    }
