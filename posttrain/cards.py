"""Model cards: the README.md of every exported model folder (`<stage>/model/`, `rlhf/<run>/model/`), written from
the stage's own record before its DONE, so that a model copied or pushed elsewhere says where it came from.

A card holds: the lineage (recipe, stage, the stage's config hash and its parents' hashes, the git commit, the
libraries, the stage's resolved config), the stage's figures (its summary row; an RL run's figures at its end), the
chat template its tokenizer carries and how to use it, and for a reward model what its score is.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from posttrain import registry
from posttrain.files import read_summary, write_atomic

CARD = "README.md"
TEMPLATE_MARK = "posttrain: Gemma turns as training rendered them; system policy: "


def model_folders(stage_folder: Path) -> list[Path]:
    """The exported model folders of a stage folder: `model/` (a stage's) and `<run>/model/` (an RL run's)."""
    found = [stage_folder / "model", *sorted(stage_folder.glob("*/model"))]
    return [m for m in found if (m / "config.json").is_file()]


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def chat_template_of(model: Path) -> str | None:
    """The chat template a saved tokenizer carries (`chat_template.jinja`, else `tokenizer_config.json`)."""
    path = model / "chat_template.jinja"
    if path.is_file():
        return path.read_text()
    config = _read_json(model / "tokenizer_config.json") or {}
    template = config.get("chat_template")
    return template if isinstance(template, str) else None


def template_policy(template: str | None) -> str | None:
    """The system policy of a template posttrain wrote (`fold` or `reject`); None for any other template."""
    if not template or TEMPLATE_MARK not in template.splitlines()[0]:
        return None
    return template.splitlines()[0].split(TEMPLATE_MARK, 1)[1].split()[0]


def _figures(stage_folder: Path, model: Path) -> dict[str, Any]:
    """Scalar figures of the model: an RL run's `figures.json` at its end, else the stage's summary row."""
    run = _read_json(model.parent / "figures.json") if model.parent != stage_folder else None
    source = (run or {}).get("end") or read_summary(stage_folder)
    skip = {"summary", "world_scores"}
    return {k: v for k, v in source.items() if k not in skip and isinstance(v, (int, float, str))}


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _lineage(recipe: str, label: str, prov: dict, stage_folder: Path) -> list[str]:
    stage = prov.get("stage", stage_folder.name)
    does = {s.name: s.does for s in registry.STAGES}.get(stage, "")
    parents = ", ".join(f"`{p}` (`{h}`)" for p, h in sorted(prov.get("parents", {}).items())) or "none"
    libs = ", ".join(f"{k} {v}" for k, v in prov.get("versions", {}).items())
    lines = ["## Lineage", "", "| | |", "|---|---|", f"| recipe | `{recipe}` |", f"| stage | `{label}`: {does} |",
             f"| config hash | `{prov.get('config_hash', '?')}` (the stage's config and its parents' hashes) |",
             f"| parents | {parents} |", f"| git commit | `{prov.get('git_commit')}` |",
             f"| finished | {prov.get('finished', '?')} |", f"| libraries | {libs} |"]  # fmt: skip
    config = stage_folder / "config.yaml"
    if config.is_file():
        lines += ["", "<details><summary>The stage's resolved config (config.yaml)</summary>", "", "```yaml",
                  config.read_text().rstrip(), "```", "", "</details>"]  # fmt: skip
    return lines


def _usage(template: str | None, is_rm: bool) -> list[str]:
    policy = template_policy(template)
    if policy is None:
        return ["## Chat template", "", "This tokenizer's chat template was not written by posttrain."]
    system = ("a system message's text and a blank line go before the first user turn's text"
              if policy == "fold" else "a system message is refused")  # fmt: skip
    auto = "AutoModelForSequenceClassification" if is_rm else "AutoModelForCausalLM"
    return ["## Chat template", "",
            "The tokenizer's chat template renders a conversation exactly as training rendered it (`posttrain.chat."
            "render`): `<bos>`, then `<start_of_turn>user\\n…<end_of_turn>\\n<start_of_turn>model\\n…<end_of_turn>\\n` "
            f"per turn, content trimmed; system policy `{policy}`: {system}. Generation stops at `<end_of_turn>`.",
            "", "```python", f"from transformers import AutoTokenizer, {auto}", "",
            'path = "."  # this folder, or the hub repo it was pushed to',
            "tokenizer = AutoTokenizer.from_pretrained(path)", f"model = {auto}.from_pretrained(path)",
            'messages = [{"role": "user", "content": "What is 2 + 3?"}]',
            "ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\")",
            "```", "", "<details><summary>The template</summary>", "", "```jinja", template.rstrip(), "```", "",
            "</details>"]  # fmt: skip


def _score(model: Path, figures: dict[str, Any]) -> list[str]:
    """What a reward model's score is, as `AutoModelForSequenceClassification` reads it and as posttrain did."""
    config = _read_json(model / "config.json") or {}
    w = config.get("posttrain_likelihood_weight") or 0.0
    lines = ["## Score", "",
             "`AutoModelForSequenceClassification.from_pretrained(...)` loads this reward model whole (a "
             f"`{(config.get('architectures') or ['?'])[0]}` with one output, no weight newly initialised); its score "
             "is that output's logit at the last token of the rendered conversation, prompt and response "
             f"(transformers reads the last token that is not the pad id, {config.get('pad_token_id')})."]  # fmt: skip
    if w:
        lines += ["", f"The reward posttrain trained and used adds {w:g} × the model's own log-likelihood of the final "
                  "model turn, Σ over its tokens (`rm.likelihood_weight`; `posttrain_likelihood_weight` and "
                  "`posttrain_response_prefix` in config.json): `posttrain.reward.last_token_rewards` computes it. "
                  "The sequence classifier's logit alone is the head's part of that reward, not all of it."]  # fmt: skip
        if "standard_read_accuracy" in figures:
            lines[-1] += (f" Read alone, as transformers reads it, it ranks {_fmt(figures['standard_read_accuracy'])} "
                          f"of the held-out pairs (the reward with the likelihood term: "
                          f"{_fmt(figures.get('heldout_accuracy'))}).")  # fmt: skip
    else:
        lines += [
            "",
            "That logit is the reward posttrain trained and used (`posttrain.reward.last_token_rewards`).",
        ]
    return lines


