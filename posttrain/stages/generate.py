"""`generate` stage: the teacher writes a response to every training prompt; the data filters run on them.

For each training conversation of the `data` stage, the prompt (every turn before the final model turn) is
rendered with the generation prompt and the teacher samples a response (`generate:` settings: temperature,
top-p/top-k, max_new_tokens; batched HF `generate` with the KV cache and left padding, or vLLM on a GPU when
installed). Prompts are processed in shards of `generate.shard_size`; each finished shard is written atomically
to `shards/`, so a killed run continues from the last finished shard when rerun with the same recipe. Started
as several processes (`launchers: {generate: ddp}`), each loads the teacher on its own GPU and writes every n-th
shard; the main one then filters and writes the stage folder. Shards are seeded by position: the output is the
same in any number of processes.

Then: responses without a stop token within max_new_tokens (truncated) or containing a control token are
dropped and counted; the rest become conversations (`meta.teacher`, `meta.sampling` record their provenance)
and pass the Gemma 2 data filters of the `data:` section (personal data, unsafe content, self-identification,
contamination with the evaluation prompts, duplicates) and the length check, with a report.
On the built-in world the report also gives the share of teacher responses the verifiers accept.

Writes `runs/<recipe>/generate/`: `data/train.jsonl` (the student's SFT data), `data/eval.jsonl` (the data
stage's evaluation split), `generate_report.{json,md}`, `metrics.jsonl`, `provenance.json`, `DONE`.

    CPU:      posttrain run recipes/tiny/pipeline.yaml --only generate
    one GPU:  posttrain stage generate RECIPE        (vLLM when installed, else HF generate in bf16)
"""

from __future__ import annotations

import json
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any

from posttrain import world
from posttrain.chat import prompt_messages
from posttrain.config import ModelSpec, Recipe, to_dict
from posttrain.data.filters import apply_filters
from posttrain.data.formats import check_dropped, length_check
from posttrain.data.jsonl import read_split, write_splits
from posttrain.dist import barrier, is_main, rank, world_size
from posttrain.files import write_atomic
from posttrain.outputs import Parents, StageOutput, teacher_spec


def parents(recipe: Recipe) -> list[str]:
    return ["data", "teacher"] if recipe.teacher_train is not None else ["data"]


def stage_config(recipe: Recipe) -> dict[str, Any]:
    return {"teacher": recipe.teacher, "generate": recipe.generate, "chat": recipe.chat,
            "seed": recipe.seed_for("generate"),
            "filters": recipe.data.filters, "max_dropped_fraction": recipe.data.max_dropped_fraction}  # fmt: skip


def main(recipe: Recipe, parents: Parents) -> Path:
    from posttrain.generation import prompt_ids
    from posttrain.modeling import load_tokenizer

    # --- config & logging
    cfg = recipe.generate
    with StageOutput(recipe.run_dir / "generate", "generate", stage_config(recipe), parents.hashes,
                     resume=True) as out:  # fmt: skip
        print(f"[generate] recipe {recipe.name}, config {out.hash}: {json.dumps(to_dict(cfg))}")
        # --- data
        rows = read_split(parents.split("data", "train"))
        eval_rows = read_split(parents.split("data", "eval"))
        spec = teacher_spec(recipe, parents)
        tokenizer = load_tokenizer(spec)
        prompts = [prompt_ids(r["messages"], tokenizer, recipe.chat, cfg.max_new_tokens, r.get("id", "?"))
                   for r in rows]  # fmt: skip
        shards = out.path / "shards"
        shards.mkdir(exist_ok=True)
        starts = list(range(0, len(rows), cfg.shard_size))
        todo = [s for s in starts if not (shards / f"{s:08d}.jsonl").exists()]
        if len(todo) < len(starts):
            print(f"[generate] resuming: {len(starts) - len(todo)} of {len(starts)} shards already written")
        # --- models and generation (several processes: each its own copy, on its own GPU, and every n-th shard)
        engine, t0 = write_shards(recipe, spec, tokenizer, rows, prompts, todo, shards)
        barrier()  # every shard written
        seconds = time.time() - t0
        if not is_main():
            return out.final
        written = {
            s: [json.loads(x) for x in (shards / f"{s:08d}.jsonl").read_text().splitlines()] for s in starts
        }
        for s in todo:  # the shards this run wrote, whichever process wrote them
            out.log({"shard": s, "prompts": len(written[s]), "tokens": sum(g["tokens"] for g in written[s])})
        n_todo = sum(len(written[s]) for s in todo)
        new_tokens = sum(g["tokens"] for s in todo for g in written[s])
        # --- filter
        gens_by_row = [g for s in starts for g in written[s]]
        report, kept = build_and_filter(recipe, rows, gens_by_row, eval_rows, tokenizer, spec)
        report["throughput"] = {"seconds": round(seconds, 2), "prompts": n_todo,
                                "new_tokens": new_tokens, "tokens_per_s": round(new_tokens / max(seconds, 1e-9), 1),
                                "engine": engine, "batch_size": cfg.batch_size}  # fmt: skip
        # --- save
        write_splits(out.path, {"train": kept, "eval": eval_rows})
        (out.path / "generate_report.json").write_text(json.dumps(report, indent=2) + "\n")
        (out.path / "generate_report.md").write_text(report_markdown(report))
        print(report_markdown(report))
        shutil.rmtree(shards)
        out.summary = {"rows_in": len(rows), "rows_out": len(kept), **report["throughput"],
                       "teacher_correct": report.get("teacher_correct")}  # fmt: skip
    return out.final


