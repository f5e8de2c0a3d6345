"""`make bench`: speed figures measured side by side in one run and printed as ratios against a baseline.

    generation   batched teacher generation (the `generate` stage's path) vs one prompt at a time, same model,
                 same prompts, greedy, so both produce the same tokens
    batch order  the same, batches formed by the reference responses' lengths (`reference_lengths`, what the
                 stages pass) vs by the prompts' lengths alone, on all the held-out prompts (the recipe's
                 n_eval; not cut to --prompts: a few batches would hide what the order changes)
    merge memory peak memory growth of a streaming merge of 3 models (a fresh process, `ru_maxrss`) vs the size
                 of one model and of the largest tensor
    sft          the `sft` stage's trainer (the recipe's settings, renderer ids and labels) vs TRL's SFTTrainer with
                 its defaults on the same model and conversations: tokens/s and trained tokens/s
    flop/s       the sft trainer's FLOP/s (transformers' 6 × parameters × tokens count) vs a fp32 matmul on
                 this machine
    outside      the share of a finished run's wall time spent outside training (process start-up, loading,
                 evaluation, generation, saving), from the run folder's metrics and a measured stage start-up

Run: `python -m posttrain.bench [--recipe R] [--prompts N]`. The teacher is the recipe's own (the tiny recipe's
shipped one), or its `teacher` stage's when the recipe trains one and it is done, else an untrained tiny-teacher
preset (said in the output).
"""

from __future__ import annotations

import argparse
import time


def bench_generation(recipe, n_prompts: int) -> dict:
    from posttrain import world
    from posttrain.config import ModelSpec, SamplingConfig
    from posttrain.generation import generate, prompt_ids
    from posttrain.modeling import load_causal_lm, load_tokenizer
    from posttrain.outputs import read_done, stage_model

    folder = recipe.run_dir / "teacher"
    if recipe.teacher is not None and not recipe.has_stage("teacher"):
        spec, which = (
            recipe.teacher,
            f"the recipe's teacher {recipe.teacher.name_or_path or recipe.teacher.preset}",
        )
    elif read_done(folder):
        spec, which = stage_model(folder, recipe.teacher), f"trained teacher {folder}/model"
    else:
        spec, which = ModelSpec(preset="tiny-teacher", tokenizer="tiny"), "untrained tiny-teacher preset"
    tok = load_tokenizer(spec)
    model = load_causal_lm(spec, tok)
    rows = world.eval_split(recipe.world, recipe.seed)[:n_prompts]
    cfg = SamplingConfig(max_new_tokens=recipe.generate.max_new_tokens, temperature=0.0,
                         batch_size=recipe.generate.batch_size, engine="hf")  # fmt: skip
    prompts = [prompt_ids(r["messages"], tok, recipe.chat, cfg.max_new_tokens) for r in rows]
    generate(model, tok, prompts[:4], cfg)  # warm-up
    t0 = time.perf_counter()
    batched = generate(model, tok, prompts, cfg)
    t_batched = time.perf_counter() - t0
    t0 = time.perf_counter()
    single = [generate(model, tok, [p], cfg)[0] for p in prompts]
    t_single = time.perf_counter() - t0
    same = sum(a.ids == b.ids for a, b in zip(batched, single))
    tokens = sum(len(g.ids) + 1 for g in batched)
    return {"model": which, "prompts": len(prompts), "batch_size": cfg.batch_size, "new_tokens": tokens,
            "batched_s": t_batched, "one_at_a_time_s": t_single, "ratio": t_single / t_batched,
            "identical_outputs": f"{same}/{len(prompts)}",
            "order": batch_order(model, tok, recipe, world.eval_split(recipe.world, recipe.seed), cfg)}  # fmt: skip


def batch_order(model, tok, recipe, rows: list[dict], cfg) -> dict:
    """Greedy answers to `rows` in batches formed by their reference responses' lengths vs by the prompts'
    lengths alone: seconds of each (the faster of two tries), and how many answers are the same."""
    from posttrain.generation import generate, prompt_ids, reference_lengths

    prompts = [prompt_ids(r["messages"], tok, recipe.chat, cfg.max_new_tokens) for r in rows]
    expected = reference_lengths(rows)
    times: dict[str, float] = {}
    outs = {}
    for _ in range(2):
        for name, lengths in (("prompt", None), ("reference", expected)):
            t0 = time.perf_counter()
            outs[name] = generate(model, tok, prompts, cfg, lengths=lengths)
            times[name] = min(times.get(name, float("inf")), time.perf_counter() - t0)
    same = sum(a.ids == b.ids for a, b in zip(outs["prompt"], outs["reference"]))
    return {"prompts": len(prompts), "by_prompt_s": times["prompt"], "by_reference_s": times["reference"],
            "identical_outputs": f"{same}/{len(prompts)}"}  # fmt: skip