def card_text(stage_folder: Path, model: Path, recipe: str) -> str:
    """The model card of `model`, an exported model folder of `stage_folder` (finished or being finished)."""
    prov = _read_json(stage_folder / "provenance.json") or {}
    stage = prov.get("stage", stage_folder.name.removesuffix(".partial"))
    label = stage if model.parent == stage_folder else f"{stage}/{model.parent.name}"
    config = _read_json(model / "config.json") or {}
    is_rm = any(a.endswith("ForSequenceClassification") for a in config.get("architectures") or [])
    figures = _figures(stage_folder, model)
    head = ["---", "library_name: transformers",
            f"pipeline_tag: {'text-classification' if is_rm else 'text-generation'}",
            "tags:", "- posttrain", f"- {config.get('model_type', 'model')}", f"- {stage}", "---", "",
            f"# {recipe}/{label}", "",
            f"Stage `{stage}` of the posttrain recipe `{recipe}`"
            + (" (a reward model)." if is_rm else ".")]  # fmt: skip
    lines = head + [""] + _lineage(recipe, label, prov, stage_folder) + ["", "## Figures", ""]
    if figures:
        lines += ["| figure | value |", "|---|---:|", *(f"| {k} | {_fmt(v)} |" for k, v in figures.items())]
    else:
        lines.append("No figures were recorded.")
    lines += [""] + _usage(chat_template_of(model), is_rm)
    if is_rm:
        lines += [""] + _score(model, figures)
    return "\n".join(lines) + "\n"


def write_cards(stage_folder: Path, recipe: str) -> list[Path]:
    """Write the card (README.md) of every exported model folder of `stage_folder`; returns the cards."""
    out = []
    for model in model_folders(stage_folder):
        write_atomic(model / CARD, card_text(stage_folder, model, recipe))
        out.append(model / CARD)
    return out
