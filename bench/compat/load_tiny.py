"""Reload the folders of save_tiny.py with transformers alone and compare logits and generation."""

import sys

sys.modules["llama_pruning"] = None  # the saved folder must not need our package
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

for family in ("llama", "qwen2", "mistral"):
    model = AutoModelForCausalLM.from_pretrained(f"/tmp/compat/{family}", trust_remote_code=True)
    x, logits, generated = torch.load(f"/tmp/compat/{family}.pt")
    with torch.no_grad():
        same_logits = torch.equal(model(x).logits, logits)
    same_generation = torch.equal(model.generate(x[:1], max_new_tokens=5, do_sample=False), generated)
    print(transformers.__version__, family, type(model).__name__, "logits equal:", same_logits,
          "generate equal:", same_generation)
