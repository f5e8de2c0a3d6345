"""The runner: a recipe → its stages in order, each launched as its own job, skipped when done with the same
config and parents, taken from another run folder when it holds the same (`--reuse`), stopped at a failed quality
gate; sweeps of a recipe over a grid of keys. The CLI parses arguments and calls this module.

Every stage module (`posttrain.registry`) has `parents(recipe)`, `stage_config(recipe)` and
`main(recipe, parents) -> Path`. A stage's hash covers its own config and its parents' hashes, so a change anywhere
reruns that stage and everything downstream of it, and nothing else. The runner hands each stage its parents'
folders and hashes (`Parents`) after checking that they are finished and current.
"""

from __future__ import annotations

import importlib
import itertools
import os
import shlex
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import ModuleType

from posttrain import dist, multinode, recorder, registry
from posttrain.config import ConfigError, Recipe, launcher_file, load_recipe, load_recipe_located
from posttrain.errors import STOPPED_EXIT
from posttrain.files import link_tree
from posttrain.outputs import GATE_FAILED, Parents, check_exported, read_done, stage_hash
from posttrain.report import print_reports, sweep_table

# ------------------------------------------------------------------------------------------- stages and hashes


def stage_module(name: str) -> ModuleType:
    if name not in registry.NAMES:
        raise ConfigError([f"unknown stage {name!r}; stages: {', '.join(registry.NAMES)}"])
    return importlib.import_module(registry.module_name(name))


def expected_hash(recipe: Recipe, name: str, _memo: dict[str, str] | None = None) -> str:
    """The hash a finished, up-to-date output of `name` carries in its DONE file."""
    memo = {} if _memo is None else _memo
    if name not in memo:
        module = stage_module(name)
        parents = {p: expected_hash(recipe, p, memo) for p in module.parents(recipe)}
        memo[name] = stage_hash(module.stage_config(recipe), parents)
    return memo[name]


def with_parents(recipe: Recipe, names: list[str]) -> list[str]:
    """`names` and every stage they depend on, in pipeline order."""
    need: set[str] = set()

    def add(n: str) -> None:
        if n not in need:
            need.add(n)
            for p in stage_module(n).parents(recipe):
                add(p)

    for n in names:
        add(n)
    return [s for s in recipe.stages() if s in need]


def parents_of(recipe: Recipe, name: str) -> Parents:
    """For a stage about to run: each parent's finished folder and DONE hash. A missing or stale parent is an
    error saying what to run."""
    folders, hashes = {}, {}
    for p in stage_module(name).parents(recipe):
        folder = recipe.run_dir / p
        done = read_done(folder)
        if done is None:
            raise ConfigError(
                [f"stage {name} needs {folder}/ (stage {p}), which is not finished; "
                 f"run `posttrain run <recipe> --only {name}` to run it with its parents"]
            )  # fmt: skip
        if done["config_hash"] != expected_hash(recipe, p):
            raise ConfigError(
                [f"stage {name} needs stage {p}, but {folder}/ was made with another config; "
                 f"rerun it first (`posttrain run <recipe> --only {name}`)"]
            )  # fmt: skip
        folders[p], hashes[p] = folder, done["config_hash"]
    return Parents(folders=folders, hashes=hashes)


def run_stage(name: str, recipe: Recipe) -> Path:
    """Run one stage in this process (what a launched job does): the run folder's lock taken (unless the run that
    started it holds it), its parents checked, its folder written."""
    import signal

    from posttrain.dist import check_process_count
    from posttrain.engines.trainer import tracking_env
    from posttrain.logits import match_trl_tiles
    from posttrain.modeling import resolve_device

    # `posttrain run` starts jobs ignoring SIGTERM; a stage dies on it until its training loop catches it
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    from posttrain import lock as run_lock

    module = stage_module(name)
    check_process_count(name)
    held = run_lock.acquire(recipe.run_dir, command_line())  # None under the lock of the run that started it
    try:
        tracking_env(recipe.tracking, recipe.name, name, recipe.run_dir)
        match_trl_tiles(resolve_device())  # TRL's tiled LM-head kernels at this device's width
        parents = parents_of(recipe, name)
        if os.environ.get(recorder.ENV):  # the largest tensor the stage forms, for the real-shape tests
            with recorder.largest_tensors(os.environ[recorder.ENV], f"{name}:{dist.rank()}"):
                return module.main(recipe, parents)
        return module.main(recipe, parents)
    finally:
        run_lock.release(held)


