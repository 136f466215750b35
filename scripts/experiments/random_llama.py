# A random Llama with SmolLM2-135M-Instruct's shapes, for timing `ouro distill` on a machine that cannot
# hold the GGUF teacher (the device machine's carry limit). Needs torch (safetensors if present).
#   python3 scripts/experiments/random_llama.py DIR [TOKENIZER_JSON]
# writes DIR/config.json, DIR/model.safetensors (or pytorch_model.bin) and a copy of the tokenizer
# (e.g. the tokenizer.json of a student distilled from the real teacher).
import json, os, shutil, sys
import torch

out = sys.argv[1]
os.makedirs(out, exist_ok=True)
c = {"model_type": "llama", "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
     "num_attention_heads": 9, "num_key_value_heads": 3, "rms_norm_eps": 1e-5, "rope_theta": 100000.0,
     "max_position_embeddings": 8192, "tie_word_embeddings": True, "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2}
json.dump(c, open(os.path.join(out, "config.json"), "w"))
if len(sys.argv) > 2:
    shutil.copy(sys.argv[2], os.path.join(out, "tokenizer.json"))
g = torch.Generator().manual_seed(0)
d, f, L, hq, hk = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["num_attention_heads"], c["num_key_value_heads"]
hd = d // hq
w = lambda *s: torch.randn(*s, generator=g) * 0.02
sd = {"model.embed_tokens.weight": w(c["vocab_size"], d), "model.norm.weight": torch.ones(d)}
for i in range(L):
    p = f"model.layers.{i}."
    sd.update({p + "input_layernorm.weight": torch.ones(d), p + "post_attention_layernorm.weight": torch.ones(d),
               p + "self_attn.q_proj.weight": w(hq * hd, d), p + "self_attn.k_proj.weight": w(hk * hd, d),
               p + "self_attn.v_proj.weight": w(hk * hd, d), p + "self_attn.o_proj.weight": w(d, hq * hd),
               p + "mlp.gate_proj.weight": w(f, d), p + "mlp.up_proj.weight": w(f, d), p + "mlp.down_proj.weight": w(d, f)})
try:
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in sd.items()}, os.path.join(out, "model.safetensors"))
except ImportError:
    torch.save(sd, os.path.join(out, "pytorch_model.bin"))
print("params", sum(v.numel() for v in sd.values()))
