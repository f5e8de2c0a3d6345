"""`posttrain push RUN/STAGE --repo-id ID [--private]`: a finished stage's exported model uploaded to the Hugging
Face hub — the `model/` folder only (weights, config, tokenizer with training's chat template, its model card),
never the stage's checkpoints, data or logs.

    posttrain push runs/my-gemma/merge --repo-id me/my-gemma-2b-it --private
    posttrain push runs/my-gemma/rlhf/seed1 --repo-id me/my-gemma-rl-seed1      (one RL run's policy)

Before anything is uploaded: the stage is finished (DONE), its model reads back complete, its tokenizer carries
posttrain's chat template, and a hub token is there (`hf auth login`, or `HF_TOKEN`). The client calls are
`huggingface_hub.HfApi.create_repo` and `upload_folder`.
"""

from __future__ import annotations

from pathlib import Path

from posttrain.cards import CARD, chat_template_of, model_folders, template_policy, write_cards
from posttrain.errors import StageError
from posttrain.outputs import check_model_folder, read_done


class PushError(StageError):
    """A model cannot be pushed as asked; the message says why and what to do. Nothing was uploaded."""


def model_to_push(path: Path) -> tuple[Path, Path]:
    """(the finished stage folder, the model folder) that `path` names: `RUN/STAGE`, `RUN/rlhf/<run>` or a
    `model/` folder inside them."""
    path = Path(path)
    path = path.parent if path.name == "model" else path
    if path.name.endswith(".partial") or path.parent.name.endswith(".partial"):
        raise PushError(f"{path} is an unfinished or failed attempt (.partial); push a finished stage folder")
    if not (path / "model" / "config.json").is_file():
        runs = [m.parent for m in model_folders(path) if m.parent != path]
        hint = (f"it holds one model per run: push {' or '.join(str(r) for r in runs)}" if runs else
                "stages with a model: teacher, sft, distill, rm, rlhf/<run>, merge")  # fmt: skip
        raise PushError(f"{path} has no exported model ({path}/model/); {hint}")
    stage = path if read_done(path) is not None else path.parent
    if read_done(stage) is None:
        raise PushError(f"{stage} is not finished (no DONE); run the stage first")
    return stage, path / "model"


def check_pushable(stage: Path, model: Path) -> None:
    problems, _ = check_model_folder(model)
    if problems:
        raise PushError(f"{model} does not read back complete: " + "; ".join(problems[:5]))
    if template_policy(chat_template_of(model)) is None:
        raise PushError(f"{model}'s tokenizer does not carry posttrain's chat template (it was exported before "
                        f"posttrain wrote it), so other tools would not render what training did; rerun the stage "
                        f"(`posttrain run RECIPE --from {stage.name}`) and push the new export")  # fmt: skip


def push(path: Path, repo_id: str, private: bool = False) -> str:
    """Upload the exported model of `path` to the hub repo `repo_id` (created when missing, private with
    `private`); returns the commit's URL. Raises PushError before any upload when it cannot be done."""
    import huggingface_hub
    from huggingface_hub.errors import HfHubHTTPError
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    stage, model = model_to_push(path)
    check_pushable(stage, model)
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise PushError(f"--repo-id {repo_id!r} is not a hub repo id (owner/name): {e}") from None
    token = huggingface_hub.get_token()
    if token is None:
        raise PushError("no Hugging Face token: log in with `hf auth login` (or set HF_TOKEN) and push again; "
                        "nothing was uploaded")  # fmt: skip
    if not (model / CARD).is_file():  # a model exported before cards were written
        write_cards(stage, stage.parent.name)
    label = f"{stage.parent.name}/{stage.name}" + (f"/{model.parent.name}" if model.parent != stage else "")
    api = huggingface_hub.HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        info = api.upload_folder(repo_id=repo_id, folder_path=str(model), repo_type="model",
                                 commit_message=f"posttrain: {label} (config {read_done(stage)['config_hash']})",
                                 ignore_patterns=["*.tmp", "checkpoint-*"])  # fmt: skip
    except HfHubHTTPError as e:
        raise PushError(f"the hub refused the upload to {repo_id}: {str(e).splitlines()[0]}") from None
    return str(getattr(info, "commit_url", info))