def launch_command(recipe: Recipe, name: str, recipe_path: str, sets: list[str]) -> list[str]:
    """The command that runs stage `name` as its own job: `accelerate launch --config_file <launcher> -m posttrain
    stage …`, or a plain process with the `local` launcher; a launcher spanning several machines runs through
    Slurm's `srun` on each node (`posttrain.multinode`)."""
    launcher = recipe.launcher_for(name)
    stage = ["-m", "posttrain", "stage", name, recipe_path] + [f"--set={s}" for s in sets]
    if launcher == "local":
        return [sys.executable, *stage]
    path = launcher_file(launcher)
    if path is None:
        raise ConfigError([f"launcher {launcher!r} for stage {name}: no such accelerate config"])
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--quiet", "--config_file", str(path), *stage]
    n = multinode.machines(launcher)
    return multinode.srun_command(cmd, n) if n > 1 else cmd


# ------------------------------------------------------------------------------------------------- a whole run


@dataclass(frozen=True)
class RunOptions:
    """What `posttrain run` was asked: the recipe file and its `--set` overrides, `only` these stages (with the
    parents they need), `from_` this stage on, `force` a rerun of those, `dry_run`, `reuse` finished stages from
    these run folders."""

    recipe_path: str
    sets: tuple[str, ...] = ()
    only: tuple[str, ...] = ()
    from_: str | None = None
    force: bool = False
    dry_run: bool = False
    reuse: tuple[str, ...] = field(default_factory=tuple)


def selected_stages(recipe: Recipe, opts: RunOptions) -> tuple[list[str], set[str]]:
    """(the stages to consider, in order; those to rerun even when done)."""
    stages = recipe.stages()
    for name in [*opts.only, *([opts.from_] if opts.from_ else [])]:
        if name not in stages:
            stage_module(name)  # unknown stage: a clear error
            raise ConfigError([f"stage {name!r} is not in recipe {recipe.name}'s plan ({', '.join(stages)})"])
    if opts.only:
        stages = with_parents(recipe, list(opts.only))
    forced = set(stages[stages.index(opts.from_) :]) if opts.from_ else set()
    if opts.force:
        forced |= set(opts.only or stages)
    return stages, forced


@dataclass(frozen=True)
class Step:
    """What a run does with one stage: `skip` it (done), `reuse` it from another run folder (`source`), stop at
    its failed `gate`, or `launch` it (`cmd`); `why` is what the log says."""

    name: str
    action: str
    why: str = ""
    source: Path | None = None
    cmd: tuple[str, ...] = ()


def plan(recipe: Recipe, opts: RunOptions) -> tuple[list[Step], list[str]]:
    """(what the run will do with each stage, the stages considered), decided before anything starts; a real run
    ends at a gate that failed with the same config."""
    stages, forced = selected_stages(recipe, opts)
    steps = []
    for name in stages:
        folder, want = recipe.run_dir / name, expected_hash(recipe, name)
        done = read_done(folder)
        if name not in forced:
            if done is not None and done.get("config_hash") == want:
                steps.append(Step(name, "skip", want))
                continue
            # the first run folder holding this stage with the same hash
            reusable = [
                Path(r) / name
                for r in opts.reuse
                if (read_done(Path(r) / name) or {}).get("config_hash") == want
            ]
            if reusable:
                steps.append(Step(name, "reuse", want, reusable[0]))
                continue
            failed = failed_gate(folder, want)
            if failed:  # the same config fails the same way: do not retrain it
                steps.append(Step(name, "gate", failed))
                if not opts.dry_run:
                    break
                continue
        why = "forced" if name in forced else ("config or parents changed" if done else "not done yet")
        cmd = launch_command(recipe, name, opts.recipe_path, list(opts.sets))
        steps.append(Step(name, "launch", why, cmd=tuple(cmd)))
    return steps, stages


def command_line() -> str:
    """This process's command as a person typed it (`posttrain …`), for the run lock's record."""
    return " ".join(["posttrain", *sys.argv[1:]])[:300]


