import sys, torch, transformers
sys.modules["llama_pruning"] = None
from transformers import AutoModelForCausalLM
for fam in ("llama", "qwen2", "mistral"):
    m = AutoModelForCausalLM.from_pretrained(f"/tmp/compat/{fam}", trust_remote_code=True)
    x, y = torch.load(f"/tmp/compat/{fam}.pt")
    with torch.no_grad(): ok = torch.equal(m(x).logits, y)
    g = m.generate(x[:1], max_new_tokens=5, do_sample=False)
    print(transformers.__version__, fam, type(m).__name__, "logits equal:", ok, "generate equal:", torch.equal(g, torch.load(f"/tmp/compat/{fam}_gen.pt")))
