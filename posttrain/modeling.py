"""Load and build the pipeline's models: policy, teacher, reward model.

A `ModelSpec` names a hub id or a local folder (`name_or_path`) or a built-in tiny preset (`preset`). Rules
that apply to every model, whatever stage loads it:

- Attention: Gemma 2 needs attention-logit soft-capping. SDPA drops it, so Gemma 2 runs eager, or
  FlashAttention 2 when asked for and flash-attn ≥ 2.6 (the first release with soft-capping) is installed. A
  Gemma 2 config whose soft-caps were nulled is refused.
- Precision: `auto` is bf16 on a GPU with bf16 and fp32 on CPU (bf16 is several times slower there); fp16 is
  refused for Gemma (its activations overflow fp16).
- Tied embeddings: Gemma ties `lm_head` to `embed_tokens`; `check_tied` verifies it after every load and save.
- The reward model is `*ForSequenceClassification` with one output and the pad id set, so the score is read at
  the last real token.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma2ForSequenceClassification,
    GenerationConfig,
    PreTrainedModel,
)

from posttrain.chat import stop_ids
from posttrain.config import ModelSpec
from posttrain.files import is_pin, pin_problem
from posttrain.tokenizer import build_tiny_tokenizer


class ModelError(ValueError):
    """A model cannot be loaded or used as asked; the message says why and what to set."""


# Tiny Gemma 2 presets for the embedded recipe. Sizes are chosen so that the teacher clearly beats the student
# on the world's tasks within the CPU budget; the reward model is larger than the policy, as in Gemma 2.
PRESETS: dict[str, dict[str, int]] = {
    "tiny-student": dict(
        hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16,
    ),
    # The student at half the width (37k parameters against 136k): recipes/ablations/narrow-student.yaml
    "tiny-student-narrow": dict(
        hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        head_dim=16,
    ),
    # One decoder layer (a sliding one: Gemma 2 alternates sliding and global layers, the first sliding)
    "tiny-student-shallow": dict(
        hidden_size=64, intermediate_size=256, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16,
    ),
    "tiny-teacher": dict(
        hidden_size=128, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        head_dim=32,
    ),
    "tiny-rm": dict(
        hidden_size=128, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        head_dim=32,
    ),
    # Gemma 2's shapes at a small width (recipes/tiny/real-shape.yaml, with the real 256k tokenizer): head_dim and
    # query scaling 256 as in Gemma 2 2B/9B, one sliding (window 4096) and one global layer, the soft-caps
    "real-shape-student": dict(
        hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        head_dim=256, sliding_window=4096,
    ),
    "real-shape-teacher": dict(
        hidden_size=64, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=256, sliding_window=4096,
    ),
}  # fmt: skip


# ------------------------------------------------------------------------------------------------ policies


def resolve_device(device: str | None = None) -> torch.device:
    """The given device, else this process's GPU (`LOCAL_RANK` under a multi-process launch), else the CPU."""
    if device:
        return torch.device(device)
    if torch.cuda.is_available():
        from posttrain.dist import local_rank

        return torch.device("cuda", local_rank())
    return torch.device("cpu")


def frozen_device(index: int) -> str | None:
    """The device of the `index`-th frozen model of a one-process stage (the reference and the RM of `eval` and
    `merge`): a GPU of its own (`cuda:index`) when the machine has that many, so that the evaluated model, its
    reference and a large RM do not share one GPU; else None (the default device)."""
    if torch.cuda.is_available() and torch.cuda.device_count() > index:
        return f"cuda:{index}"
    return None


def resolve_dtype(requested: str, device: torch.device | str, model_type: str = "gemma2") -> torch.dtype:
    """`auto` → bf16 on a bf16-capable GPU, fp32 otherwise. fp16 is refused for Gemma."""
    device = torch.device(device)
    if requested in ("fp16", "float16"):
        if model_type.startswith("gemma"):
            raise ModelError("dtype fp16 is not supported for Gemma (activations overflow); use bf16 or fp32")
        return torch.float16
    if requested in ("bf16", "bfloat16"):
        return torch.bfloat16
    if requested in ("fp32", "float32"):
        return torch.float32
    if requested == "auto":
        bf16_ok = device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16_ok else torch.float32
    raise ModelError(f"dtype {requested!r} is not one of auto, fp32, bf16")


def trains_in_bf16(requested: str) -> bool:
    """Whether a model with this recipe dtype trains in bf16 on this machine (the trainer's `bf16` flag)."""
    return resolve_dtype(requested, resolve_device()) == torch.bfloat16