def run(opts: RunOptions) -> int:
    """Run the recipe's stages in order, each in its own process; skip those done with the same config. Before any
    stage starts, the run folder's lock is taken (not by a dry run) and the preflight checks the inputs, models and
    disk of every stage that will run. Returns the exit code: 0, the failed stage's, 1 for a failed gate or a
    broken export, 75 when stopped by SIGTERM."""
    from posttrain import lock as run_lock
    from posttrain.preflight import preflight, raise_if

    recipe, where = load_recipe_located(opts.recipe_path, list(opts.sets))
    held = None if opts.dry_run else run_lock.acquire(recipe.run_dir, command_line())
    try:
        steps, stages = plan(recipe, opts)
        pf = preflight(recipe, where, opts.recipe_path, [s.name for s in steps if s.action == "launch"])
        raise_if(pf)
        for note in pf.notes:
            print(f"[preflight] {note}")
        if opts.dry_run and (holder := run_lock.holder(recipe.run_dir)) is not None:
            print(
                f"[run] note: {recipe.run_dir} is in use by {run_lock.describe(holder)}; a run now would stop"
            )
        if recipe.eval.max_prompts is not None:
            print(f"[run] evaluation: the first {recipe.eval.max_prompts} prompts of the evaluation split "
                  f"(eval.max_prompts)")  # fmt: skip
        launched = [s.name for s in steps if s.action == "launch"]
        for line in engine_lines(recipe, launched):
            print(f"[run] generation engine of {line}")
        if not opts.dry_run:
            check_engines(recipe, launched, where, opts.recipe_path)
            check_machines(recipe, steps)
            print_plan_on_gpus(recipe)
        return execute(recipe, opts, steps, stages, held)
    finally:
        run_lock.release(held)


def execute(recipe: Recipe, opts: RunOptions, steps: list[Step], stages: list[str], held) -> int:
    """Carry out the plan: reuse and skip finished stages, stop at a failed gate, launch the others one by one."""
    for step in steps:
        name, folder = step.name, recipe.run_dir / step.name
        if step.action == "reuse":
            print(f"[run] reuse {step.source} for {folder} (same config and parents, {step.why})")
            if not opts.dry_run:
                link_tree(step.source, folder)
        if step.action in ("reuse", "skip"):
            print(f"[run] skip {name}: {folder} is done with the same config and parents ({step.why})")
        elif step.action == "gate":
            print(f"[run] {name}: failed its quality gate with this config earlier ({step.why}); `--force` reruns it",
                  file=sys.stderr)  # fmt: skip
            if opts.dry_run:
                continue
            print_reports(recipe.run_dir, stages)
            print(
                f"[run] stage {name} failed its quality gate; later stages were not started", file=sys.stderr
            )
            return 1
        else:
            print(f"[run] {name} ({step.why}): {' '.join(step.cmd)}", flush=True)
            if opts.dry_run:
                continue
            rc = launch(recipe, name, list(step.cmd), stages, () if held is None else (held.fd,))
            if rc != 0:
                return rc
    if not opts.dry_run:
        print_reports(recipe.run_dir, stages)
        print(f"[run] outputs of recipe {recipe.name}: {recipe.run_dir}/")
    return 0


def engine_keys(recipe: Recipe, stages: list[str]) -> list[tuple[str, str, str]]:
    """(stage, recipe key, value) of the generation engine of every stage in `stages` that generates."""
    sections = {"generate": recipe.generate, "distill": recipe.distill, "rlhf": recipe.rlhf}
    return [(n, f"{n}.engine", sections[n].engine) for n in stages if sections.get(n) is not None]


