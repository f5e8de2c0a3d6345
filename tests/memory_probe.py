"""A training step of the real-shape student on this CPU as the sft stage takes it (TRL's tiled LM head, AdamW),
in a process of its own: prints its peak resident memory growth over the libraries' (tests/test_plan.py)."""

import json
import resource
import sys

import torch  # noqa
from transformers import AutoTokenizer
from trl.trainer.utils import add_fused_lm_head

from posttrain.config import ModelSpec
from posttrain.logits import match_trl_tiles
from posttrain.modeling import load_causal_lm

rows, seq = int(sys.argv[1]), int(sys.argv[2])
tok = AutoTokenizer.from_pretrained(sys.argv[3])
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
match_trl_tiles("cpu")
model = load_causal_lm(ModelSpec(preset="real-shape-student", tokenizer=sys.argv[3]), tok, trainable=True)
add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
g = torch.Generator().manual_seed(0)
for _ in range(2):
    ids = torch.randint(3, 256000, (rows, seq), generator=g)
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids, fused_lm_head=True)
    out.loss.backward()
    opt.step()
    opt.zero_grad()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"growth": (peak - base) * 1024}))
