"""A stand-in for `vllm` in the tests (vLLM needs a GPU): the parts of its API the project calls — `LLM`,
`SamplingParams`, `TokensPrompt` — answered by HF decoding on the CPU, one prompt at a time, each request sampled
with its own seed (greedy at temperature 0), with the stop token kept at the end of a response's ids as vLLM keeps
it. With `STUB_VLLM_LOG` set, every engine built and every
`generate` call is written there as a JSON line; `STUB_VLLM_DROP` names a config key the engine's model config
loses (as an engine that ignores it would)."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace


def _log(row: dict) -> None:
    path = os.environ.get("STUB_VLLM_LOG")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")


class SamplingParams:
    def __init__(self, **kwargs):
        self.kwargs = kwargs


def TokensPrompt(prompt_token_ids):  # noqa: N802 (vLLM's name: a TypedDict)
    return {"prompt_token_ids": prompt_token_ids}


class LLM:
    def __init__(self, model: str, **kwargs):
        from transformers import AutoConfig, AutoModelForCausalLM

        _log({"event": "engine", "model": model, **{k: v for k, v in kwargs.items() if k != "dtype"}})
        self.model = AutoModelForCausalLM.from_pretrained(model, attn_implementation="eager").eval()
        config = AutoConfig.from_pretrained(model)
        if os.environ.get("STUB_VLLM_DROP"):
            setattr(config, os.environ["STUB_VLLM_DROP"], None)
        self.llm_engine = SimpleNamespace(model_config=SimpleNamespace(hf_config=config))

    def generate(self, prompts: list[dict], params, use_tqdm: bool = True):
        import torch

        params = params if isinstance(params, list) else [params] * len(prompts)
        _log({"event": "generate", "prompts": len(prompts), "params": [p.kwargs for p in params]})
        out = []
        for prompt, p in zip(prompts, params):
            kw, ids = p.kwargs, torch.tensor([prompt["prompt_token_ids"]])
            stops, sample = kw["stop_token_ids"], kw["temperature"] > 0
            with torch.no_grad(), torch.random.fork_rng(devices=[]):
                torch.manual_seed(kw["seed"])  # a request's own seed, as vLLM's per-request generator
                gen = self.model.generate(
                    input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=kw["max_tokens"],
                    do_sample=sample, temperature=kw["temperature"] if sample else None,
                    top_p=kw["top_p"] if sample else None, top_k=max(kw["top_k"], 0) if sample else None,
                    eos_token_id=stops, pad_token_id=stops[0],
                )  # fmt: skip
            new = gen[0, ids.shape[1] :].tolist()
            cut = next((i + 1 for i, t in enumerate(new) if t in stops), len(new))
            out.append(SimpleNamespace(outputs=[SimpleNamespace(token_ids=new[:cut])]))
        return out