def engine_lines(recipe: Recipe, stages: list[str]) -> list[str]:
    """What each generating stage of `stages` samples with, as its process will decide it (`auto`: vLLM where
    vllm is installed and a GPU is present); the evaluations generate with HF."""
    from posttrain.generation import use_vllm, vllm_installed

    here, keys = vllm_installed(), engine_keys(recipe, stages)
    auto = "vllm" if any(e == "auto" for *_, e in keys) and use_vllm("auto") else "hf"
    names = {
        "hf": "hf",
        "vllm": "vllm",
        "auto": f"auto: vllm on a GPU where vllm is installed, else hf (here: {auto})",
    }
    out = []
    for name, key, engine in keys:
        how = names[engine]
        if name in ("distill", "rlhf") and engine != "hf":
            how += f" (TRL's vLLM integration, {getattr(recipe, name).vllm_mode})"
        elif name == "generate" and engine != "hf":
            tp = recipe.generate.tensor_parallel_size
            how += f" (one engine per {'GPU' if tp == 1 else f'{tp} GPUs'}, for the whole stage)"
        if engine == "vllm" and not here:
            how += "; vllm is not installed here: a run here would stop before its first stage"
        out.append(f"{name}: {how} ({key})")
    if any(n in stages for n in ("sft", "distill", "rlhf", "merge", "eval")):
        out.append("evaluations: hf")
    return out


def check_engines(recipe: Recipe, stages: list[str], where: dict, source: str) -> None:
    """Before any stage starts: a stage set to `engine: vllm` where vllm is not installed stops the run, naming
    its key."""
    from posttrain.config import where_of
    from posttrain.generation import vllm_installed

    if vllm_installed():
        return
    problems = [
        f"{where_of(where, key, source)}: {key}: 'vllm', but vllm is not installed here; install it "
        f"(pip install vllm) or set {key}: auto (vLLM where installed, else HF generate) or hf"
        for _, key, engine in engine_keys(recipe, stages)
        if engine == "vllm"
    ]
    if problems:
        raise ConfigError(problems)


def check_machines(recipe: Recipe, steps: list[Step]) -> None:
    """Before any stage starts: every stage spanning several machines can start (a Slurm allocation of as many
    nodes, the run folder on shared storage), else a ConfigError saying what to do (`posttrain.multinode`)."""
    problems = []
    for step in steps:
        if step.action == "launch" and step.cmd[0] == "srun":
            try:
                n = multinode.machines(recipe.launcher_for(step.name))
                multinode.check_can_start(step.name, n, recipe.run_dir)
            except ConfigError as e:
                problems += e.problems
    if problems:
        raise ConfigError(problems)


def print_plan_on_gpus(recipe: Recipe) -> None:
    """On a machine with GPUs: the recipe's memory plan for them (`posttrain plan`) before the first stage starts,
    with a warning for each stage that would not fit."""
    import torch

    if not torch.cuda.is_available():
        return
    from posttrain.plan import plan, render

    gpus, memory = torch.cuda.device_count(), torch.cuda.get_device_properties(0).total_memory
    text, misfits = render(recipe, plan(recipe, gpus, memory), gpus, memory)
    print(text, flush=True)
    for m in misfits:
        print(f"[run] warning: {m}", file=sys.stderr)


def launch(recipe: Recipe, name: str, cmd: list[str], stages: list[str], fds: tuple[int, ...] = ()) -> int:
    """Start one stage's job (handing it the run lock's descriptor `fds`) and judge how it ended: its exit code, a
    failed gate, a SIGTERM, or an exported model that does not read back complete (then 1). 0 when the stage may
    hand over to the next."""
    folder = recipe.run_dir / name
    rc, terminated, peak = run_stage_process(cmd, fds)
    print(f"[run] {name}: peak memory {peak / 2**30:.2f} GiB (resident, the largest process of the stage)")
    if rc != 0:
        print_reports(recipe.run_dir, stages)
        if terminated:  # through `accelerate launch` the stage's own exit code (75) is not seen here
            print(f"[run] stage {name} stopped on SIGTERM (a training stage saves a checkpoint first); rerun "
                  "the same command to resume it", file=sys.stderr)  # fmt: skip
            return STOPPED_EXIT
        gate = failed_gate(folder, expected_hash(recipe, name))
        why = f"failed its quality gate — {gate}" if gate else f"failed (exit {rc})"
        print(f"[run] stage {name} {why}; later stages were not started", file=sys.stderr)
        return rc
    problems, tensors = check_exported(folder)
    if problems:
        print(f"[run] stage {name} exported a broken model; later stages were not started:\n  "
              + "\n  ".join(problems[:10]), file=sys.stderr)  # fmt: skip
        return 1
    if tensors:
        print(f"[run] {name}: exported models read back complete ({tensors} tensors, none empty)")
    if terminated:  # the stage finished (a SIGTERM before it set its handler is ignored): stop after it
        print(f"[run] stopped on SIGTERM after stage {name} finished; rerun the same command to go on",
              file=sys.stderr)  # fmt: skip
        return STOPPED_EXIT
    return 0