def flash_attn_version() -> tuple[int, ...] | None:
    try:
        return tuple(int(p) for p in importlib.metadata.version("flash_attn").split(".")[:2])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return None


def resolve_attention(config: Any, requested: str = "auto") -> str:
    """The attention implementation to load with; refuses what would silently drop Gemma 2's soft-capping."""
    if getattr(config, "model_type", "") != "gemma2":
        return "eager" if requested == "auto" else requested
    check_softcaps(config)
    if requested in ("auto", "eager"):
        return "eager"
    if requested == "sdpa":
        raise ModelError(
            "attn_implementation 'sdpa' drops Gemma 2's attention soft-capping; use 'eager' or 'flash_attention_2'"
        )
    if requested == "flash_attention_2":
        version = flash_attn_version()
        if version is None or version < (2, 6):
            found = "not installed" if version is None else f"{version[0]}.{version[1]}"
            raise ModelError(
                f"flash_attention_2 needs flash-attn >= 2.6 for Gemma 2 soft-capping ({found}); use 'eager'"
            )
        return "flash_attention_2"
    raise ModelError(f"attn_implementation {requested!r} is not one of auto, eager, flash_attention_2, sdpa")


def check_softcaps(config: Any) -> None:
    missing = [
        k for k in ("attn_logit_softcapping", "final_logit_softcapping") if getattr(config, k, None) is None
    ]
    if missing:
        raise ModelError(
            f"this Gemma 2 config has {' and '.join(missing)} set to null; Gemma 2 was trained with them "
            "(50.0 and 30.0) and is wrong without them — restore them in config.json"
        )


def load_tokenizer(spec: ModelSpec) -> Any:
    name = spec.tokenizer or spec.name_or_path
    if name == "tiny" or (name is None and spec.preset):
        return build_tiny_tokenizer()
    return AutoTokenizer.from_pretrained(name, revision=spec.hub_revision)


def check_pin(spec: ModelSpec) -> None:
    """A local folder pinned by `revision: sha256:…` holds exactly those weights (else ModelError saying what to do)."""
    if is_pin(spec.revision):
        problem = pin_problem(spec.name_or_path, spec.revision)
        if problem:
            raise ModelError(problem)


def preset_config(preset: str, tokenizer: Any, max_positions: int = 1024) -> Gemma2Config:
    if preset not in PRESETS:
        raise ModelError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    dims = dict(PRESETS[preset])
    return Gemma2Config(
        vocab_size=len(tokenizer),
        max_position_embeddings=max(max_positions, dims.get("sliding_window", 0)),
        query_pre_attn_scalar=dims["head_dim"],
        # the tiny presets' 64 is small enough that the sliding layers really slide on tiny sequences
        sliding_window=dims.pop("sliding_window", 64),
        attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
        **dims,
    )