def bench_sft(recipe, steps: int, n_rows: int = 2048) -> dict:
    """The project's SFT trainer vs TRL's SFTTrainer defaults: same fresh student, same conversations."""
    import dataclasses
    import tempfile
    from pathlib import Path

    import trl
    from datasets import Dataset

    from posttrain import world
    from posttrain.engines.sft import make_trainer, sft_args, to_dataset, tokenize_rows
    from posttrain.modeling import load_causal_lm, load_tokenizer

    rows = world.train_split(recipe.world, recipe.seed, n=n_rows)
    tok = load_tokenizer(recipe.model)
    out: dict = {"steps": steps}
    with tempfile.TemporaryDirectory() as tmp:
        # ours: the recipe's sft settings (batch size, learning rate …), only the step count changed
        cfg = dataclasses.replace(
            recipe.sft, steps=steps, save_steps=10**9, logging_steps=steps, eval_steps=0
        )
        examples = tokenize_rows(rows, tok, recipe.chat)
        args = sft_args(cfg, Path(tmp) / "ours", recipe.seed, recipe.chat.max_length, False, False, "bench")
        args.disable_tqdm, args.include_num_input_tokens_seen = True, "non_padding"
        trainer = make_trainer(load_causal_lm(recipe.model, tok, seed=recipe.seed), tok, to_dataset(examples),
                               None, cfg, args, lambda row: None)  # fmt: skip
        r = trainer.train().metrics
        per_step = cfg.batch_size * cfg.grad_accum
        n_tokens = sum(len(e["input_ids"]) for e in examples)
        trained_share = sum(sum(x != -100 for x in e["labels"]) for e in examples) / n_tokens  # model turns
        tokens = trainer.state.num_input_tokens_seen  # non-padding
        out["ours"] = {"batch_size": per_step, "seconds": r["train_runtime"], "tokens_per_s": tokens / r["train_runtime"],
                       "trained_per_s": tokens * trained_share / r["train_runtime"], "flos": trainer.state.total_flos}  # fmt: skip
        # TRL's defaults: conversations in, its chat template, loss on every token, its batch size
        ds = Dataset.from_list([{"messages": r["messages"]} for r in rows])
        targs = trl.SFTConfig(output_dir=str(Path(tmp) / "trl"), max_steps=steps, report_to=[], use_cpu=True,
                              save_strategy="no", logging_steps=steps, disable_tqdm=True, dataset_num_proc=None,
                              include_num_input_tokens_seen="non_padding")  # fmt: skip
        ttrainer = trl.SFTTrainer(model=load_causal_lm(recipe.model, tok, seed=recipe.seed), args=targs,
                                  train_dataset=ds, processing_class=tok)  # fmt: skip
        t = ttrainer.train().metrics
        ttokens = ttrainer.state.num_input_tokens_seen
        out["trl"] = {"batch_size": targs.per_device_train_batch_size * targs.gradient_accumulation_steps,
                      "seconds": t["train_runtime"], "tokens_per_s": ttokens / t["train_runtime"],
                      "trained_per_s": ttokens / t["train_runtime"]}  # fmt: skip
    return out


def matmul_flops(n: int = 1024, seconds: float = 2.0) -> float:
    """This machine's fp32 matmul FLOP/s (torch, all its threads)."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    count, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        count += 1
    return 2 * n**3 * count / (time.perf_counter() - t0)


def stage_startup() -> float:
    """Seconds from starting a stage's job (the cpu launcher) to its libraries imported."""
    import subprocess
    import sys

    from posttrain.config import launcher_file

    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--quiet", "--config_file",
                    str(launcher_file("cpu")), "-m", "posttrain.bench", "--startup-probe"], check=True,
                   capture_output=True)  # fmt: skip
    return time.perf_counter() - t0


