"""Save tiny non-uniform pruned Llama / Qwen2 / Mistral models with their logits and greedy continuations."""

import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from llama_pruning.models.export import save_pruned_model  # noqa: E402
from llama_pruning.surgery import apply_plan  # noqa: E402
from tests.tiny import random_plan, tiny_model  # noqa: E402

OUT = Path("/tmp/compat")

for family, bias in (("llama", False), ("qwen2", True), ("mistral", False)):
    model = tiny_model(n_rep=2, kv_heads=3, model_type=family, bias=bias)
    plan = random_plan(model, seed=5)
    plan.bias_compensation = [True, False, False, True]
    pruned = apply_plan(copy.deepcopy(model), plan)
    save_pruned_model(pruned, None, OUT / family)
    x = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        logits = pruned(x).logits
    torch.save((x, logits, pruned.generate(x[:1], max_new_tokens=5, do_sample=False)), OUT / f"{family}.pt")
print("saved")
