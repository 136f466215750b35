"""Peer benchmark for `ouro bench ssd --peer-python`: the SSD scan in CPU PyTorch, same shapes.

Times `ssd_minimal_discrete` (mamba_ssm's reference chunked algorithm, via scripts/reference) and,
for lengths up to 2048, the sequential recurrence. Prints one JSON object per measurement.
"""
import argparse, json, os, sys, time
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "reference"))
import torch
from mamba_ref import ssd_minimal_discrete, ssd_sequential

ap = argparse.ArgumentParser()
for k, v in [("batch", 1), ("heads", 24), ("head-dim", 64), ("state", 128), ("groups", 1), ("chunk", 64), ("iters", 5), ("threads", 2)]:
    ap.add_argument("--" + k, type=int, default=v)
ap.add_argument("--lens", default="512,2048,8192")
ap.add_argument("--backward", action="store_true")
a = ap.parse_args()
torch.set_num_threads(a.threads)
torch.manual_seed(0)


def timeit(f, iters):
    f()
    ts = []
    for _ in range(max(iters, 1)):
        t = time.perf_counter(); f(); ts.append(time.perf_counter() - t)
    return sorted(ts)[len(ts) // 2]


for l in [int(s) for s in a.lens.split(",")]:
    b, h, p, n = a.batch, a.heads, a.head_dim, a.state
    X = (torch.rand(b, l, h, p) - 0.5) * 0.2
    A = -torch.rand(b, l, h) * 0.2
    B = torch.rand(b, l, h, n) * 2 - 1
    C = torch.rand(b, l, h, n) * 2 - 1
    q = min(a.chunk, l)
    with torch.no_grad():
        t = timeit(lambda: ssd_minimal_discrete(X, A, B, C, q), a.iters)
    print(json.dumps(dict(len=l, algo=f"torch ssd_minimal(Q={q})", pass_="fwd", seconds=t, tokens_per_s=b * l / t)).replace("pass_", "pass"), flush=True)
    if a.backward:
        Xg, Ag, Bg, Cg = [v.clone().requires_grad_() for v in (X, A, B, C)]
        dy = torch.randn(b, l, h, p)
        def fb():
            y, _ = ssd_minimal_discrete(Xg, Ag, Bg, Cg, q)
            (y * dy).sum().backward()
        t = timeit(fb, a.iters)
        print(json.dumps(dict(len=l, algo=f"torch ssd_minimal(Q={q})", pass_="fwd+bwd", seconds=t, tokens_per_s=b * l / t)).replace("pass_", "pass"), flush=True)
    if l <= 2048:
        with torch.no_grad():
            t = timeit(lambda: ssd_sequential(X, A, B, C), max(1, a.iters // 2))
        print(json.dumps(dict(len=l, algo="torch sequential", pass_="fwd", seconds=t, tokens_per_s=b * l / t)).replace("pass_", "pass"), flush=True)
