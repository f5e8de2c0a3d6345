"""The recipe as a whole: its sections, which stages it has, and how each stage is launched."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from posttrain import registry
from posttrain.config.sections import (
    ChatConfig,
    DataConfig,
    DistillConfig,
    EvalConfig,
    MergeConfig,
    ModelSpec,
    RLConfig,
    RMConfig,
    SamplingConfig,
    TrackingConfig,
    TrainConfig,
    WorldConfig,
)

LAUNCHERS = Path(__file__).resolve().parents[2] / "recipes" / "accelerate"


def launcher_file(name: str) -> Path | None:
    """A launcher name (`cpu`, `ddp-cpu`, `zero3` … in recipes/accelerate/) or a path to an accelerate config."""
    path = LAUNCHERS / f"{name}.yaml" if "/" not in name and not name.endswith(".yaml") else Path(name)
    return path if path.is_file() else None


def launcher_processes(name: str) -> int:
    """How many processes a launcher starts (`num_processes` of its accelerate config; `local`: one)."""
    path = None if name == "local" else launcher_file(name)
    if path is None:
        return 1
    try:
        n = (yaml.safe_load(path.read_text()) or {}).get("num_processes", 1)
    except yaml.YAMLError:
        return 1  # accelerate itself reports a broken config file when the stage starts
    return n if isinstance(n, int) else 1


@dataclass(frozen=True)
class Recipe:
    """A whole pipeline. `name` decides the output folder: `<output_dir>/<name>/<stage>/`.

    launcher: how `posttrain run` starts each stage — `local` (a plain process) or an accelerate config: a name in
    recipes/accelerate/ (cpu, ddp-cpu, ddp, zero2, zero3, zero3-offload, multinode) or a path; `launchers` sets it
    per stage (e.g. `launchers: {rlhf: zero3-offload}`). The one-process stages (data, eval, merge) run as a plain
    process when they inherit a several-process `launcher` (`launcher_for`).
    seed: every stage's seed (data draws, initialisation, data order, sampling); `seeds` sets it per stage (e.g.
    `seeds: {sft: 1}`), so that a seed study reruns only that stage and the ones after it.
    teacher_train: set it to train the teacher with SFT on the data stage's conversations (the `teacher` stage;
    `recipes/tiny/tiny-models.yaml` does, from a preset); leave it unset when `teacher` names a trained model (the
    tiny recipe's shipped one, a hub model). generate: how the
    teacher samples responses. sft: the student's SFT run. rm: the reward model's pairs, training and gate.
    eval: the evaluation done at the end of each stage. distill, rlhf, merge: those stages (absent: skipped).
    """

    name: str
    model: ModelSpec
    output_dir: str = "runs"
    seed: int = 0
    launcher: str = "cpu"
    launchers: dict[str, str] = field(default_factory=dict)
    seeds: dict[str, int] = field(default_factory=dict)
    chat: ChatConfig = field(default_factory=ChatConfig)
    teacher: ModelSpec | None = None
    reward_model: ModelSpec | None = None
    world: WorldConfig = field(default_factory=WorldConfig)
    data: DataConfig = field(default_factory=DataConfig)
    teacher_train: TrainConfig | None = None
    generate: SamplingConfig = field(default_factory=SamplingConfig)
    sft: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    rm: RMConfig = field(default_factory=RMConfig)
    distill: DistillConfig | None = None
    rlhf: RLConfig | None = None
    merge: MergeConfig | None = None
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def seed_for(self, stage: str) -> int:
        """The seed of `stage`: `seeds.<stage>` when set, else `seed`."""
        return self.seeds.get(stage, self.seed)

    def launcher_for(self, stage: str) -> str:
        """The launcher that starts `stage`: its own (`launchers`), else the recipe's — except that a stage which
        runs in one process (data, eval, merge) is started as a plain process (`local`) when the recipe's launcher
        would start several, so that one recipe-wide `launcher: zero3` serves the whole pipeline."""
        if stage in self.launchers:
            return self.launchers[stage]
        if stage not in registry.MULTI_PROCESS and launcher_processes(self.launcher) > 1:
            return "local"
        return self.launcher

    def problems(self) -> list[str]:
        out = []
        for section, keys in (("launchers", self.launchers), ("seeds", self.seeds)):
            out += [
                f"{section}.{k}: no such stage; stages are {', '.join(registry.NAMES)}"
                for k in keys
                if k not in registry.NAMES
            ]
        if not self.name or any(c in self.name for c in "/\\ ") or self.name.startswith("."):
            out.append(f"name: {self.name!r} must be a plain folder name (no spaces or slashes)")
        for stage, name in [("launcher", self.launcher), *self.launchers.items()]:
            if name != "local" and launcher_file(name) is None:
                out.append(
                    f"{'launchers.' + stage if stage != 'launcher' else 'launcher'}: {name!r} is neither 'local' nor a "
                    f"launcher in recipes/accelerate/ ({', '.join(sorted(p.stem for p in LAUNCHERS.glob('*.yaml')))}) "
                    "nor an existing accelerate config file"
                )  # fmt: skip
        for stage, name in self.launchers.items():
            if stage not in registry.MULTI_PROCESS and launcher_processes(name) > 1:
                out.append(
                    f"launchers.{stage}: {name!r} starts {launcher_processes(name)} processes, but stage {stage} runs "
                    f"in one; give it a one-process launcher (`launchers: {{{stage}: local}}` or cpu), or leave it "
                    "out: a one-process stage that inherits a several-process `launcher` runs as a plain process"
                )
        if self.rm.init_from == "teacher" and self.teacher is None:
            out.append("rm.init_from: 'teacher' starts the RM from the teacher, but the recipe names no 'teacher:'; "
                       "name one, or set init_from: null and a 'reward_model:'")  # fmt: skip
        if self.rlhf is not None and self.rlhf.reward == "world" and self.data.source != "world":
            out.append(
                f"rlhf.reward: 'world' scores responses with the built-in world's verifiers, but data.source is "
                f"{self.data.source!r}; use reward: rm"
            )
        for section, train in (("distill.train", self.distill and self.distill.train),
                               ("rlhf.train", self.rlhf and self.rlhf.train)):  # fmt: skip
            if train is not None and train.length_buckets > 1:
                out.append(
                    f"{section}.length_buckets: only the SFT stages (sft, teacher_train) and rm cut batches by "
                    "length (RL and distillation batches are sampled responses)"
                )
        for section, train, spec in (
            ("sft", self.sft, self.model),
            ("teacher_train", self.teacher_train, self.teacher),
        ):
            if (
                train is not None
                and train.packing
                and (spec is None or spec.attn_implementation != "flash_attention_2")
            ):
                out.append(
                    f"{section}.packing: packed sequences would attend to each other with eager attention; "
                    "set packing: false, or attn_implementation: flash_attention_2 for that model (GPU)"
                )
        return out

    def has_stage(self, name: str) -> bool:
        """Whether the recipe has this stage: `teacher` only when `teacher_train:` is set (the recipe trains its
        own teacher), `generate` and `distill` only when a teacher is named, `distill`, `rlhf` and `merge` only
        when their sections are set."""
        if name == "teacher":
            return self.teacher is not None and self.teacher_train is not None
        if name == "generate":
            return self.teacher is not None
        if name == "distill":
            return self.distill is not None and self.teacher is not None
        if name == "rlhf":
            return self.rlhf is not None
        if name == "merge":
            return self.merge is not None and self.rlhf is not None
        return name in registry.NAMES

    def stages(self) -> list[str]:
        """The recipe's stages in pipeline order."""
        return [s for s in registry.NAMES if self.has_stage(s)]

    def rl_start(self) -> str:
        """The stage whose policy RL starts from (and keeps as its KL reference): `rlhf.init_from`, or with
        `auto` the distilled student when the recipe distils, else the SFT one."""
        if self.rlhf is not None and self.rlhf.init_from != "auto":
            return self.rlhf.init_from
        return "distill" if self.has_stage("distill") else "sft"

    def rm_policy(self) -> str:
        """The stage whose policy samples the RM's pairs (`rm.source: policy`): the one RL starts from, so that
        the RM learns to judge the responses RL will make it score; without RL, the SFT one."""
        return self.rl_start() if self.rlhf is not None else "sft"

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name