def run_stage_process(cmd: list[str], fds: tuple[int, ...] = ()) -> tuple[int, bool, int]:
    """Run a stage's job in its own process group and pass SIGTERM and SIGINT sent to `posttrain run` on to the
    whole group. Launchers in the group ignore SIGTERM (`accelerate launch` would die and orphan the stage); the
    stage restores the default and, while training, saves a checkpoint and stops. The job inherits `fds` (the run
    lock's descriptor: the lock stays held while the job runs, even if `posttrain run` is killed). Returns (exit
    code, whether a SIGTERM was passed on, the peak resident memory in bytes of the job's largest process)."""
    import signal
    import subprocess

    def start() -> None:  # in the child, before exec: the ignore disposition is inherited, handlers are not
        os.setpgrp()
        signal.signal(signal.SIGTERM, signal.SIG_IGN)

    child = subprocess.Popen(cmd, preexec_fn=start, pass_fds=fds)
    terminated = False

    def forward(signum, frame) -> None:
        nonlocal terminated
        terminated = terminated or signum == signal.SIGTERM
        try:
            os.killpg(child.pid, signum)
        except ProcessLookupError:
            pass

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        # the child's own resource use (its waited-for children's too)
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        return child.returncode, terminated, usage.ru_maxrss * 1024
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def reuse(source: Path, folder: Path, want: str, dry_run: bool) -> dict | None:
    """Take a finished stage from another run folder when its hash is the one wanted (hard links, else copies)."""
    done = read_done(source)
    if not done or done.get("config_hash") != want:
        return None
    print(f"[run] reuse {source} for {folder} (same config and parents, {want})")
    if not dry_run:
        link_tree(source, folder)
    return done


def failed_gate(folder: Path, want: str) -> str | None:
    """The recorded gate failure of a stage run with config hash `want`, if its last attempt failed so."""
    partial = folder.with_name(folder.name + ".partial")
    try:
        if (partial / "STAGE_HASH").read_text().strip() == want:
            return (partial / GATE_FAILED).read_text().strip()
    except OSError:
        pass
    return None


# ------------------------------------------------------------------------------------------------------ sweeps


@dataclass(frozen=True)
class Variant:
    labels: dict[str, str]  # grid key (and "seed") → value, the sweep table's first columns
    sets: tuple[str, ...]  # the `--set` overrides that make it, its run name last


def sweep_variants(base: Recipe, grid: list[tuple[str, list[str]]], seeds: int, seed_stages: list[str],
                   sets: tuple[str, ...]) -> list[Variant]:  # fmt: skip
    """One variant per point of the grid (a product over its keys) × seed: seed, seed + 1 … of the recipe, or with
    `seed_stages` of those stages only (`seeds.<stage>`)."""
    out = []
    for combo in itertools.product(*(vals for _, vals in grid)):
        for i in range(seeds):
            labels = {k: v for (k, _), v in zip(grid, combo)}
            extra = [f"{k}={v}" for k, v in labels.items()]
            if seeds > 1 and seed_stages:  # only these stages (and those after them) rerun per seed
                labels["seed"] = str(i)
                extra += [f"seeds.{s}={base.seed_for(s) + i}" for s in seed_stages]
            elif seeds > 1:
                labels["seed"] = str(base.seed + i)
                extra.append(f"seed={base.seed + i}")
            slug = "-".join(f"{k.split('.')[-1]}{v}" for k, v in labels.items()).replace("/", "_")
            out.append(Variant(labels, (*sets, *extra, f"name={base.name}-{slug}")))
    return out


