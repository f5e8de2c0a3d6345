"""The preflight: what `posttrain check`, `posttrain run` and `run --dry-run` check before any stage starts, so that
a recipe that would fail after hours of GPU time fails in seconds.

For every stage that will run:
- its input files and datasets (`data.train`/`data.eval` for `data`; `rm.train_file`/`rm.eval_file` for `rm`):
  a JSONL file exists, is readable and its rows are valid in the stage's format (ours or TRL's), under the bad-row
  policy the stage applies (`max_bad_fraction`); a local dataset folder's first rows are read the same way; a hub
  dataset id is checked for its form only (there is no hub here to ask);
- its models and tokenizers (`model`, `teacher`, `reward_model`): a local folder is complete (config.json, every
  weight file whole, a tokenizer), a hub id is well-formed (`owner/name`);
- the disk of `output_dir`: its free space against what the stages will write — each exported model and the
  checkpoints a training stage keeps at a time (`keep_checkpoints`, with the optimizer state unless
  `save_optimizer: false`), each model's size from its weights (a local folder, the local hub cache, or for a
  tiny preset a 10 MB bound); a model whose size is not known here is said, not guessed.

Every problem names its recipe key and where it was set (`file:line`); all are reported at once (`ConfigError`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from posttrain.config import ConfigError, ModelSpec, Recipe, TrainConfig, where_of
from posttrain.files import free_bytes, human_bytes, is_pin, pin_problem

PRESET_BOUND = 10 * 2**20  # bytes: every tiny preset's fp32 weights are below it (tests/test_preflight.py)
FIRST_ROWS = 100  # rows of a local dataset folder read by the preflight


@dataclass
class Preflight:
    """What the preflight found: `problems` (each `where: key: what is wrong`), `notes` (what it could only say)."""

    recipe: Recipe
    where: dict
    source: str
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def problem(self, key: str, message: str) -> None:
        self.problems.append(f"{where_of(self.where, key, self.source)}: {key}: {message}")


def preflight(recipe: Recipe, where: dict, source: str, stages: list[str]) -> Preflight:
    """Check the inputs, models and disk of `stages` (those that will run). Nothing is raised: see `raise_if`."""
    pf = Preflight(recipe, where, source)
    for key, kind, name, split_key, fmt in data_inputs(recipe, stages):
        check_input(pf, key, kind, name, split_key, fmt)
    for key, spec, weights in model_inputs(recipe, stages):
        check_spec(pf, key, spec, weights)
    check_disk(pf, stages)
    return pf


class PreflightError(ConfigError):
    """The preflight found problems; the message lists every one, then says that nothing was started."""

    def __init__(self, problems: list[str]):
        super().__init__(problems)
        self.args = (f"preflight: {len(problems)} problem(s); nothing was started:\n"
                     + "\n".join(f"  - {p}" for p in problems)
                     + "\n(`posttrain check RECIPE` runs the same checks)",)  # fmt: skip


def raise_if(pf: Preflight) -> None:
    if pf.problems:
        raise PreflightError(pf.problems)


# ----------------------------------------------------------------------------------------------- data inputs


def data_inputs(recipe: Recipe, stages: list[str]) -> list[tuple[str, str, str, str, str]]:
    """(key, source, name, split key, format) of every file or dataset the stages read."""
    out = []
    if "data" in stages and recipe.data.source != "world":
        for which in ("train", "eval"):
            name = getattr(recipe.data, which)
            if name:
                out.append(
                    (f"data.{which}", recipe.data.source, name, f"data.hf_{which}_split", "conversations")
                )
    if "rm" in stages and recipe.rm.source != "policy":
        for which in ("train", "eval"):
            name = getattr(recipe.rm, f"{which}_file")
            if name:
                out.append(
                    (f"rm.{which}_file", recipe.rm.source, name, f"rm.hf_{which}_split", "preferences")
                )
    return out


def _split_and_limit(pf: Preflight, key: str, split_key: str) -> tuple[str, float, str]:
    section = key.split(".")[0]
    cfg = pf.recipe.data if section == "data" else pf.recipe.rm
    return getattr(cfg, split_key.split(".")[1]), cfg.max_bad_fraction, f"{section}.max_bad_fraction"


def check_input(pf: Preflight, key: str, kind: str, name: str, split_key: str, fmt: str) -> None:
    from posttrain.data.formats import DataError, read_rows

    split, limit, limit_key = _split_and_limit(pf, key, split_key)
    if kind == "jsonl":
        try:
            rows, bad = read_rows(name, fmt, pf.recipe.chat.system, limit, limit_key)
        except DataError as e:
            return pf.problem(key, _data_error(name, fmt, e))
        dropped = f", {len(bad)} bad ones to drop ({limit_key} {limit})" if bad else ""
        pf.notes.append(f"{key}: {name}: {len(rows)} valid {fmt} rows{dropped}")
    elif Path(name).expanduser().exists():
        check_local_dataset(pf, key, name, split, fmt)
    elif not _hub_id(name):
        pf.problem(key, f"{name!r} is neither an existing local path nor a hub dataset id (owner/name)")
    else:
        pf.notes.append(f"{key}: {name} (split {split}) is a hub id: its rows are checked when the stage reads "
                        f"them (`posttrain validate {name} --split {split} --format {fmt}` checks them now)")  # fmt: skip


def _data_error(name: str, fmt: str, e) -> str:
    errors = e.errors
    shown = "; ".join(errors[:3]) + (f"; … and {len(errors) - 3} more" if len(errors) > 3 else "")
    if len(errors) == 1 and errors[0].startswith(f"{name}: "):
        return errors[0]  # the file itself: missing, unreadable, not UTF-8, empty
    tail = str(e).splitlines()[-1] if "limit" in str(e).splitlines()[-1] else ""
    return (f"{len(errors)} bad row(s): {shown}" + (f" — {tail}" if tail else "")
            + f" (`posttrain validate {name} --format {fmt}` lists them all)")  # fmt: skip


def check_local_dataset(pf: Preflight, key: str, name: str, split: str, fmt: str) -> None:
    """A local dataset folder: its first rows of `split`, read and checked."""
    from posttrain.data.formats import DataError
    from posttrain.data.sources import hf_rows

    try:
        rows, errors = hf_rows(name, split, fmt, pf.recipe.chat.system, limit=FIRST_ROWS)
    except DataError as e:
        return pf.problem(key, e.errors[0])
    if errors or not rows:
        return pf.problem(key, "; ".join(errors[:3]) or f"{name}:{split}: no rows")
    pf.notes.append(f"{key}: {name} (split {split}): its first {len(rows)} rows are valid {fmt} rows")


def _hub_id(name: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


# ------------------------------------------------------------------------------------------- models


def model_inputs(recipe: Recipe, stages: list[str]) -> list[tuple[str, ModelSpec, bool]]:
    """(key, spec, whether its weights are read) of every model the stages load from the recipe (not from an
    earlier stage's output); a stage that only needs a tokenizer reads no weights."""
    wanted: dict[str, tuple[ModelSpec | None, bool]] = {}
    teacher_given = recipe.teacher_train is None  # else the teacher stage's own model is used
    for stage in stages:
        if stage == "data":
            wanted.setdefault("model", (recipe.model, False))
        if stage == "sft":
            wanted["model"] = (recipe.model, True)
        if stage == "teacher" or (stage in ("generate", "distill") and teacher_given):
            wanted["teacher"] = (recipe.teacher, True)
        if stage == "rm" and recipe.rm.init_from == "teacher" and teacher_given:
            wanted["teacher"] = (recipe.teacher, True)
        if stage == "rm" and not recipe.rm.init_from:
            wanted["reward_model"] = (recipe.reward_model, True)
    return [(k, spec, weights) for k, (spec, weights) in wanted.items() if spec is not None]


def check_spec(pf: Preflight, key: str, spec: ModelSpec, weights: bool) -> None:
    if spec.name_or_path is not None:
        kind = "model" if weights else "tokenizer"
        check_name(pf, f"{key}.name_or_path", spec.name_or_path, kind, tokenizer=spec.tokenizer is None)
    if spec.tokenizer not in (None, "tiny", spec.name_or_path):
        check_name(pf, f"{key}.tokenizer", spec.tokenizer, "tokenizer", tokenizer=True)
    if is_pin(spec.revision) and spec.name_or_path is not None:
        if not Path(spec.name_or_path).expanduser().is_dir():
            pf.problem(f"{key}.revision", f"{spec.revision[:20]}… pins a local folder's weights, but {spec.name_or_path} "
                       "is not a folder here (a pin inherited from the recipe this one extends? set revision: null)")  # fmt: skip
        elif weights and (problem := pin_problem(spec.name_or_path, spec.revision)):
            pf.problem(f"{key}.revision", problem)


def _path_like(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or name.count("/") > 1 or name.endswith("/")


def check_name(pf: Preflight, key: str, name: str, kind: str, tokenizer: bool) -> None:
    """A model or tokenizer named by a local folder (checked complete) or a hub id (checked for its form)."""
    path = Path(name).expanduser()
    if path.exists():
        for p in folder_problems(path, kind, tokenizer):
            pf.problem(key, p)
    elif _path_like(name):
        pf.problem(
            key, f"{name} does not exist (a local {kind} folder); point it at a save_pretrained folder"
        )
    elif not _hub_id(name):
        pf.problem(key, f"{name!r} is neither a local folder nor a hub id (owner/name)")
    else:
        pf.notes.append(
            f"{key}: {name} is a hub id: its form is right; whether it exists is seen when it loads"
        )


def folder_problems(path: Path, kind: str, tokenizer: bool) -> list[str]:
    """What a save_pretrained folder lacks: config.json and complete weights (a model), tokenizer files."""
    from posttrain.outputs import check_model_folder

    if not path.is_dir():
        return [f"{path} is a file; a {kind} is a folder written by save_pretrained"]
    out = []
    if kind == "model":
        if not (path / "config.json").is_file():
            out.append(f"{path} has no config.json: not a saved model folder")
        if any(path.glob("*.safetensors")) or (path / "model.safetensors.index.json").exists():
            out += [p.replace(f"{path}/", "") + f" (in {path})" for p in check_model_folder(path)[0]]
        elif not any(path.glob("pytorch_model*.bin")):
            out.append(f"{path} holds no weights (*.safetensors or pytorch_model*.bin)")
    names = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
    if tokenizer and not any((path / n).is_file() for n in names):
        out.append(f"{path} has no tokenizer ({', '.join(names)}); save it beside the model or set the spec's "
                   "`tokenizer:`")  # fmt: skip
    return out


# --------------------------------------------------------------------------------------------------- disk


def model_size(spec: ModelSpec | None) -> tuple[int, int] | None:
    """(parameters, bytes per parameter as saved) of a model: 4 with fp32, else 2 (bf16; `auto` is bf16 on the GPUs
    a real recipe runs on); a tiny preset counts as PRESET_BOUND bytes of fp32. None when not known here."""
    if spec is None:
        return None
    if spec.preset:
        return PRESET_BOUND // 4, 4
    params = parameters(spec.name_or_path, spec.hub_revision)
    return None if params is None else (params, 4 if spec.dtype == "fp32" else 2)


def parameters(name: str, revision: str | None = None) -> int | None:
    """The parameter count of a local model folder or of a hub model in the local hub cache (from the safetensors
    headers or the index's total size, read as bf16); None when neither is here."""
    from posttrain.outputs import safetensors_header

    folder = Path(name).expanduser()
    if not folder.is_dir():
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(name, revision=revision, local_files_only=True))
        except Exception:  # not in the cache (or not a hub id): the size is not known here
            return None
    total = 0
    for f in folder.glob("*.safetensors"):
        header, _ = safetensors_header(f)
        for k, t in (header or {}).items():
            if k != "__metadata__":
                n = 1
                for d in t["shape"]:
                    n *= d
                total += n
    return total or None


def _stage_writes(recipe: Recipe, stage: str) -> tuple[int | None, int, str]:
    """(bytes a stage keeps when done, bytes more it holds while it runs, how) for a stage that writes models; a
    checkpoint is the weights and, with `save_optimizer`, the optimizer state: Adam's two fp32 moments per parameter
    (and an fp32 master copy in bf16 training). (None, 0, "") when the model's size is not known here."""
    specs = {"teacher": recipe.teacher, "sft": recipe.model, "distill": recipe.model, "rlhf": recipe.model,
             "merge": recipe.model,
             "rm": {"teacher": recipe.teacher, "sft": recipe.model}.get(recipe.rm.init_from or "", recipe.reward_model)}  # fmt: skip
    if stage not in specs:
        return 0, 0, ""
    size = model_size(specs[stage])
    if size is None:
        return None, 0, ""
    params, per = size
    weights = params * per
    if stage == "merge":
        n = len(set(recipe.merge.sweep) | {recipe.merge.eta}) if recipe.merge.method == "liti" else 1
        return (
            weights,
            n * weights,
            f"merge: a model + {n} merged while it sweeps, {human_bytes(weights)} each",
        )
    train = {"teacher": recipe.teacher_train, "sft": recipe.sft, "rm": recipe.rm.train,
             "distill": recipe.distill and recipe.distill.train, "rlhf": recipe.rlhf and recipe.rlhf.train}  # fmt: skip
    cfg: TrainConfig = train[stage]
    runs = len(recipe.rlhf.resolved()) if stage == "rlhf" else 1
    ckpt = (
        0 if cfg.lora.enabled else weights + (params * (8 if per == 4 else 12) if cfg.save_optimizer else 0)
    )
    return (
        runs * weights,
        cfg.keep_checkpoints * ckpt,
        (
            f"{stage}: {runs} model(s) of {human_bytes(weights)} + {cfg.keep_checkpoints} checkpoint(s) of {human_bytes(ckpt)}"
        ),
    )


def check_disk(pf: Preflight, stages: list[str]) -> None:
    """The free space of `output_dir`'s disk against what the stages will write: every stage's models, and the
    largest of what one stage holds while it runs (checkpoints, a merge's sweep)."""
    keep, peak, parts, unknown = 0, 0, [], []
    for stage in stages:
        kept, running, what = _stage_writes(pf.recipe, stage)
        if kept is None:
            unknown.append(stage)
            continue
        keep, peak = keep + kept, max(peak, running)
        parts += [what] if what else []
    if unknown:
        pf.notes.append(f"disk: the size of the models of {', '.join(unknown)} is not known here (a hub id not in "
                        "the local cache): their outputs are not counted")  # fmt: skip
    if not parts:
        return
    folder = Path(pf.recipe.output_dir).expanduser()
    free = free_bytes(folder)
    need = keep + peak
    if need > free:
        pf.problem("output_dir", f"{pf.recipe.output_dir} has {human_bytes(free)} free on its disk, but the "
                   f"stages to run write about {human_bytes(need)} ({'; '.join(parts)}); free space, point output_dir at a "
                   "larger disk, or lower the stages' keep_checkpoints or set save_optimizer: false")  # fmt: skip
    else:
        pf.notes.append(f"disk: {pf.recipe.output_dir} has {human_bytes(free)} free; the stages to run write about "
                        f"{human_bytes(need)} at most ({'; '.join(parts)})")  # fmt: skip
