"""A training step of the real-shape student on this CPU as the sft stage takes it (TRL's tiled LM head, AdamW),
in a process of its own: prints its peak resident memory growth over the libraries' (tests/test_plan.py).

The peak is the kernel's high-water mark (VmHWM), reset after the libraries and the tokenizer are loaded (writing 5 to
/proc/self/clear_refs), so that a transient peak while loading them does not hide the step's."""

import gc
import json
import re
import sys

import torch  # noqa
from transformers import AutoTokenizer
from trl.trainer.utils import add_fused_lm_head

from posttrain.config import ModelSpec
from posttrain.logits import match_trl_tiles
from posttrain.modeling import load_causal_lm

rows, seq = int(sys.argv[1]), int(sys.argv[2])
tok = AutoTokenizer.from_pretrained(sys.argv[3])


def status(key: str) -> int:
    """A /proc/self/status figure in bytes."""
    return int(re.search(rf"{key}:\s+(\d+) kB", open("/proc/self/status").read()).group(1)) * 1024


gc.collect()
base = status("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
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
print(json.dumps({"growth": status("VmHWM") - base}))