def parse_grid(items: list[str], seeds: int, seed_stages: list[str]) -> list[tuple[str, list[str]]]:
    """`KEY=V1,V2` items → [(key, values)]; every malformed item, a bad seed count or an unknown stage is one
    line of a ConfigError."""
    grid, problems = [], []
    for item in items:
        key, sep, values = item.partition("=")
        vals = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not key.strip() or not vals:
            problems.append(f"--grid {item!r}: expected KEY=V1,V2,… (e.g. rlhf.kl_coef=0.01,0.05)")
        else:
            grid.append((key.strip(), vals))
    if seeds < 1:
        problems.append(f"--seeds {seeds}: expected 1 or more")
    problems += [f"--seed-stages: no stage {s!r}; stages are {', '.join(registry.NAMES)}"
                 for s in seed_stages if s not in registry.NAMES]  # fmt: skip
    if problems:
        raise ConfigError(problems)
    return grid


def sweep_command(opts: RunOptions, grid_items: list[str], seeds: int, seed_stages: tuple[str, ...]) -> str:
    """The command line that repeats a sweep: its grid, seeds, seeded stages, stages, overrides and reused runs."""
    parts = ["posttrain", "sweep", opts.recipe_path, *(a for g in grid_items for a in ("--grid", g))]
    parts += ["--seeds", str(seeds)] + (["--seed-stages", ",".join(seed_stages)] if seed_stages else [])
    parts += ["--only", ",".join(opts.only)] if opts.only else []
    parts += [a for s in opts.sets for a in ("--set", s)] + [a for r in opts.reuse for a in ("--reuse", r)]
    return shlex.join(parts)


def sweep(opts: RunOptions, grid_items: list[str], seeds: int = 1, seed_stages: tuple[str, ...] = ()) -> int:
    """Run a recipe once per point of a grid (× seeds), sharing finished stages between the variants (and with
    the base run folder), and write one comparison table beside the run folders."""
    base = load_recipe(opts.recipe_path, list(opts.sets))
    grid = parse_grid(grid_items, seeds, list(seed_stages))
    variants = sweep_variants(base, grid, seeds, list(seed_stages), opts.sets)
    recipes = [load_recipe(opts.recipe_path, list(v.sets)) for v in variants]  # every variant checked first
    print(f"[sweep] {len(variants)} variants of {base.name}: " + ", ".join(r.name for r in recipes))
    reuse_from = [*opts.reuse, str(base.run_dir)]
    for variant, recipe in zip(variants, recipes):
        print(f"\n[sweep] {recipe.name}: {' '.join(variant.sets[len(opts.sets) : -1])}", flush=True)
        rc = run(replace(opts, sets=variant.sets, from_=None, force=False, reuse=tuple(reuse_from)))
        if rc != 0:
            print(f"[sweep] variant {recipe.name} failed (exit {rc}); the later variants were not run",
                  file=sys.stderr)  # fmt: skip
            return rc
        reuse_from.append(str(recipe.run_dir))  # later variants share this one's finished stages
    if opts.dry_run:
        return 0
    table = sweep_table(
        [(v.labels, r.run_dir) for v, r in zip(variants, recipes)], list(opts.only) or base.stages()
    )
    out = base.run_dir.parent / f"sweep-{base.name}-{'-'.join(k for k, _ in grid) or 'seeds'}.md"
    out.write_text(
        f"# Sweep of {base.name}\n\n`{sweep_command(opts, grid_items, seeds, seed_stages)}`\n\n" + table
    )
    print("\n" + table + f"\n[sweep] table: {out}")
    return 0


# ----------------------------------------------------------------------------------------------- one model


def evaluate_one(recipe_path: str, sets: list[str], model: Path) -> dict[str, dict]:
    """The `eval` stage's measures of one saved model, against the run's SFT policy (and its RM when finished)."""
    from posttrain.engines.evaluation import evaluate_models

    recipe = load_recipe(recipe_path, sets)
    if read_done(recipe.run_dir / "sft") is None:
        raise ConfigError([f"posttrain eval needs the recipe's finished sft stage ({recipe.run_dir}/sft, the KL "
                           f"reference); run `posttrain run {recipe_path} --only sft`"])  # fmt: skip
    if not (Path(model) / "config.json").exists():
        raise ConfigError([f"{model}: not a saved model folder (no config.json)"])
    folders = {
        s: recipe.run_dir / s for s in ("data", "sft", "rm") if read_done(recipe.run_dir / s) is not None
    }
    return evaluate_models(recipe, Parents(folders=folders), [(str(model), Path(model), None)])
