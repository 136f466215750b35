"""A random-weight Mamba-2 language model in HF layout, for inference benchmarks.

    python scripts/bench/random_mamba2.py --shape 130m --out runs/bench/mamba2-130m

Shapes follow state-spaces/mamba2-130m and mamba2-780m (d_state 128, head_dim 64, expand 2, vocab
50288, tied embeddings). Weights come from transformers' own initialisation (Mamba-2's A_log, D and dt
bias rules) with a fixed seed. The same folder is converted
for llama.cpp by its convert_hf_to_gguf.py and loaded by ouro directly.
"""
import argparse
import torch
from transformers import Mamba2Config, Mamba2ForCausalLM

SHAPES = {"130m": (768, 24), "370m": (1024, 48), "780m": (1536, 48), "1.3b": (2048, 48)}

ap = argparse.ArgumentParser()
ap.add_argument("--shape", choices=SHAPES, default="130m")
ap.add_argument("--out", required=True)
ap.add_argument("--seed", type=int, default=0)
a = ap.parse_args()
d, n = SHAPES[a.shape]
torch.manual_seed(a.seed)
cfg = Mamba2Config(vocab_size=50288, hidden_size=d, num_hidden_layers=n, state_size=128, head_dim=64, expand=2,
                   num_heads=2 * d // 64, n_groups=1, conv_kernel=4, use_bias=False, use_conv_bias=True,
                   rms_norm=True, norm_before_gate=False, chunk_size=256, tie_word_embeddings=True,
                   residual_in_fp32=True, layer_norm_epsilon=1e-5)
model = Mamba2ForCausalLM(cfg).float().eval()
if not all(torch.isfinite(p).all() for p in model.parameters()):
    raise SystemExit("non-finite initial weights")
model.save_pretrained(a.out, safe_serialization=True)
print(f"{a.out}: mamba2-{a.shape} random weights, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters")