def time_outside_training(run_dir, startup: float, names: list[str] | None = None) -> dict | None:
    """Over a finished run folder's stages (`names`: the recipe's; default every stage name): wall time (stage wall
    + start-up) and time inside trainer.train."""
    import json

    from posttrain.files import read_summary
    from posttrain.registry import NAMES

    wall = train = 0.0
    stages = []
    for stage in names or NAMES:
        folder = run_dir / stage
        s = read_summary(folder) if (folder / "DONE").exists() else {}
        if "wall_time_s" not in s:
            continue
        stages.append(stage)
        wall += s["wall_time_s"] + startup
        # the stage's own metrics, else its runs' (rlhf/<run>/): the stage repeats its runs' rows
        for metrics in [[folder / "metrics.jsonl"], sorted(folder.glob("*/metrics.jsonl"))]:
            rows = [json.loads(x) for f in metrics if f.exists() for x in f.read_text().splitlines()]
            inside = sum(r.get("train_runtime", 0.0) for r in rows)
            if inside:
                train += inside
                break
    if not stages:
        return None
    return {"stages": stages, "wall_s": wall, "train_s": train, "outside_share": 1 - train / wall}


_MERGE_SCRIPT = """
import resource, sys, json
from posttrain.merging import merge_models
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
merge_models(sys.argv[2:-1], sys.argv[-1], sys.argv[1], base=sys.argv[2] if sys.argv[1] != "linear" else None, eta=0.5)
print(json.dumps({"peak_growth": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024}))
"""


def merge_memory(
    workdir, n_models: int = 3, n_tensors: int = 12, side: int = 2048, method: str = "liti"
) -> dict:
    """Save `n_models` models of `n_tensors` fp32 (side × side) tensors, merge them in a fresh process and return
    the peak RSS growth of that process against the model size and the largest tensor."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    import torch
    from safetensors.torch import save_file

    folders = []
    for m in range(n_models):
        folder = Path(workdir) / f"m{m}"
        folder.mkdir(parents=True, exist_ok=True)
        g = torch.Generator().manual_seed(m)
        save_file({f"layer{i}.weight": torch.randn(side, side, generator=g) for i in range(n_tensors)},
                  str(folder / "model.safetensors"))  # fmt: skip
        (folder / "config.json").write_text(json.dumps({"model_type": "bench"}))
        folders.append(str(folder))
    out = subprocess.run([sys.executable, "-c", _MERGE_SCRIPT, method, *folders, str(Path(workdir) / "merged")],
                         capture_output=True, text=True, check=True)  # fmt: skip
    growth = json.loads(out.stdout.strip().splitlines()[-1])["peak_growth"]
    tensor = side * side * 4
    return {"models": n_models, "model_bytes": tensor * n_tensors, "tensor_bytes": tensor, "peak_growth": growth,
            "vs_model": growth / (tensor * n_tensors), "vs_tensor": growth / tensor, "method": method}  # fmt: skip


def generation_rows(g: dict) -> list[str]:
    """The table's generation rows: batched vs one at a time, and the batch order."""
    o = g["order"]
    return [
        f"| generation, {g['prompts']} prompts, {g['model']} | one at a time: {g['one_at_a_time_s']:.2f} s | "
        f"batched ({g['batch_size']}): {g['batched_s']:.2f} s, {g['new_tokens'] / g['batched_s']:.0f} tok/s | "
        f"**{g['ratio']:.1f}×** faster (outputs identical: {g['identical_outputs']}) |",
        f"| generation batches, {o['prompts']} held-out prompts, the same model | formed by prompt length: "
        f"{o['by_prompt_s']:.2f} s | by the reference responses' length: {o['by_reference_s']:.2f} s | "
        f"**{o['by_prompt_s'] / o['by_reference_s']:.2f}×** faster (outputs identical: {o['identical_outputs']}) |",
    ]


