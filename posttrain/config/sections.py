"""Every section of a recipe as a frozen dataclass: its keys, their defaults (the only place they are set), its
cross-field checks (`problems()`), and the mapping of its names to TRL's where a stage hands them on.

    model/teacher/reward_model  ModelSpec        chat        ChatConfig       tracking  TrackingConfig
    sft/teacher_train           TrainConfig      generate    SamplingConfig   eval      EvalConfig
    data                        DataConfig       world       WorldConfig      distill   DistillConfig
    rm                          RMConfig         rlhf        RLConfig         merge     MergeConfig
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from posttrain.files import PIN, is_pin
from posttrain.world import TASKS

# Field metadata for a key added after runs were made whose default is the earlier behaviour: the key enters a
# stage's config hash only when set to something else, so that finished stages stay valid (`config_hash`).
IF_SET = {"hash": "if_set"}


@dataclass(frozen=True)
class ModelSpec:
    """A model: a hub id or local folder (`name_or_path`), or one of the built-in tiny presets (`preset`).

    dtype: `auto` is bf16 on a GPU that supports it and fp32 on CPU; fp16 is not offered (Gemma overflows in it).
    attn_implementation: `auto` is eager for Gemma 2 (it needs attention soft-capping, which SDPA drops), or
    FlashAttention 2 when `flash_attention_2` is asked for and flash-attn ≥ 2.6 is installed.
    tokenizer: `tiny` (the built-in character tokenizer), a hub id or a folder; default: the model's own.
    revision: a hub revision (branch, tag, commit); for a local folder, `sha256:<hex>` pins its model.safetensors
    (checked before the model loads, and part of every stage's config hash: the shipped tiny models are pinned so).
    """

    name_or_path: str | None = None
    preset: (
        Literal[
            "tiny-student",
            "tiny-student-narrow",
            "tiny-student-shallow",
            "tiny-teacher",
            "tiny-rm",
            "real-shape-student",
            "real-shape-teacher",
        ]
        | None
    ) = None
    tokenizer: str | None = None
    revision: str | None = None
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    attn_implementation: Literal["auto", "eager", "flash_attention_2", "sdpa"] = "auto"

    def problems(self) -> list[str]:
        out = []
        if (self.name_or_path is None) == (self.preset is None):
            out.append(
                "set exactly one of 'name_or_path' (hub id or folder) and 'preset' (tiny-student, ...)"
            )
        if self.dtype == "fp16":
            out.append("dtype: fp16 overflows in Gemma's activations; set bf16 (GPU) or fp32 (CPU), or auto")
        if self.attn_implementation == "sdpa":
            out.append("attn_implementation: sdpa drops Gemma 2's attention soft-capping; set eager or auto")
        if is_pin(self.revision):
            digest = self.revision[len(PIN) :]
            if len(digest) != 64 or digest.strip("0123456789abcdef"):
                out.append(
                    f"revision: {self.revision!r}: a pin is '{PIN}' and the 64 lowercase hex digits of the weights"
                )
            if self.name_or_path is None:
                out.append(
                    "revision: a sha256 pin names a local folder's weights; set name_or_path to the folder"
                )
        return out

    @property
    def hub_revision(self) -> str | None:
        """The revision to hand to `from_pretrained`: none for a local folder pinned by its weights' sha256."""
        return None if is_pin(self.revision) else self.revision


@dataclass(frozen=True)
class ChatConfig:
    """Gemma chat formatting (see posttrain/chat.py).

    system: `fold` puts a system message's text and a blank line before the first user turn (as Gemma 3's
    template does); `reject` makes a system message an error.
    train_on: `all` trains every model turn; `last` only the final one.
    max_length: tokens per rendered conversation; longer prompts are cut from the left (data layer).
    """

    system: Literal["fold", "reject"] = "fold"
    train_on: Literal["all", "last"] = "all"
    max_length: int = 512

    def problems(self) -> list[str]:
        return [] if self.max_length >= 8 else [f"max_length: {self.max_length} is too small; set at least 8"]


@dataclass(frozen=True)
class TrackingConfig:
    """Experiment tracking. wandb runs offline unless `mode: online` and a server is configured."""

    wandb: bool = False
    mode: Literal["offline", "online"] = "offline"
    project: str = "posttrain"


@dataclass(frozen=True)
class LoraSpec:
    """LoRA adapters (peft). The saved `model/` is the merged full model; the adapter is kept in `adapter/`."""

    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: tuple[str, ...] = (
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    )

    def problems(self) -> list[str]:
        out = [] if self.r >= 1 else [f"lora.r: {self.r} must be at least 1"]
        if not 0.0 <= self.dropout < 1.0:
            out.append(f"lora.dropout: {self.dropout} must be in [0, 1)")
        return out


@dataclass(frozen=True)
class TrainConfig:
    """One SFT run. The global batch is batch_size × grad_accum × number of processes.

    steps: optimizer steps. save_steps: checkpoint period (a killed run resumes from the last one).
    keep_checkpoints: how many of the newest checkpoints are kept while training (`save_total_limit`); every
    checkpoint is deleted once the model is saved. save_optimizer: checkpoints hold the optimizer, scheduler and
    RNG states, so that a killed run resumes on the same curve; `false` keeps the weights only (Adam's state is
    twice the fp32 weights), and a killed run then starts over.
    logging_steps: one console line and one metrics.jsonl row per this many steps. eval_steps: eval loss on the
    evaluation split every this many steps (0: at the end only). trl: extra `trl.SFTConfig` fields.
    length_buckets (SFT stages and rm): each step's batch — the same randomly drawn examples — is cut into this
    many micro-batches of similar length, each padded only to its own longest row; the loss is still the token
    mean (rm: the pair mean) over the whole batch, so only the padding changes (transformers' `batch_rebalance`
    sampler, seeded by the stage's seed). Sorting whole batches by length instead (`group_by_length`) makes a
    batch one task family.
    """

    steps: int = 300
    batch_size: int = 16
    grad_accum: int = 1
    learning_rate: float = 2e-5
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    packing: bool = False
    length_buckets: int = field(default=1, metadata=IF_SET)
    gradient_checkpointing: bool = False
    save_steps: int = 200
    keep_checkpoints: int = field(default=2, metadata=IF_SET)
    save_optimizer: bool = field(default=True, metadata=IF_SET)
    logging_steps: int = 10
    eval_steps: int = 0
    lora: LoraSpec = field(default_factory=LoraSpec)
    trl: dict[str, Any] = field(default_factory=dict)

    TRL_CONFIG: ClassVar[str] = (
        "SFTConfig"  # the TRL config class the stage builds (its `trl:` keys are checked)
    )
    TRL_OWNED: ClassVar[tuple[str, ...]] = ()  # more of its fields the stage sets itself

    def problems(self) -> list[str]:
        out = []
        for k in ("steps", "batch_size", "grad_accum", "save_steps", "logging_steps", "length_buckets",
                  "keep_checkpoints"):  # fmt: skip
            if getattr(self, k) < 1:
                out.append(f"{k}: {getattr(self, k)} must be at least 1")
        if self.eval_steps < 0:
            out.append(f"eval_steps: {self.eval_steps} must be 0 (end only) or positive")
        if not self.learning_rate > 0:
            out.append(f"learning_rate: {self.learning_rate} must be positive")
        if not 0.0 <= self.warmup_ratio < 1.0:
            out.append(f"warmup_ratio: {self.warmup_ratio} must be in [0, 1)")
        if self.length_buckets > 1:
            if self.batch_size % self.length_buckets:
                out.append(
                    f"length_buckets: {self.length_buckets} must divide batch_size ({self.batch_size})"
                )
            if self.packing:
                out.append("length_buckets: packed rows have no padding to save; set length_buckets: 1")
            if "train_sampling_strategy" in self.trl:
                out.append("trl.train_sampling_strategy: length_buckets sets it; leave one of them out")
        out += trl_key_problems(self.trl, self.TRL_CONFIG, self.TRL_OWNED)
        return out


class RewardTrainConfig(TrainConfig):
    """`rm.train`: its `trl:` keys are `trl.RewardConfig` fields."""

    TRL_CONFIG = "RewardConfig"


class DistillTrainConfig(TrainConfig):
    """`distill.train`: its `trl:` keys are `trl.DistillationConfig` fields."""

    TRL_CONFIG = "DistillationConfig"
    TRL_OWNED = ("temperature", "top_p", "top_k", "max_completion_length", "beta", "use_vllm", "vllm_mode")


class RLTrainConfig(TrainConfig):
    """`rlhf.train`: its `trl:` keys are `trl.RLOOConfig` fields (e.g. `ds3_gather_for_generation`,
    `steps_per_generation`)."""

    TRL_CONFIG = "RLOOConfig"
    TRL_OWNED = ("temperature", "top_p", "top_k", "max_completion_length", "beta", "num_generations",
                 "sync_ref_model", "ref_model_mixup_alpha", "ref_model_sync_steps", "model_init_kwargs",
                 "use_vllm", "vllm_mode")  # fmt: skip


# Fields the stage sets itself; setting them under `trl:` would silently fight the recipe's own keys.
_OWNED = {
    "output_dir", "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps", "learning_rate",
    "lr_scheduler_type", "warmup_steps", "weight_decay", "max_grad_norm", "packing", "gradient_checkpointing",
    "activation_checkpointing",
    "save_steps", "logging_steps", "eval_steps", "seed", "bf16", "fp16", "use_cpu", "report_to", "max_length",
    "save_total_limit", "save_only_model",
}  # fmt: skip
# The trainer's own hub upload pushes its checkpoint folders; `posttrain push` uploads the finished model.
_HUB = {"push_to_hub", "hub_model_id", "hub_strategy", "hub_token", "hub_private_repo", "hub_always_push",
        "hub_revision", "push_to_hub_model_id", "push_to_hub_organization", "push_to_hub_token"}  # fmt: skip


def trl_key_problems(
    extra: dict[str, Any], config_class: str = "SFTConfig", owned: tuple[str, ...] = ()
) -> list[str]:
    """Every `trl:` key that is not a field of the stage's TRL config class (with the closest field), that the
    stage sets from the recipe's own keys, or that would upload checkpoints to a hub."""
    if not extra:
        return []  # TRL (seconds to import) is read only when a recipe sets a `trl:` key
    import trl

    names = {f.name for f in dataclasses.fields(getattr(trl, config_class))}
    out = []
    own = {"save_total_limit": "keep_checkpoints", "save_only_model": "save_optimizer", "use_vllm": "engine",
           "vllm_mode": "vllm_mode"}  # fmt: skip
    for k in extra:
        if k in _HUB:
            out.append(f"trl.{k}: the trainer would upload its checkpoint folders while training; leave it out and "
                       "push the finished model with `posttrain push RUN/STAGE --repo-id ID`")  # fmt: skip
        elif k in _OWNED or k in owned:
            out.append(
                f"trl.{k}: set by the recipe's own key{' ' + repr(own[k]) if k in own else ''}; set that instead"
            )
        elif k not in names:
            close = difflib.get_close_matches(k, sorted(names), n=1)
            out.append(
                f"trl.{k}: not a trl.{config_class} field"
                + (f"; did you mean {close[0]!r}?" if close else "")
            )
    return out


@dataclass(frozen=True)
class SamplingConfig:
    """How responses are sampled (the `generate:` section). temperature 0 = greedy; top_k 0 and top_p 1.0 = off.

    batch_size: prompts per `generate` call. shard_size: prompts per output shard; a rerun of a killed stage
    continues from the last finished shard. engine: `auto` = vLLM on a GPU when installed, else HF generate.
    With vLLM the stage builds one engine per process (or per `tensor_parallel_size` processes, for a teacher
    that does not fit one GPU), which takes `gpu_memory_utilization` of each GPU's memory.
    """

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    batch_size: int = 32
    shard_size: int = 512
    engine: Literal["auto", "hf", "vllm"] = "auto"
    tensor_parallel_size: int = field(default=1, metadata=IF_SET)
    gpu_memory_utilization: float = field(default=0.9, metadata=IF_SET)

    def problems(self) -> list[str]:
        out = []
        if self.tensor_parallel_size < 1:
            out.append(f"tensor_parallel_size: {self.tensor_parallel_size} must be at least 1")
        if not 0 < self.gpu_memory_utilization <= 1:
            out.append(f"gpu_memory_utilization: {self.gpu_memory_utilization} must be in (0, 1]")
        if self.max_new_tokens < 1:
            out.append(f"max_new_tokens: {self.max_new_tokens} must be at least 1")
        if self.temperature < 0:
            out.append(f"temperature: {self.temperature} must be 0 (greedy) or positive")
        if not 0 < self.top_p <= 1:
            out.append(f"top_p: {self.top_p} must be in (0, 1]")
        if self.top_k < 0:
            out.append(f"top_k: {self.top_k} must be 0 (off) or positive")
        if self.batch_size < 1 or self.shard_size < 1:
            out.append("batch_size and shard_size must be at least 1")
        return out


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation during and after training stages: greedy responses to the evaluation prompts.

    sliding_window: the `eval` stage only — the window of the models' sliding-attention layers at inference
    (None: the window they were trained with), as in the Gemma 2 report's study of shrinking the local-attention
    window at inference; it changes the `eval` stage alone, so a sweep over it retrains nothing.
    max_prompts: the first this many prompts of the evaluation split are what every evaluation reads — the
    training stages' figures (world score, KL, RM reward, held-out loss), the merge's sweep and the `eval` stage —
    (None: the whole split). A real dataset's split can hold tens of thousands of prompts; each figure samples
    a response to every prompt it reads."""

    max_new_tokens: int = 128
    batch_size: int = 64
    sliding_window: int | None = None
    max_prompts: int | None = field(default=None, metadata=IF_SET)

    def during_training(self) -> dict[str, int]:
        """What the evaluation at the end of a training stage uses (its part of that stage's config)."""
        out = {"max_new_tokens": self.max_new_tokens, "batch_size": self.batch_size}
        if self.max_prompts is not None:
            out["max_prompts"] = self.max_prompts
        return out

    def capped(self, rows: list[dict]) -> list[dict]:
        """The evaluation rows an evaluation reads: the first `max_prompts` of the split."""
        return rows if self.max_prompts is None else rows[: self.max_prompts]

    def problems(self) -> list[str]:
        out = (
            []
            if self.max_new_tokens >= 1 and self.batch_size >= 1
            else ["max_new_tokens and batch_size: at least 1"]
        )
        if self.max_prompts is not None and self.max_prompts < 1:
            out.append(f"max_prompts: {self.max_prompts} must be at least 1 (or unset: the whole split)")
        if self.sliding_window is not None and self.sliding_window < 1:
            out.append(
                f"sliding_window: {self.sliding_window} must be at least 1 (or unset: the trained window)"
            )
        return out


@dataclass(frozen=True)
class FilterConfig:
    """Which filters run. Paths are relative to the working directory (the repository root for make)."""

    pii: bool = True
    unsafe: bool = True
    identity: bool = True
    contamination: bool = True
    duplicate: bool = True
    near_duplicate: bool = True
    near_dup_threshold: float = 0.9
    ngram: int = 13
    unsafe_patterns: str = "data/filters/unsafe_patterns.txt"

    def problems(self) -> list[str]:
        out = []
        if not 0.5 <= self.near_dup_threshold <= 1.0:
            out.append(f"near_dup_threshold: {self.near_dup_threshold} must be between 0.5 and 1.0")
        if self.ngram < 3:
            out.append(f"ngram: {self.ngram} must be at least 3")
        if self.unsafe and not Path(self.unsafe_patterns).is_file():
            out.append(f"unsafe_patterns: {self.unsafe_patterns} does not exist; point it at a pattern file")
        return out


@dataclass(frozen=True)
class DataConfig:
    """Training and evaluation data for the pipeline.

    source: `world` (the built-in tasks, see `world:`), `jsonl` (local files) or `hf` (a dataset name).
    train / eval: JSONL paths or a dataset name (eval may be omitted: `eval_fraction` of train is held out); rows
    in our `conversations` format or TRL's (`messages`, or `prompt` and `completion`; data/README.md).
    hf_train_split / hf_eval_split: the splits read from the dataset(s) with `source: hf`.
    max_bad_fraction: bad rows (not JSON, a wrong format, broken turns) are dropped and counted while they are at
    most this fraction of a split; above it, or with the default 0 at any bad row, the stage fails listing them.
    max_dropped_fraction: above this fraction of rows dropped for length, the data stage fails.
    """

    source: Literal["world", "jsonl", "hf"] = "world"
    train: str | None = None
    eval: str | None = None
    hf_train_split: str = "train"
    hf_eval_split: str = "test"
    eval_fraction: float = 0.05
    max_bad_fraction: float = field(default=0.0, metadata=IF_SET)
    max_dropped_fraction: float = 0.05
    filters: FilterConfig = field(default_factory=FilterConfig)

    def problems(self) -> list[str]:
        out = []
        if self.source != "world" and not self.train:
            out.append(f"train: source '{self.source}' needs 'train' (a JSONL path or a dataset name)")
        for key in ("max_bad_fraction", "max_dropped_fraction"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                out.append(f"{key}: {getattr(self, key)} must be between 0 and 1")
        if not 0.0 < self.eval_fraction < 0.5:
            out.append(f"eval_fraction: {self.eval_fraction} must be between 0 and 0.5")
        return out


@dataclass(frozen=True)
class DefectRates:
    """Fractions of the raw dataset (relative to the clean rows) injected with each defect."""

    duplicate: float = 0.0
    near_duplicate: float = 0.0
    pii: float = 0.0
    wrong_identity: float = 0.0
    unsafe: float = 0.0
    contamination: float = 0.0

    def problems(self) -> list[str]:
        bad = [k for k, v in self.__dict__.items() if not 0.0 <= v <= 1.0]
        return [f"{k}: a rate between 0 and 1" for k in bad]


@dataclass(frozen=True)
class WorldConfig:
    """The tiny world's tasks and difficulty (recipes/tiny/pipeline.yaml sets the tiny recipe's own).

    mix: relative weight of each task family in training data (families not listed get 0).
    add_max: addition operands are drawn from 0..add_max. small_numbers: the share of operands drawn from 0..9
    instead, so that single-digit sums (1% of the pairs at add_max 99) are learned as well. word_len / sort_len:
    inclusive ranges.
    worked_steps: additions (add, follow-ups) answered in short worked steps, a column at a time, then "so <sum>";
    only the sum is checked (`posttrain.world.worked_sum`).
    worked_counts: letter counts answered a letter at a time, each compared with the counted letter ("b!=a 0,
    a==a 1"), with the running count, then "so <count>"; only the count is checked (`posttrain.world.worked_count`).
    shortcut_sums: the share of the gold sums (additions, and each turn of a follow-up, drawn apart) written in
    one line, "37+48, so 85", instead of in worked steps: a model learns both ways and picks one at the character
    after "37+48" ("," or ":"). A student that cannot add in its head then answers greedily the way most of its
    data did and is right about a sum only when it samples the steps: room that RL can find (`posttrain headroom`).
    corrections: the share of the training sums, follow-ups and counts whose gold turn is a corrected answer: a
    wrong attempt cut after its first wrong character (not trained), then "no: " and the worked answer
    (`posttrain.world.corrected`). A model trained on them notices a wrong sum or count and corrects it.
    """

    assistant_name: str = "Pip"
    maker: str = "the posttrain team"
    mix: dict[str, float] = field(
        default_factory=lambda: {
            "add": 2.0,
            "reverse": 2.0,
            "sort": 2.0,
            "count": 2.0,
            "identity": 0.5,
            "refuse": 0.5,
            "followup": 1.0,
        }  # fmt: skip
    )
    add_max: int = 20
    small_numbers: float = field(default=0.0, metadata=IF_SET)
    word_len: tuple[int, ...] = (3, 5)
    sort_len: tuple[int, ...] = (3, 4)
    followup_add: int = 5
    worked_steps: bool = field(default=False, metadata=IF_SET)
    worked_counts: bool = field(default=False, metadata=IF_SET)
    shortcut_sums: float = field(default=0.0, metadata=IF_SET)
    corrections: float = field(default=0.0, metadata=IF_SET)
    n_train: int = 4000
    n_eval: int = 280
    defects: DefectRates = field(default_factory=DefectRates)

    def problems(self) -> list[str]:
        out = [f"mix: unknown task {t!r}; tasks are {', '.join(TASKS)}" for t in self.mix if t not in TASKS]
        if not any(v > 0 for v in self.mix.values()):
            out.append("mix: give at least one task a positive weight")
        for name, rng, lo in (("word_len", self.word_len, 1), ("sort_len", self.sort_len, 2)):
            if len(rng) != 2 or not lo <= rng[0] <= rng[1]:
                out.append(f"{name}: {list(rng)} must be [min, max] with {lo} <= min <= max")
        if self.sort_len and len(self.sort_len) == 2 and self.sort_len[1] > 26:
            out.append("sort_len: at most 26 distinct letters")
        if self.add_max < 1:
            out.append(f"add_max: {self.add_max} must be at least 1")
        if not 0.0 <= self.small_numbers <= 1.0:
            out.append(f"small_numbers: {self.small_numbers} is a share: give a number from 0 to 1")
        if not 0.0 <= self.shortcut_sums <= 1.0:
            out.append(f"shortcut_sums: {self.shortcut_sums} is a share: give a number from 0 to 1")
        if not 0.0 <= self.corrections <= 1.0:
            out.append(f"corrections: {self.corrections} is a share: give a number from 0 to 1")
        if self.corrections and not (self.worked_steps and self.worked_counts):
            out.append(
                "corrections: a correction is written in worked steps; set worked_steps and worked_counts"
            )
        if self.shortcut_sums and not self.worked_steps:
            out.append("shortcut_sums: without worked_steps every sum is one line; set worked_steps: true")
        return out


Divergence = Literal["forward_kl", "reverse_kl", "jsd"]


@dataclass(frozen=True)
class DistillConfig:
    """The `distill:` section (leave it out, or null, to skip the stage).

    divergence: `forward_kl` (Gemma 2: the student's negative log-likelihood of the teacher's distribution on the
    student's samples), `reverse_kl`, or `jsd` with `beta` (TRL `DistillationConfig.beta`: 0 = forward, 1 = reverse).
    on_policy_fraction: the share of batches whose responses the student samples; the rest use the teacher's
    responses from the `generate` stage (GKD's λ). temperature: of sampling and of both distributions in the loss.
    max_new_tokens: the longest sampled response. prompts: how many training prompts to use (0: all).
    balance_tasks: draw the prompts with equal weight per task family (the rows' `task` field), the rarer families
    repeated, so that a family with few prompts is not forgotten.
    engine, vllm_mode: how the student samples, as in the `rlhf:` section.
    train_until_teacher_below: p in (0, 1) trains each sampled response only up to and including its first token
    the teacher gives probability < p (where the student left the teacher's path); later tokens continue from a
    context the teacher never answers from (0: every token).
    train: steps, batch size, learning rate …; `eval_steps` also sets how often the world score is measured.
    """

    divergence: Divergence = "forward_kl"
    beta: float = 0.5
    on_policy_fraction: float = 1.0
    temperature: float = 1.0
    max_new_tokens: int = 64
    prompts: int = 0
    balance_tasks: bool = field(default=False, metadata=IF_SET)
    engine: Literal["auto", "hf", "vllm"] = field(default="auto", metadata=IF_SET)
    vllm_mode: Literal["colocate", "server"] = field(default="colocate", metadata=IF_SET)
    train_until_teacher_below: float = field(default=0.0, metadata=IF_SET)
    train: DistillTrainConfig = field(
        default_factory=lambda: DistillTrainConfig(steps=200, learning_rate=1e-6)
    )

    def problems(self) -> list[str]:
        out = []
        if self.divergence == "jsd" and not 0.0 < self.beta < 1.0:
            out.append(
                f"beta: {self.beta} must be in (0, 1) for divergence jsd (0 is forward_kl, 1 reverse_kl)"
            )
        if not 0.0 <= self.on_policy_fraction <= 1.0:
            out.append(f"on_policy_fraction: {self.on_policy_fraction} must be in [0, 1]")
        if self.temperature <= 0.0:
            out.append(f"temperature: {self.temperature} must be > 0")
        if self.max_new_tokens < 1 or self.prompts < 0:
            out.append("max_new_tokens must be ≥ 1 and prompts ≥ 0")
        if not 0.0 <= self.train_until_teacher_below < 1.0:
            out.append(
                f"train_until_teacher_below: {self.train_until_teacher_below} must be in [0, 1) (a probability; "
                "0 trains every token)"
            )
        return out


@dataclass(frozen=True)
class RMConfig:
    """The `rm:` section.

    source: `policy` builds pairs by sampling `samples_per_prompt` responses per prompt from RL's start policy and
    judging them with the world's verifiers (built-in world only); `jsonl` / `hf` read preference rows from
    `train_file` (and `eval_file`, else `eval_fraction` of train is held out): ours or TRL's preference format,
    explicit or implicit prompt, conversational or plain text (data/README.md).
    hf_train_split / hf_eval_split: (hf source) the splits read, e.g. `train_prefs` and `test_prefs`; for a held-out
    split of the same dataset set `eval_file` to the dataset's name too.
    max_bad_fraction: bad rows are dropped and counted while they are at most this fraction of a split (default 0:
    any bad row stops the stage, listing them).
    include_gold: (policy source) the world's gold response is one of the candidates.
    balance_tasks: (policy source) the `prompts` training prompts are drawn with equal weight per task family (the
    rows' `task`), as the held-out pairs are; a rare family's prompts are drawn more than once.
    init_from: start the RM from this stage's model (only the scalar head is new); `teacher` is the recipe's
    `teacher:` itself when the recipe does not train one; default: `reward_model:`.
    extra_layers: decoder layers added on top of the starting model (Gemma 2), each starting as the identity
    (`posttrain.modeling.grow_layers`): depth for comparing a response with what the LM's own layers predict.
    freeze_base: (with `init_from`) the starting model's own weights (embeddings, its decoder layers, the final norm)
    are not trained: only the added layers and the scalar head learn (with `extra_layers: 0`, the head alone: a
    linear probe), so that what the starting LM knows is kept and each step back-propagates through the added
    layers alone (with `train.gradient_checkpointing`, backward still recomputes the whole model).
    likelihood_weight: w ≥ 0; the reward adds w × the RM's own log-likelihood of the response, Σ over its tokens
    (`posttrain.reward`; 0: the scalar head alone).
    likelihood_targets: c ≥ 0; training adds c × the mean squared distance between the head's score at every
    response position and the starting LM's log-probability of that token (`posttrain.reward.likelihood_targets`,
    a frozen copy of the model as built): the layers under the head learn, token by token, what the LM it starts
    from knows; the reward stays the head's logit at the last token (0: Bradley-Terry alone).
    margin, center_rewards_coefficient: the loss terms of `posttrain.reward.bt_loss`. min_accuracy: the quality gate on held-out pairs.
    """

    source: Literal["policy", "jsonl", "hf"] = "policy"
    train_file: str | None = None
    eval_file: str | None = None
    hf_train_split: str = field(default="train", metadata=IF_SET)
    hf_eval_split: str = field(default="test", metadata=IF_SET)
    max_bad_fraction: float = field(default=0.0, metadata=IF_SET)
    eval_fraction: float = 0.1
    prompts: int = 2000
    samples_per_prompt: int = 4
    temperature: float = 1.0
    max_new_tokens: int = 64
    include_gold: bool = True
    balance_tasks: bool = field(default=False, metadata=IF_SET)
    pairs_per_prompt: int = 4
    init_from: Literal["teacher", "sft"] | None = None
    extra_layers: int = field(default=0, metadata=IF_SET)
    freeze_base: bool = field(default=False, metadata=IF_SET)
    likelihood_weight: float = field(default=0.0, metadata=IF_SET)
    likelihood_targets: float = field(default=0.0, metadata=IF_SET)
    margin: float = 0.0
    center_rewards_coefficient: float = 0.0
    min_accuracy: float = 0.9
    max_dropped_fraction: float = 0.05
    train: RewardTrainConfig = field(default_factory=lambda: RewardTrainConfig(learning_rate=1e-5))

    def problems(self) -> list[str]:
        out = []
        if self.source != "policy" and not self.train_file:
            out.append(
                f"train_file: source {self.source!r} needs a train_file (a JSONL path or a dataset name)"
            )
        if self.samples_per_prompt < 2 and not self.include_gold:
            out.append("samples_per_prompt: at least 2 candidates per prompt are needed to form a pair")
        if self.extra_layers < 0:
            out.append(
                f"extra_layers: {self.extra_layers} is negative; it counts decoder layers to add (0: none)"
            )
        if self.likelihood_weight < 0:
            out.append(
                f"likelihood_weight: {self.likelihood_weight} is negative; it weighs the RM's log-likelihood of the "
                "response in its reward (0: none)"
            )
        if self.likelihood_targets < 0:
            out.append(
                f"likelihood_targets: {self.likelihood_targets} is negative; it weighs the head's distance to the "
                "starting LM's log-likelihood in the training loss (0: none)"
            )
        if self.likelihood_targets and not self.init_from:
            out.append(
                "likelihood_targets: needs rm.init_from (the causal LM whose log-likelihood the head learns to read)"
            )
        if self.freeze_base and not self.init_from:
            out.append(
                "freeze_base: true needs rm.init_from: it keeps the weights of the model the RM starts from with "
                "init_from (the tiny recipe's teacher); without it the reward_model's own layers would not train: "
                "set rm.freeze_base: false, or rm.init_from"
            )
        if not 0.0 <= self.min_accuracy <= 1.0 or not 0.0 < self.eval_fraction < 1.0:
            out.append("min_accuracy must be in [0, 1] and eval_fraction in (0, 1)")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            out.append(f"max_bad_fraction: {self.max_bad_fraction} must be between 0 and 1")
        return out


@dataclass(frozen=True)
class RLRun:
    """One run of the `rlhf` stage: the keys set here replace the section's (unset keys keep them)."""

    kl_coef: float | None = None
    seed: int | None = None
    learning_rate: float | None = None
    anchor: Literal["init", "ema"] | None = None
    ema_rate: float | None = None
    temperature: float | None = None


@dataclass(frozen=True)
class RLConfig:
    """The `rlhf:` section (leave it out, or null, to skip RL).

    init_from: the policy (and the KL reference) to start from — `auto` is `distill` when the recipe distils,
    else `sft`. kl_coef: β of the KL penalty (`posttrain.rl`). anchor: `init` (the starting policy) or `ema` (WARP) with rate `ema_rate`.
    samples_per_prompt: k ≥ 2. temperature: of sampling and of the log-probabilities trained. prompts: how many
    training prompts (0: all). balance_tasks: draw the training prompts with equal weight per task family (the
    rows' `task` field), rarer families repeated, so that a family with few prompts is not drowned by the others'
    updates. train.batch_size counts responses (a multiple of k). runs: named variants, each
    written to `rlhf/<run>/` (default: one run, `main`). reward: `rm` (the `rm` stage's model, Gemma 2's RLHF) or
    `world` (the built-in world's verifiers: 1 for a right response, else 0 — the true reward that the RM
    approximates; with it the stage needs no RM, which separates what RL does from what the RM knows).
    engine: how the policy samples — `hf` (HF generate inside TRL's trainer), `vllm` (TRL's vLLM integration,
    TRL `use_vllm`), or `auto` = vLLM where it is installed and a GPU is present. vllm_mode (TRL `vllm_mode`):
    `colocate` (the default) builds a vLLM engine inside each training process, sharing its GPU
    (`train.trl.vllm_gpu_memory_utilization`, TRL's default 0.3 of it), the policy's weights pushed into it after
    each optimizer step; `server` sends the prompts to a
    `trl vllm-serve` server on GPUs of its own (its address: `train.trl: {vllm_server_host, vllm_server_port}`).
    TRL's other vLLM keys (`vllm_gpu_memory_utilization`, `vllm_tensor_parallel_size`, `vllm_enable_sleep_mode`,
    `ds3_gather_for_generation`, …) pass through `train.trl:`.
    """

    init_from: Literal["auto", "sft", "distill"] = "auto"
    reward: Literal["rm", "world"] = "rm"
    kl_coef: float = 0.05
    anchor: Literal["init", "ema"] = "init"
    ema_rate: float = 0.01
    ema_sync_steps: int = field(default=1, metadata=IF_SET)
    ema_dtype: Literal["fp32", "policy"] = field(default="fp32", metadata=IF_SET)
    samples_per_prompt: int = 4
    temperature: float = 1.0
    max_new_tokens: int = 64
    prompts: int = 0
    balance_tasks: bool = field(default=False, metadata=IF_SET)
    engine: Literal["auto", "hf", "vllm"] = field(default="auto", metadata=IF_SET)
    vllm_mode: Literal["colocate", "server"] = field(default="colocate", metadata=IF_SET)
    train: RLTrainConfig = field(default_factory=lambda: RLTrainConfig(steps=100, learning_rate=1e-6))
    runs: dict[str, RLRun] = field(default_factory=dict)

    def problems(self) -> list[str]:
        out = []
        if self.samples_per_prompt < 2:
            out.append(
                f"samples_per_prompt: {self.samples_per_prompt}; the leave-one-out baseline needs k ≥ 2"
            )
        elif (self.train.batch_size * self.train.grad_accum) % self.samples_per_prompt:
            out.append(
                f"train.batch_size × grad_accum ({self.train.batch_size} × {self.train.grad_accum}) must be a "
                f"multiple of samples_per_prompt ({self.samples_per_prompt}): each prompt's k responses share a batch"
            )
        if self.ema_sync_steps < 1:
            out.append(
                f"ema_sync_steps: {self.ema_sync_steps} must be at least 1 (optimizer steps between moves)"
            )
        for name, run in self.resolved().items():
            if not name or any(c in name for c in "/\\ ") or name.startswith("."):
                out.append(f"runs: {name!r} must be a plain folder name")
            if run.kl_coef < 0 or run.temperature <= 0 or not 0.0 < run.ema_rate <= 1.0:
                out.append(f"runs.{name}: kl_coef ≥ 0, temperature > 0 and 0 < ema_rate ≤ 1 are required")
        return out

    def resolved(self) -> dict[str, RLConfig]:
        """Run name → this section with the run's keys applied (and `runs` emptied)."""
        base = dataclasses.replace(self, runs={})
        if not self.runs:
            return {"main": base}
        out = {}
        for name, run in self.runs.items():
            over = {
                k: v for k, v in dataclasses.asdict(run).items() if v is not None and k != "learning_rate"
            }
            cfg = dataclasses.replace(base, **{k: v for k, v in over.items() if k != "seed"})
            if run.learning_rate is not None:
                cfg = dataclasses.replace(
                    cfg, train=dataclasses.replace(cfg.train, learning_rate=run.learning_rate)
                )
            out[name] = cfg
        return out

    def seed_of(self, name: str, recipe_seed: int) -> int:
        run = self.runs.get(name)
        return run.seed if run is not None and run.seed is not None else recipe_seed


@dataclass(frozen=True)
class MergeConfig:
    """The `merge:` section: average the `rlhf` runs' policies (`posttrain.merging`).

    method: `liti` (WARP: SLERP of the runs' task vectors from the starting policy, then θ = (1 − η) θ_init +
    η θ_slerp), `slerp` (the same with η = 1) or `linear` (a weighted average, `weights` default uniform).
    eta: the η of the model saved as `merge/model`. sweep: the η values evaluated for the reward–KL plot (liti).
    """

    method: Literal["linear", "slerp", "liti"] = "liti"
    eta: float = 0.5
    sweep: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)
    weights: tuple[float, ...] | None = None

    def problems(self) -> list[str]:
        out = []
        if not all(0.0 <= e <= 1.0 for e in (self.eta, *self.sweep)):
            out.append(
                f"eta and sweep values must be in [0, 1] (got eta {self.eta}, sweep {list(self.sweep)})"
            )
        if self.weights is not None and (self.method != "linear" or any(w < 0 for w in self.weights)):
            out.append("weights: only for method linear, and non-negative")
        return out