def generation_config(tokenizer: Any) -> GenerationConfig:
    """Stop on both `<end_of_turn>` and `<eos>`; pad with the pad id."""
    return GenerationConfig(
        eos_token_id=stop_ids(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )


def load_causal_lm(
    spec: ModelSpec, tokenizer: Any, device: str | None = None, seed: int = 0, trainable: bool = False
) -> PreTrainedModel:
    """A policy or teacher: built from a preset (seeded init) or loaded from a hub id / folder (`_load`)."""
    model = _load(
        spec, tokenizer, Gemma2ForCausalLM, AutoModelForCausalLM, device, seed, trainable, "causal_lm"
    )
    model.generation_config = generation_config(tokenizer)
    check_tied(model)
    return model


def load_reward_model(
    spec: ModelSpec, tokenizer: Any, device: str | None = None, seed: int = 0, trainable: bool = False
) -> PreTrainedModel:
    """A scalar reward model (one output). From a causal LM checkpoint only the head is newly initialised."""
    model = _load(spec, tokenizer, Gemma2ForSequenceClassification, AutoModelForSequenceClassification, device,
                  seed, trainable, "reward_model", num_labels=1)  # fmt: skip
    model.config.pad_token_id = tokenizer.pad_token_id
    return model


def _load(spec: ModelSpec, tokenizer: Any, preset_class: type, auto_class: type, device: str | None, seed: int,
          trainable: bool, kind: str, **extra: Any) -> PreTrainedModel:  # fmt: skip
    """Create or load a model so that it is never whole on every GPU under DeepSpeed ZeRO-3: a stage builds its
    TRL config (which activates DeepSpeed's configuration) before its models, and both a preset's `_from_config`
    and `from_pretrained` then create the parameters already partitioned (`zero.Init`), on the devices DeepSpeed
    assigns. A model that will be trained outside DeepSpeed with a bf16 recipe dtype is kept in fp32 — its master
    weights — and trained under bf16 autocast (the trainer's `bf16` flag), so that AdamW never updates bf16
    weights; DeepSpeed keeps fp32 master weights itself."""
    dev = resolve_device(device)
    sharded = zero3()
    if spec.preset:
        config = preset_config(spec.preset, tokenizer)
        config.update(extra)
        config._attn_implementation = resolve_attention(config, spec.attn_implementation)
    else:
        check_pin(spec)
        config = AutoConfig.from_pretrained(spec.name_or_path, revision=spec.hub_revision)
    dtype = resolve_dtype(spec.dtype, dev, config.model_type)
    if trainable and dtype == torch.bfloat16 and not uses_deepspeed():
        dtype = torch.float32
    # a preset's weights, and the new head of a reward model read from a causal LM, drawn from `seed` on a copy of
    # the random state: the caller's random sequence is left as it was
    devices = list(range(torch.cuda.device_count())) if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        if spec.preset:
            model = preset_class._from_config(config, dtype=dtype)
            if sharded:  # the partitions hold the seeded weights one process would have drawn
                copy_into_partitions(model, preset_class, config, dtype, seed)
        else:
            model = auto_class.from_pretrained(
                spec.name_or_path, revision=spec.hub_revision, dtype=dtype,
                attn_implementation=resolve_attention(config, spec.attn_implementation), **extra,
            )  # fmt: skip
    if not sharded:
        model = model.to(dev)
    record_load(kind, spec, model, sharded)
    return model


def copy_into_partitions(model, preset_class: type, config, dtype, seed: int) -> None:
    """Under ZeRO-3 a preset's random weights are drawn on partitioned parameters, in another order than one
    process draws them: draw them as one process does (presets are test-sized: the whole copy is a few MB) and
    copy them into the partitions, so that a run's weights do not depend on how it is launched."""
    import deepspeed

    torch.manual_seed(seed)
    whole = preset_class(config).to(dtype)
    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=0):
        import torch.distributed as tdist

        if not tdist.is_initialized() or tdist.get_rank() == 0:
            model.load_state_dict(whole.state_dict(), strict=False)


