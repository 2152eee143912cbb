import sys, copy, torch
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2]))
from tests.tiny import tiny_model, random_plan
from llama_pruning.surgery import apply_plan
from llama_pruning.models.export import save_pruned_model
from llama_pruning.plan import PruningPlan
from llama_pruning.models.arch import model_spec
for fam, bias in (("llama", False), ("qwen2", True), ("mistral", False)):
    m = tiny_model(n_rep=2, kv_heads=3, model_type=fam, bias=bias)
    plan = random_plan(m, seed=5); plan.bias_compensation = [True, False, False, True]
    p = apply_plan(copy.deepcopy(m), plan)
    save_pruned_model(p, None, f"/tmp/compat/{fam}")
    x = torch.randint(0, 97, (2, 9))
    with torch.no_grad(): torch.save((x, p(x).logits), f"/tmp/compat/{fam}.pt")
    # generation too
    torch.save(p.generate(x[:1], max_new_tokens=5, do_sample=False), f"/tmp/compat/{fam}_gen.pt")
print("saved")