def write_shards(recipe: Recipe, spec: ModelSpec, tokenizer, rows: list[dict], prompts: list[list[int]],
                 todo: list[int], shards: Path) -> tuple[str, float]:  # fmt: skip
    """The teacher answers the prompts of this process's shards (every n-th of `todo` in n processes), each shard
    written atomically as it finishes and seeded by its position, so that the split over processes does not
    change it. Returns the engine used (`hf` or `vllm`) and the time generation started (the model loaded)."""
    from tqdm.auto import tqdm

    from posttrain.generation import (
        engine_group,
        generate,
        generate_vllm,
        reference_lengths,
        use_vllm,
        vllm_engine,
    )
    from posttrain.modeling import check_pin, load_causal_lm

    cfg, seed = recipe.generate, recipe.seed_for("generate")
    vllm = use_vllm(cfg.engine)
    # HF: every process its own copy of the teacher; vLLM: groups of tensor_parallel_size processes share one
    # engine, every process of a group generates the group's prompts, its first process writes them
    group, groups, writer = engine_group(rank(), world_size(), cfg.tensor_parallel_size if vllm else 1)
    mine = todo[group::groups]
    if vllm and mine:
        check_pin(spec)  # vLLM reads the folder itself: a pinned one is checked first, as HF loading does
        engine = vllm_engine(spec.name_or_path, cfg, seed, recipe.chat.max_length)
    else:
        model = load_causal_lm(spec, tokenizer, seed=seed) if mine else None
    if is_main():
        announce_engine(vllm, cfg, groups)

    def size(start: int) -> int:
        return min(cfg.shard_size, len(rows) - start)

    # in one process the bar counts the shards a killed run already wrote; in several, this process's own
    shown_done = len(rows) - sum(map(size, todo)) if world_size() == 1 else 0
    bar = tqdm(total=sum(map(size, mine)) + shown_done, initial=shown_done, desc="[generate] teacher responses",
               unit="prompt", disable=not is_main())  # fmt: skip
    expected = reference_lengths(rows)  # HF's batches group responses of similar expected length
    t0 = time.time()
    for s in mine:
        batch = prompts[s : s + cfg.shard_size]
        if vllm:
            gens = generate_vllm(engine, tokenizer, batch, cfg, seed=seed + s)
            bar.update(len(batch))
        else:
            gens = generate(model, tokenizer, batch, cfg, seed=seed + s, progress=bar,
                            lengths=expected[s : s + cfg.shard_size])  # fmt: skip
        if not writer:
            continue
        write_atomic(shards / f"{s:08d}.jsonl", shard_text(rows[s : s + len(gens)], gens))
    bar.close()
    return ("vllm" if vllm else "hf"), t0