def zero3() -> bool:
    """Whether DeepSpeed ZeRO-3 is configured in this process (a trainer's config was built under it)."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    return is_deepspeed_zero3_enabled()


def uses_deepspeed() -> bool:
    """Whether this stage runs under DeepSpeed (any ZeRO stage), as `accelerate launch` says."""
    import os

    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


RECORD_LOADS = "POSTTRAIN_RECORD_LOADS"  # a file: one JSON line per model created (for the ZeRO-3 tests)


def record_load(kind: str, spec: ModelSpec, model: PreTrainedModel, zero3_active: bool) -> None:
    """With `POSTTRAIN_RECORD_LOADS` set: which model was created, and whether every parameter of it came out
    partitioned by DeepSpeed (`ds_id`), under an active ZeRO-3 configuration."""
    import json
    import os

    path = os.environ.get(RECORD_LOADS)
    if not path:
        return
    from posttrain.dist import rank

    params = list(model.parameters())
    row = {"kind": kind, "model": spec.preset or spec.name_or_path, "rank": rank(), "zero3": zero3_active,
           "partitioned": bool(params) and all(hasattr(p, "ds_id") for p in params),
           "dtype": str(params[0].dtype) if params else None}  # fmt: skip
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def gathered(*models):
    """For inference outside a DeepSpeed engine (greedy evaluation, sampled figures) on models created
    partitioned under ZeRO-3: their parameters gathered whole for the duration (as TRL gathers a policy to
    generate); a no-op otherwise."""
    from contextlib import nullcontext

    params = [p for m in models if m is not None for p in m.parameters() if hasattr(p, "ds_id")]
    if not params:
        return nullcontext()
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import DS_Z3_GATHERED_PARAM_CONTEXT_DEPTH_ATTR as DEPTH

    # parameters a caller has gathered already stay as they are (gatherings may not nest over one parameter)
    params = [p for p in params if not getattr(p, DEPTH, 0)]
    if not params:
        return nullcontext()
    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def grow_layers(model: PreTrainedModel, n: int, seed: int = 0) -> PreTrainedModel:
    """Append `n` freshly initialised decoder layers on top of a Gemma 2 model's stack (depth up-scaling), each
    starting as the identity: its two output norms scale by (1 + weight) with weight = −1, so the sub-layers add
    nothing until training moves those weights. The model's outputs are unchanged at the start; the new layers give
    a reward model started from a smaller causal LM room to compare what the LM's layers compute.
    Sliding and global attention keep alternating."""
    if n <= 0:
        return model
    if model.config.model_type != "gemma2":
        raise ModelError(
            f"rm.extra_layers: adding layers is implemented for Gemma 2 models, not {model.config.model_type!r}"
        )
    from transformers.models.gemma2.modeling_gemma2 import Gemma2DecoderLayer

    config, stack = model.config, model.model
    first = config.num_hidden_layers
    types = list(config.layer_types)
    for i in range(first, first + n):  # the pattern two layers down
        types.append(types[i - 2] if i >= 2 else "sliding_attention")
    config.layer_types, config.num_hidden_layers = types, first + n
    param = next(model.parameters())
    with torch.random.fork_rng(devices=[]):  # seeded, leaving the caller's random state as it was
        torch.manual_seed(seed)
        for i in range(first, first + n):
            layer = Gemma2DecoderLayer(config, i)
            layer.apply(model._init_weights)
            with torch.no_grad():
                layer.post_attention_layernorm.weight.fill_(-1.0)
                layer.post_feedforward_layernorm.weight.fill_(-1.0)
            stack.layers.append(layer.to(dtype=param.dtype, device=param.device))
    return model


def set_inference_window(model: PreTrainedModel, window: int) -> int:
    """Make the sliding-attention layers attend to the last `window` tokens from now on (masks and the KV cache
    both read the config); returns the window the model was trained with. Gemma 2-style models only."""
    trained = getattr(model.config, "sliding_window", None)
    if trained is None:
        raise ModelError(
            f"eval.sliding_window: the {model.config.model_type} model has no sliding-attention layers; unset it"
        )
    model.config.sliding_window = window
    for module in model.modules():  # each sliding layer's attention keeps its own copy of the window
        if getattr(module, "sliding_window", None) is not None and hasattr(module, "layer_type"):
            module.sliding_window = window
    return trained


# ------------------------------------------------------------------------------------------- tied weights


def check_tied(model: PreTrainedModel) -> None:
    """Raise unless the output head shares (or equals) the input embedding, when the config says tied."""
    if not getattr(model.config, "tie_word_embeddings", False) or not hasattr(model, "get_output_embeddings"):
        return
    out, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if out is None:
        return
    if out.weight.data_ptr() != emb.weight.data_ptr() and not torch.equal(out.weight, emb.weight):
        raise ModelError("lm_head and embed_tokens differ although the config ties them")


def save_model(
    model: PreTrainedModel,
    tokenizer: Any,
    out_dir: str | Path,
    state_dict: dict | None = None,
    chat_template: str | None = None,
) -> Path:
    """save_pretrained the model (or `state_dict`, its gathered weights under ZeRO-3), its tokenizer and
    generation config into `out_dir`; the saved tokenizer carries `chat_template` (`posttrain.chat.chat_template`:
    what training rendered) when given."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    check_tied(model)
    model.save_pretrained(out, safe_serialization=True, state_dict=state_dict)
    previous = tokenizer.chat_template
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    try:
        tokenizer.save_pretrained(out)
    finally:
        tokenizer.chat_template = previous
    return out


def verify_saved(folder: Path, model, state: dict | None = None) -> None:
    """Every tensor of the saved model is present, non-empty and equal to the trained one (`state`: the gathered
    weights under ZeRO-3, whose saves can otherwise be empty; tied weights must stay tied)."""
    from safetensors.torch import load_file

    saved: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        saved.update(load_file(f))
    state = state if state is not None else model.state_dict()
    missing = [k for k in state if k not in saved and not k.endswith("lm_head.weight")]
    empty = [k for k, v in saved.items() if v.numel() == 0]
    differ = [k for k, v in saved.items() if k in state and not torch.equal(v.cpu(), state[k].detach().cpu())]
    if missing or empty or differ:
        raise RuntimeError(
            f"{folder}: the saved model is not the trained one (missing {missing[:3]}, empty {empty[:3]}, "
            f"different {differ[:3]})"
        )


def count_parameters(model: torch.nn.Module, trained_only: bool = False) -> int:
    """Parameters of the whole model (with `trained_only`, those that require gradients), also when ZeRO-3 holds
    only a partition of each in this process."""
    return sum(
        getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad or not trained_only
    )