def main(argv: list[str] | None = None) -> int:
    from posttrain.config import load_recipe

    p = argparse.ArgumentParser(prog="posttrain.bench")
    p.add_argument("--recipe", default="recipes/tiny/pipeline.yaml")
    p.add_argument("--prompts", type=int, default=128)
    p.add_argument("--sft-steps", type=int, default=40)
    p.add_argument(
        "--real-shape",
        default="recipes/tiny/real-shape.yaml",
        help="the real-shape recipe for the real-vocabulary rows ('' to leave them out)",
    )
    p.add_argument("--real-shape-steps", type=int, default=4)
    p.add_argument("--startup-probe", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.startup_probe:  # what a stage imports before it does anything
        import torch  # noqa: F401
        import transformers  # noqa: F401
        import trl  # noqa: F401

        return 0
    recipe = load_recipe(args.recipe)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        m = merge_memory(tmp)
    real = real_shape_rows(args.real_shape, args.real_shape_steps) if args.real_shape else []
    g = bench_generation(recipe, args.prompts)
    sft = bench_sft(recipe, args.sft_steps)
    peak = matmul_flops()
    startup = stage_startup()
    outside = time_outside_training(recipe.run_dir, startup, recipe.stages())
    ours, trl_ = sft["ours"], sft["trl"]
    print("\n| benchmark | baseline | measured | ratio |\n|---|---|---|---:|")
    print(f"| sft, {sft['steps']} steps, {recipe.model.preset or recipe.model.name_or_path} | TRL SFTTrainer defaults "
          f"(batch {trl_['batch_size']}, loss on every token): {trl_['tokens_per_s']:,.0f} tok/s | the sft stage's "
          f"trainer (batch {ours['batch_size']}, model turns only): {ours['tokens_per_s']:,.0f} tok/s, "
          f"{ours['trained_per_s']:,.0f} trained tok/s | **{ours['tokens_per_s'] / trl_['tokens_per_s']:.1f}×** "
          f"tok/s, {ours['trained_per_s'] / trl_['trained_per_s']:.2f}× trained tok/s |")  # fmt: skip
    flops = ours["flos"] / ours["seconds"]
    print(f"| training FLOP/s (sft) | fp32 matmul 1024²: {peak / 1e9:.1f} GFLOP/s | {flops / 1e9:.2f} GFLOP/s | "
          f"**{flops / peak:.3f}×** |")  # fmt: skip
    if outside:
        print(f"| time outside training, {recipe.run_dir} ({len(outside['stages'])} stages, start-up "
              f"{startup:.1f} s each) | whole run: {outside['wall_s'] / 60:.1f} min | in trainer.train: "
              f"{outside['train_s'] / 60:.1f} min | **{outside['outside_share']:.0%}** outside |")  # fmt: skip
    else:
        print(f"| time outside training | no finished stage in {recipe.run_dir} (run `make demo` first) | "
              f"stage start-up {startup:.1f} s | |")  # fmt: skip
    for row in generation_rows(g):
        print(row)
    mb = 1024**2
    print(f"| merge peak memory, {m['method']} of {m['models']} models of {m['model_bytes'] / mb:.0f} MB | "
          f"one model: {m['model_bytes'] / mb:.0f} MB; largest tensor {m['tensor_bytes'] / mb:.0f} MB | "
          f"peak growth {m['peak_growth'] / mb:.0f} MB | **{m['vs_model']:.2f}×** one model, "
          f"{m['vs_tensor']:.1f}× the largest tensor |")  # fmt: skip
    for row in real:
        print(row)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


# --------------------------------------------------------------------------------------------- real shapes


def bench_real_shape_sft(recipe, steps: int, batch: int = 32, n_rows: int = 512) -> dict:
    """The sft stage's trainer against TRL's SFTTrainer on the same real-shape model (the real 256k vocabulary),
    the same conversations as prompt/completion pairs (TRL trains the completion only, as the stage trains the
    model turns) and the same batch: trained tokens per second of each."""
    import dataclasses
    import tempfile
    from pathlib import Path

    import trl
    from datasets import Dataset

    from posttrain import world
    from posttrain.chat import prompt_messages
    from posttrain.engines.sft import make_trainer, sft_args, to_dataset, tokenize_rows
    from posttrain.modeling import load_causal_lm, load_tokenizer

    rows = [r for r in world.train_split(recipe.world, recipe.seed, n=n_rows) if len(r["messages"]) == 2]
    tok = load_tokenizer(recipe.model)
    cfg = dataclasses.replace(recipe.sft, steps=steps, batch_size=batch, length_buckets=1, save_steps=10**9,
                              logging_steps=steps, eval_steps=0)  # fmt: skip
    out: dict = {"steps": steps, "batch_size": batch, "vocab": len(tok)}
    with tempfile.TemporaryDirectory() as tmp:
        args = sft_args(cfg, Path(tmp) / "ours", recipe.seed, recipe.chat.max_length, False, False, "bench")
        args.disable_tqdm, args.include_num_input_tokens_seen = True, "non_padding"
        examples = tokenize_rows(rows, tok, recipe.chat)
        trained = sum(sum(x != -100 for x in e["labels"]) for e in examples) / len(examples)
        t = make_trainer(load_causal_lm(recipe.model, tok, seed=recipe.seed, trainable=True), tok,
                         to_dataset(examples), None, cfg, args, lambda row: None).train().metrics  # fmt: skip
        out["ours"] = {
            "seconds": t["train_runtime"],
            "trained_per_s": steps * batch * trained / t["train_runtime"],
        }
        ds = Dataset.from_list([{"prompt": prompt_messages(r["messages"]), "completion": r["messages"][-1:]}
                                for r in rows])  # fmt: skip
        targs = trl.SFTConfig(output_dir=str(Path(tmp) / "trl"), max_steps=steps, per_device_train_batch_size=batch,
                              learning_rate=cfg.learning_rate, report_to=[], use_cpu=True, save_strategy="no",
                              logging_steps=steps, disable_tqdm=True, dataset_num_proc=None)  # fmt: skip
        trainer = trl.SFTTrainer(model=load_causal_lm(recipe.model, tok, seed=recipe.seed, trainable=True),
                                 args=targs, train_dataset=ds, processing_class=tok)  # fmt: skip
        t = trainer.train().metrics
        ttrained = sum(sum(x != -100 for x in e["labels"]) for e in trainer.train_dataset) / len(
            trainer.train_dataset
        )
        out["trl"] = {
            "seconds": t["train_runtime"],
            "trained_per_s": steps * batch * ttrained / t["train_runtime"],
        }
    return out


_LOGPS_SCRIPT = r"""
import gc, json, re, sys, torch
from posttrain.config import ModelSpec
from posttrain.modeling import load_causal_lm, load_tokenizer
from posttrain.logits import match_trl_tiles
from posttrain.rl import sequence_logps
spec = ModelSpec(preset="real-shape-student", tokenizer=sys.argv[2])
tok = load_tokenizer(spec); model = load_causal_lm(spec, tok).eval(); match_trl_tiles("cpu")
g = torch.Generator().manual_seed(0)
prompts = [torch.randint(3, len(tok), (32,), generator=g).tolist() for _ in range(32)]
responses = [torch.randint(3, len(tok), (96,), generator=g).tolist() for _ in range(32)]
def status(key):
    return int(re.search(key + r":\s+(\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
gc.collect(); base = status("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # the high-water mark from here on
if sys.argv[1] == "chunked":
    sequence_logps(model, prompts, responses, 1.0, tok.pad_token_id, batch_size=32)
else:  # the full (positions × vocabulary) log-softmax it replaces
    with torch.no_grad():
        ids = torch.tensor([p + r for p, r in zip(prompts, responses)])
        torch.log_softmax(model(input_ids=ids).logits.float(), -1)[:, 31:-1].gather(-1, ids[:, 32:, None])
print(json.dumps({"growth": status("VmHWM") - base}))
"""


def bench_logps_memory(tokenizer: str) -> dict:
    """Peak memory growth of the sampled responses' log-probabilities (32 sequences × 128 positions, 4,096 in all,
    the real vocabulary) the project's way (`posttrain.rl.sequence_logps`: tiles) and the full way, each in a
    fresh process, large allocations mapped directly so that the peak is that of the live tensors."""
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    out = {}
    for way in ("chunked", "full"):
        done = subprocess.run([sys.executable, "-c", _LOGPS_SCRIPT, way, tokenizer], capture_output=True, text=True,
                              env=env, check=True)  # fmt: skip
        out[way] = json.loads(done.stdout.strip().splitlines()[-1])["growth"]
    return out


def real_shape_rows(recipe_path: str, steps: int) -> list[str]:
    """The real-shape benchmark rows (the SFT trainers, the log-probabilities' memory)."""
    from posttrain.config import load_recipe

    recipe = load_recipe(recipe_path)
    s = bench_real_shape_sft(recipe, steps)
    m = bench_logps_memory(recipe.model.tokenizer)
    ours, trl_ = s["ours"], s["trl"]
    return [
        f"| sft at real shape ({recipe.model.preset}, vocabulary {s['vocab']:,}, batch {s['batch_size']}, {steps} steps, "
        f"the same sequences) | TRL SFTTrainer: {trl_['seconds'] / steps:.1f} s/step, {trl_['trained_per_s']:,.1f} trained "
        f"tok/s (the completion and the newline after its end_of_turn) | the sft stage's trainer: "
        f"{ours['seconds'] / steps:.1f} s/step, {ours['trained_per_s']:,.1f} trained tok/s (model turns up to end_of_turn) "
        f"| **{trl_['seconds'] / ours['seconds']:.2f}×** steps/s, {ours['trained_per_s'] / trl_['trained_per_s']:.2f}× "
        f"trained tok/s |",
        f"| log-probabilities of 32 × 128 positions, vocabulary {s['vocab']:,} | full log-softmax: "
        f"{m['full'] / 2**20:,.0f} MB peak growth | tiled (`posttrain.logits`): {m['chunked'] / 2**20:,.0f} MB | "
        f"**{m['full'] / max(m['chunked'], 1):.1f}×** less memory |",
    ]  # fmt: skip
