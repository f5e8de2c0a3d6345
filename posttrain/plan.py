"""`posttrain plan RECIPE --gpus N --gpu-memory GB`: what every stage of a recipe needs on each GPU, and on disk,
before anything launches — computed from the models' configurations on the meta device (nothing is loaded;
`data/models/` ships the published Gemma 2 configurations, so the `gemma2-*` recipes are planned offline).

Per stage and per GPU (bytes; P parameters, N processes of the stage's launcher, bf16 = 2 bytes):

    trained model   ZeRO-3: weights 2P/N, gradients 2P/N, AdamW state (fp32 master + two moments) 12P/N (0 when
                    offloaded), plus two gathered layers; ZeRO-2: weights 2P, the rest /N; without DeepSpeed:
                    fp32 master weights 4P, gradients 4P, moments 8P (bf16 runs as autocast)
    activations     of one micro-batch (rows × chat.max_length positions): per layer 2·b·s·(10H + 2·(a + k)·d + 4I)
                    + 8·b·a·s² (fp32 attention scores and probabilities, eager attention); with gradient checkpointing
                    every layer keeps its input (2·b·s·H) and one layer is recomputed at a time
    logits tile     TRL's tiled LM head: 4,096 positions × the vocabulary tile, fp32, and its backward's copy — no
                    (positions × vocabulary) tensor is formed (`posttrain.logits`)
    frozen models   ZeRO-3: 2P/N each (prepared for ZeRO-3 inference); otherwise whole, 2P
    generation      HF: the KV cache, 2 · layers · kv_heads · head_dim · 2 bytes a position, for the batch sampled at
                    once; under ZeRO-3 the policy is gathered whole to generate (2P), as TRL does by default.
                    vLLM (a stage's `engine: vllm`): the engine takes its share of each GPU — its weights and KV cache
                    inside it — `generate.gpu_memory_utilization` for `generate`, and for `distill` and `rlhf`
                    colocated `train.trl.vllm_gpu_memory_utilization` (TRL's default 0.3) beside the training state
                    (`vllm_mode: server`: nothing on the training GPUs). `auto` is planned as HF (whether vllm is
                    installed on the GPU nodes is not known here).

A stage that does not fit names the largest part and the recipe key that shrinks it. On this CPU the plan of a
training step of 4,096 positions or more agrees with its measured peak memory within 25% (tests/test_plan.py;
smaller micro-batches are overestimated, their tiles being partly empty). Disk: a DeepSpeed checkpoint
keeps the 16-bit weights and the fp32 optimizer state (14P bytes; 12P + 4P without DeepSpeed), `save_total_limit`
(2) of them while a stage trains, then the exported model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from posttrain.config import ConfigError, ModelSpec, Recipe, TrainConfig, launcher_file
from posttrain.logits import TOKEN_TILE, vocab_tile

GiB = 2**30
MODELS = Path(__file__).resolve().parents[1] / "data" / "models"
SHIPPED = {f"google/gemma-2-{s}{it}": f"gemma-2-{s}" for s in ("2b", "9b", "27b") for it in ("", "-it")}
CHECKPOINTS_KEPT = 2  # save_total_limit (posttrain.engines.trainer.trainer_args)
HEADROOM = 0.08  # of each GPU's memory: the CUDA context, the allocator's fragmentation


@dataclass(frozen=True)
class Shape:
    """What the plan reads of a model: its parameter count (counted on the meta device) and its dimensions."""

    name: str
    params: int
    layer_params: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int


@dataclass(frozen=True)
class Launch:
    """How a stage is started: processes (GPUs), the ZeRO stage (0: none) and what it offloads."""

    launcher: str
    processes: int
    zero: int = 0
    offload_optimizer: bool = False
    device: str = "cuda"


@dataclass
class StagePlan:
    stage: str
    launch: Launch
    parts: list[tuple[str, float, str]] = field(
        default_factory=list
    )  # (what, bytes, the key that shrinks it)
    disk: float = 0.0

    @property
    def total(self) -> float:
        return sum(b for _, b, _ in self.parts)


def model_config(spec: ModelSpec, vocab: int | None = None):
    """The transformers config of a model spec: a tiny preset, a shipped Gemma 2 id, or a local folder's."""
    from transformers import AutoConfig

    from posttrain.modeling import load_tokenizer, preset_config

    if spec.preset:
        return preset_config(spec.preset, load_tokenizer(spec))
    name = spec.name_or_path or ""
    folder = MODELS / SHIPPED[name] if name in SHIPPED else Path(name)
    if not (folder / "config.json").is_file():
        raise ConfigError([f"plan: no config.json for model {name!r}; give a local model folder, or one of "
                           f"{', '.join(sorted(SHIPPED))} (data/models/)"])  # fmt: skip
    return AutoConfig.for_model(**json.loads((folder / "config.json").read_text()))


