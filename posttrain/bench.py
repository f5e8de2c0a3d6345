"""`make bench`: speed figures measured side by side in one run and printed as ratios against a baseline.

    generation   batched teacher generation (the `generate` stage's path) vs one prompt at a time, same model,
                 same prompts, greedy, so both produce the same tokens
    merge memory peak memory growth of a streaming merge of 3 models (a fresh process, `ru_maxrss`) vs the size
                 of one model and of the largest tensor

Run: `python -m posttrain.bench [--recipe R] [--prompts N]`. The teacher is the recipe's trained teacher when its
`teacher` stage is done, else an untrained tiny-teacher preset (said in the output).
"""

from __future__ import annotations

import argparse
import time


def bench_generation(recipe, n_prompts: int) -> dict:
    from posttrain import world
    from posttrain.config import ModelSpec
    from posttrain.generation import SamplingConfig, generate, prompt_ids
    from posttrain.modeling import load_causal_lm, load_tokenizer
    from posttrain.outputs import read_done
    from posttrain.runner import stage_model

    folder = recipe.run_dir / "teacher"
    if read_done(folder):
        spec, which = stage_model(recipe, "teacher", recipe.teacher), f"trained teacher {folder}/model"
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
            "identical_outputs": f"{same}/{len(prompts)}"}  # fmt: skip


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


def main(argv: list[str] | None = None) -> int:
    from posttrain.config import load_recipe

    p = argparse.ArgumentParser(prog="posttrain.bench")
    p.add_argument("--recipe", default="recipes/tiny/pipeline.yaml")
    p.add_argument("--prompts", type=int, default=128)
    args = p.parse_args(argv)
    recipe = load_recipe(args.recipe)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        m = merge_memory(tmp)
    g = bench_generation(recipe, args.prompts)
    print("\n| benchmark | baseline | measured | ratio |\n|---|---|---|---:|")
    print(f"| generation, {g['prompts']} prompts, {g['model']} | one at a time: {g['one_at_a_time_s']:.2f} s | "
          f"batched ({g['batch_size']}): {g['batched_s']:.2f} s, {g['new_tokens'] / g['batched_s']:.0f} tok/s | "
          f"**{g['ratio']:.1f}×** faster (outputs identical: {g['identical_outputs']}) |")  # fmt: skip
    mb = 1024**2
    print(f"| merge peak memory, {m['method']} of {m['models']} models of {m['model_bytes'] / mb:.0f} MB | "
          f"one model: {m['model_bytes'] / mb:.0f} MB; largest tensor {m['tensor_bytes'] / mb:.0f} MB | "
          f"peak growth {m['peak_growth'] / mb:.0f} MB | **{m['vs_model']:.2f}×** one model, "
          f"{m['vs_tensor']:.1f}× the largest tensor |")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