def announce_engine(vllm: bool, cfg: Any, groups: int) -> None:
    """Says which engine generates and, over several processes or engines, which shards each writes."""
    print(f"[generate] engine: {'vllm' if vllm else 'hf'} (generate.engine: {cfg.engine})")
    if groups > 1:
        tp = cfg.tensor_parallel_size
        what = (
            f"vLLM engines ({tp} GPU{'s' if tp > 1 else ''} each): engine" if vllm else "processes: process"
        )
        print(f"[generate] {groups} {what} r writes shards r, r + {groups}, …")


def shard_text(rows: list[dict], gens: list) -> str:
    """One shard's JSON lines: each row's id and the teacher's response with its flags and length."""
    lines = [json.dumps({"id": r.get("id"), "response": g.text, "truncated": g.truncated, "malformed": g.malformed,
                         "tokens": len(g.ids)}, ensure_ascii=False) for r, g in zip(rows, gens)]  # fmt: skip
    return "\n".join(lines) + "\n"


def build_and_filter(recipe: Recipe, rows: list[dict], gens: list[dict], eval_rows: list[dict], tokenizer,
                     spec: ModelSpec) -> tuple[dict, list[dict]]:  # fmt: skip
    """Teacher responses → conversations; drop truncated/malformed; length check; the data filters."""
    sampling = to_dict(recipe.generate)
    teacher = spec.name_or_path or spec.preset
    dropped: Counter = Counter()
    convs, correct = [], []
    for row, g in zip(rows, gens):
        if g["truncated"] or g["malformed"] or not g["response"]:
            dropped["truncated" if g["truncated"] else "malformed" if g["malformed"] else "empty"] += 1
            continue
        conv = {k: v for k, v in row.items() if k not in ("messages", "meta")}
        conv["messages"] = prompt_messages(row["messages"]) + [
            {"role": "assistant", "content": g["response"]}
        ]
        conv["meta"] = {"teacher": teacher, "sampling": sampling, "source_id": row.get("id")}
        if "task" in row and "answer" in row:
            correct.append(world.score(row, g["response"], recipe.world.assistant_name))
        convs.append(conv)
    kept, too_long, _ = length_check(convs, "conversations", tokenizer, recipe.chat)
    too_long_n = {k: len(v) for k, v in too_long.items()}
    n_bad = sum(dropped.values()) + sum(too_long_n.values())
    detail = f"teacher responses were truncated, malformed or too long ({dict(dropped)}, {too_long_n})"
    check_dropped("generate", n_bad, len(rows), recipe.data.max_dropped_fraction, "data.max_dropped_fraction",
                  detail, "raise generate.max_new_tokens / chat.max_length or check the teacher")  # fmt: skip
    kept, filt = apply_filters(kept, recipe.data.filters, eval_rows)
    report = {
        "rows_in": len(rows), "dropped": dict(dropped), "too_long": too_long_n,
        "filters": filt, "rows_out": len(kept),
    }  # fmt: skip
    if correct:
        report["teacher_correct"] = round(sum(correct) / len(correct), 4)
    return report, kept


def report_markdown(report: dict) -> str:
    lines = ["## Teacher responses", "", "| | rows |", "|---|---:|", f"| prompts | {report['rows_in']} |"]
    for k, v in {**report["dropped"], **report["too_long"]}.items():
        lines.append(f"| dropped: {k} | {v} |")
    for k, v in report["filters"]["removed"].items():
        lines.append(f"| removed: {k} (e.g. {', '.join(v['examples'][:2])}) | {v['count']} |")
    lines.append(f"| **conversations for SFT** | **{report['rows_out']}** |")
    if "teacher_correct" in report:
        lines.append(f"| teacher responses the world's verifiers accept | {report['teacher_correct']:.1%} |")
    t = report.get("throughput")
    if t:
        lines += ["", f"Generation ({t['engine']}, batch {t['batch_size']}): {t['prompts']} prompts, "
                  f"{t['new_tokens']} new tokens in {t['seconds']} s ({t['tokens_per_s']} tokens/s)."]  # fmt: skip
    return "\n".join(lines) + "\n"