def shape_of(spec: ModelSpec, extra_layers: int = 0) -> Shape:
    """Build the model on the meta device (no memory) and count its parameters; `extra_layers` decoder layers
    like its last one added on top (`rm.extra_layers`)."""
    import torch
    from transformers import AutoModelForCausalLM

    config = model_config(spec)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    layers = list(model.model.layers)
    per_layer = max(sum(p.numel() for p in layer.parameters()) for layer in layers)
    params = sum(p.numel() for p in model.parameters()) + extra_layers * per_layer
    return Shape(
        name=spec.preset or spec.name_or_path or "?", params=params, layer_params=per_layer,
        hidden=config.hidden_size, intermediate=config.intermediate_size, layers=len(layers) + extra_layers,
        heads=config.num_attention_heads, kv_heads=config.num_key_value_heads,
        head_dim=getattr(config, "head_dim", config.hidden_size // config.num_attention_heads),
        vocab=config.vocab_size,
    )  # fmt: skip


def launch_of(recipe: Recipe, stage: str, gpus: int, device: str = "cuda") -> Launch:
    """The stage's launcher, with the number of processes it would start on `gpus` GPUs per machine (× its
    `num_machines`)."""
    name = recipe.launcher_for(stage)
    path = None if name == "local" else launcher_file(name)
    cfg = (yaml.safe_load(path.read_text()) or {}) if path else {}
    several = int(cfg.get("num_processes", 1)) > 1
    machines = int(cfg.get("num_machines", 1) or 1)
    ds = cfg.get("deepspeed_config") or {} if cfg.get("distributed_type") == "DEEPSPEED" else {}
    return Launch(launcher=name, processes=gpus * machines if several else 1, zero=int(ds.get("zero_stage", 0) or 0),
                  offload_optimizer=str(ds.get("offload_optimizer_device", "none")) not in ("none", "None"),
                  device=device)  # fmt: skip


# ----------------------------------------------------------------------------------------------- the parts


def trained(
    shape: Shape, launch: Launch, train: TrainConfig, seq: int, section: str, rows: int | None = None
):
    """The parts of a model trained by a stage: its state, one micro-batch's activations, the logits tile."""
    P, N = shape.params, max(launch.processes, 1)
    if launch.zero == 3:
        state = [("weights (bf16, /N)", 2 * P / N), ("gradients (/N)", 2 * P / N),
                 ("AdamW state (fp32, /N)", 0.0 if launch.offload_optimizer else 12 * P / N),
                 ("two gathered layers", 4 * shape.layer_params)]  # fmt: skip
    elif launch.zero == 2:
        state = [
            ("weights (bf16)", 2 * P),
            ("gradients (/N)", 2 * P / N),
            ("AdamW state (fp32, /N)", 12 * P / N),
        ]
    else:
        state = [
            ("weights (fp32 master)", 4 * P),
            ("gradients (fp32)", 4 * P),
            ("AdamW moments (fp32)", 8 * P),
        ]
    key = f"launchers.{section.split('.')[0]}: zero3" + ("-offload" if launch.zero == 3 else "")
    parts = [(f"{shape.name}: {what}", b, key) for what, b in state]
    b = rows if rows is not None else train.batch_size // train.length_buckets
    elem = 4 if launch.device == "cpu" else 2  # fp32 on a CPU, bf16 autocast on a GPU
    parts.append((f"activations ({b} × {seq} positions)",
                  activations(shape, b, seq, train.gradient_checkpointing) * elem / 2,
                  f"{section}.gradient_checkpointing: true, or a smaller {section}.batch_size"))  # fmt: skip
    parts.append(("logits tiles (fp32)", logits_tiles(shape, launch.device, b * seq), ""))
    parts.append(
        ("LM-head gradient (fp32, accumulated by the tiled head)", 4 * shape.vocab * shape.hidden, "")
    )
    return parts


def logits_tiles(shape: Shape, device: str, positions: int) -> float:
    """TRL's tiled LM head over a micro-batch's positions: on a GPU its buffer and the backward's (the Triton fold
    works in place); on a CPU the torch fold holds about eight tile-sized temporaries at once, at the narrower CPU
    tile."""
    width = min(vocab_tile(device), shape.vocab)
    return (2 if device == "cuda" else 8) * min(positions, TOKEN_TILE) * width * 4


def activations(shape: Shape, rows: int, seq: int, checkpointing: bool) -> float:
    b, s, H, d = rows, seq, shape.hidden, shape.head_dim
    layer = 2 * b * s * (10 * H + 2 * (shape.heads + shape.kv_heads) * d + 4 * shape.intermediate)
    layer += 8 * b * shape.heads * s * s
    head = 4 * b * s * H  # the final hidden states handed to the LM head, fp32
    if checkpointing:
        return shape.layers * 2 * b * s * H + layer + head
    return shape.layers * layer + head


def frozen(shape: Shape, launch: Launch, role: str) -> tuple[str, float, str]:
    if launch.zero == 3:
        return (f"{shape.name} ({role}, frozen, bf16, /N)", 2 * shape.params / launch.processes, "")
    return (f"{shape.name} ({role}, frozen, bf16)", 2 * shape.params, "launcher zero3 partitions it")


def generation(
    shape: Shape, launch: Launch, batch: int, seq: int, key: str, gathered: bool, section: str = ""
):
    """The KV cache of `batch` sequences of `seq` positions, and under ZeRO-3 the generating model gathered (TRL's
    `ds3_gather_for_generation` under `<section>.trl`)."""
    kv = 2 * shape.layers * shape.kv_heads * shape.head_dim * 2 * batch * seq
    parts = [(f"KV cache ({batch} × {seq})", kv, f"a smaller {key}")]
    if gathered and launch.zero == 3:
        parts.append((f"{shape.name} gathered to generate (bf16)", 2 * shape.params,
                      f"{section}.trl.ds3_gather_for_generation: false (slower: a layer at a time)"))  # fmt: skip
    return parts


def rollouts(
    shape: Shape, launch: Launch, batch: int, seq: int, key: str, section: str, cfg, gpu_memory: float
):
    """How a training stage's rollouts take memory (`cfg`: the `distill` or `rlhf` section): HF generation, or a
    vLLM engine colocated with training (its share of the GPU), or none here with a vLLM server."""
    if cfg.engine != "vllm":
        gathered = cfg.train.trl.get("ds3_gather_for_generation", True)  # TRL gathers the policy to generate
        return generation(shape, launch, batch, seq, key, gathered, section)
    if cfg.vllm_mode == "server":
        return []
    share, tp = (cfg.train.trl.get(k, d) for k, d in (("vllm_gpu_memory_utilization", 0.3),
                                                       ("vllm_tensor_parallel_size", 1)))  # fmt: skip
    return [engine_part(shape, "vLLM engine, colocated", share, tp, gpu_memory,
                        f"{section}.trl.vllm_gpu_memory_utilization", f"{section}.trl.vllm_tensor_parallel_size")]  # fmt: skip


def engine_part(
    shape: Shape, what: str, share: float, tp: int, gpu_memory: float, share_key: str, tp_key: str
):
    """A vLLM engine's part of each GPU: its `share` of the memory, which must hold its 1/`tp` of the model's bf16
    weights (else the part is those weights, and the key to change is the tensor-parallel size)."""
    weights = 2 * shape.params / tp
    fits = weights <= share * gpu_memory
    return (f"{what} ({share:.0%} of the GPU: {shape.name} bf16 / {tp} and its KV cache)",
            max(share * gpu_memory, weights), share_key if fits else tp_key)  # fmt: skip


def checkpoint_disk(shape: Shape, launch: Launch) -> float:
    per = 14 * shape.params if launch.zero else 16 * shape.params
    return CHECKPOINTS_KEPT * per + (2 if launch.zero else 4) * shape.params


# ---------------------------------------------------------------------------------------------- per stage


def shapes_of(recipe: Recipe) -> dict[str, Shape]:
    """The shapes of the recipe's models: the policy, the teacher, the reward model."""
    out = {"policy": shape_of(recipe.model)}
    if recipe.teacher is not None:
        out["teacher"] = shape_of(recipe.teacher)
    rm_base = {"teacher": recipe.teacher, "sft": recipe.model}.get(
        recipe.rm.init_from or "", recipe.reward_model
    )
    if rm_base is not None:
        out["rm"] = shape_of(rm_base, recipe.rm.extra_layers)
    return out


def stage_parts(
    recipe: Recipe, stage: str, launch: Launch, shapes: dict[str, Shape], gpu_memory: float
) -> list:
    seq = recipe.chat.max_length
    policy, teacher, rm = shapes["policy"], shapes.get("teacher"), shapes.get("rm")
    if stage == "teacher":
        return trained(teacher, launch, recipe.teacher_train, seq, "teacher_train")
    if stage == "generate" and recipe.generate.engine == "vllm":  # one engine per tensor_parallel_size GPUs
        g = recipe.generate
        return [engine_part(teacher, "vLLM engine", g.gpu_memory_utilization, g.tensor_parallel_size, gpu_memory,
                            "generate.gpu_memory_utilization", "generate.tensor_parallel_size")]  # fmt: skip
    if stage == "generate":  # data-parallel generation: the teacher whole in every process
        return [(f"{teacher.name} (teacher, bf16)", 2 * teacher.params, "")] + generation(
            teacher, launch, recipe.generate.batch_size, seq, "generate.batch_size", False)  # fmt: skip
    if stage == "sft":
        return trained(policy, launch, recipe.sft, seq, "sft")
    if stage == "distill":
        t = recipe.distill.train
        return trained(policy, launch, t, seq, "distill.train") + [frozen(teacher, launch, "teacher")] + rollouts(
            policy, launch, t.batch_size * t.grad_accum, seq, "distill.train.batch_size", "distill.train",
            recipe.distill, gpu_memory)  # fmt: skip
    if stage == "rm":
        t = recipe.rm.train
        training = trained(rm, launch, t, seq, "rm.train", rows=2 * (t.batch_size // t.length_buckets))
        if recipe.rm.source != "policy":  # the pairs are read, not sampled
            return training
        sampling = [(f"{policy.name} (policy sampling pairs, bf16)", 2 * policy.params, "")] + generation(
            policy, launch, recipe.generate.batch_size, seq, "generate.batch_size", False)  # fmt: skip
        return max(training, sampling, key=lambda parts: sum(b for _, b, _ in parts))
    if stage == "rlhf":
        t, rl = recipe.rlhf.train, recipe.rlhf
        parts = trained(policy, launch, t, seq, "rlhf.train") + [frozen(policy, launch, "reference")]
        if rl.anchor == "ema" and rl.ema_dtype == "fp32":
            parts[-1] = (parts[-1][0].replace("bf16", "fp32"), 2 * parts[-1][1], "rlhf.ema_dtype: policy")
        if rm is not None and rl.reward == "rm":
            parts.append(frozen(rm, launch, "reward model"))
        return parts + rollouts(policy, launch, t.batch_size * t.grad_accum, seq, "rlhf.train.batch_size",
                                "rlhf.train", rl, gpu_memory)  # fmt: skip
    if stage in (
        "merge",
        "eval",
    ):  # one process; the policy, its reference and the RM each on a GPU of its own
        per_gpu = [[(f"{policy.name} (evaluated, bf16)", 2 * policy.params, "")]
                   + generation(policy, launch, recipe.eval.batch_size, seq, "eval.batch_size", False),
                   [(f"{policy.name} (reference, bf16)", 2 * policy.params, "")],
                   [(f"{rm.name} (reward model, bf16)", 2 * rm.params, "")] if rm else []]  # fmt: skip
        return max(per_gpu, key=lambda parts: sum(b for _, b, _ in parts))
    return []


TRAINED = {"teacher": "teacher", "sft": "policy", "distill": "policy", "rm": "rm", "rlhf": "policy"}


def plan(recipe: Recipe, gpus: int, gpu_memory: float, device: str = "cuda") -> list[StagePlan]:
    """Every stage of the recipe, planned for `gpus` GPUs of `gpu_memory` bytes per node (`device` cpu: the CPU
    tile widths)."""
    shapes = shapes_of(recipe)
    out = []
    for stage in recipe.stages():
        launch = launch_of(recipe, stage, gpus, device)
        sp = StagePlan(stage, launch, stage_parts(recipe, stage, launch, shapes, gpu_memory))
        if stage in TRAINED:
            runs = len(recipe.rlhf.resolved()) if stage == "rlhf" else 1
            sp.disk = (
                checkpoint_disk(shapes[TRAINED[stage]], launch) + (runs - 1) * 2 * shapes["policy"].params
            )
        out.append(sp)
    return out


def render(recipe: Recipe, plans: list[StagePlan], gpus: int, gpu_memory: float) -> tuple[str, list[str]]:
    """The plan as a table (per stage: launcher, per-GPU total against the GPU, its largest part) and the parts
    of every stage; returns (text, the stages that do not fit, each with what to change)."""
    usable = gpu_memory * (1 - HEADROOM)
    lines = [f"## Memory plan: {recipe.name} on {gpus} × {gpu_memory / GiB:.0f} GiB GPUs",
             "", f"Per GPU, with {HEADROOM:.0%} of each GPU kept for the CUDA context and fragmentation "
             f"({usable / GiB:.1f} GiB usable).", "",
             "| stage | launcher (processes) | per GPU | fits | largest part |", "|---|---|---:|---|---|"]  # fmt: skip
    misfits, detail = [], []
    for sp in plans:
        if not sp.parts:
            continue
        what, big, key = max(sp.parts, key=lambda p: p[1])
        fits = sp.total <= usable
        lines.append(f"| {sp.stage} | {sp.launch.launcher} ({sp.launch.processes}) | {sp.total / GiB:.1f} GiB | "
                     f"{'yes' if fits else '**no**'} | {what}: {big / GiB:.1f} GiB |")  # fmt: skip
        if not fits:
            misfits.append(f"stage {sp.stage}: {sp.total / GiB:.1f} GiB per GPU > {usable / GiB:.1f} GiB usable; the "
                           f"largest part is {what} ({big / GiB:.1f} GiB)" + (f" — set {key}" if key else ""))  # fmt: skip
        detail.append(f"- **{sp.stage}**: " + "; ".join(f"{w} {b / GiB:.2f} GiB" for w, b, _ in sp.parts))
    disk = sum(sp.disk for sp in plans)
    peak = max((sp.disk for sp in plans), default=0.0)
    lines += ["", *detail, "", f"Disk: the checkpoints of the largest training stage take {peak / GiB:.0f} GiB "
              f"while it trains ({CHECKPOINTS_KEPT} kept: 16-bit weights and the fp32 optimizer state); all "
              f"stages' checkpoints and exports together {disk / GiB:.0f} GiB."]  # fmt: skip
    return "\n".join(lines) + "\n", misfits
