"""Peer of `ouro bench ssd-gpu`: mamba_ssm's Triton `mamba_chunk_scan_combined` on the same shapes.

Imports only mamba_ssm's Triton ops from a source folder you bring (the public state-spaces/mamba
repository or the PyPI sdist, unpacked in a git-ignored folder such as peers/mamba); its compiled CUDA
extensions are not needed. Needs torch and triton. Prints one JSON object per shape:
{"shape": "BxLxHxPxN", "fwd_ms": …, "fwd_bwd_ms": …} (medians of triton.testing.do_bench); with
--decode-batches, also {"decode_batch": B, "decode_ms": …}: the single-token SSM state update
(`selective_state_update`, f32, in place, called as mamba_ssm's Mamba2.step does) at the first shape's
heads, head_dim and d_state.

    python3 scripts/bench/ssd_triton.py --src peers/mamba --shapes 8x2048x32x64x128 --dtype bf16
"""

import argparse
import json
import sys


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--src", required=True, help="folder holding the mamba_ssm package source")
    ap.add_argument("--shapes", default="8x2048x32x64x128,4x8192x32x64x128,2x32768x32x64x64")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "f32"])
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--decode-batches", default="", help="comma-separated batch sizes for the decode step")
    args = ap.parse_args()
    sys.path.insert(0, args.src)
    import torch
    import triton
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    dev = "cuda"
    torch.manual_seed(0)
    print(f"peer: torch {torch.__version__}, triton {triton.__version__}, {torch.cuda.get_device_name()}", file=sys.stderr)
    for s in args.shapes.split(","):
        b, l, h, p, n = (int(v) for v in s.split("x"))
        hp = h * p
        # x, B, C are views of one xBC tensor, as in mamba_ssm's Mamba2 layer.
        xbc = torch.randn(b, l, hp + 2 * n, device=dev, dtype=dtype)
        dt = torch.randn(b, l, h, device=dev) * 0.5
        A = -torch.empty(h, device=dev).uniform_(1.0, 16.0)
        dt_bias = torch.empty(h, device=dev).uniform_(-4.0, -2.0)
        D = torch.ones(h, device=dev)
        dy = torch.randn(b, l, h, p, device=dev, dtype=dtype)

        def fwd(xbc, dt, A, dt_bias, D):
            x = xbc[..., :hp].view(b, l, h, p)
            B = xbc[..., hp:hp + n].view(b, l, 1, n)
            C = xbc[..., hp + n:].view(b, l, 1, n)
            return mamba_chunk_scan_combined(x, dt, A, B, C, args.chunk, D=D, dt_bias=dt_bias, dt_softplus=True)

        with torch.no_grad():
            fwd_ms = triton.testing.do_bench(lambda: fwd(xbc, dt, A, dt_bias, D), warmup=50, rep=max(100, 20 * args.iters), return_mode="median")
        leaves = [t.clone().requires_grad_(True) for t in (xbc, dt, A, dt_bias, D)]

        def fb():
            fwd(*leaves).backward(dy)

        fb_ms = triton.testing.do_bench(fb, warmup=50, rep=max(100, 20 * args.iters), grad_to_none=leaves, return_mode="median")
        print(json.dumps({"shape": s, "fwd_ms": fwd_ms, "fwd_bwd_ms": fb_ms}), flush=True)
        del xbc, dt, dy, leaves
        torch.cuda.empty_cache()
    if args.decode_batches:
        from mamba_ssm.ops.triton.selective_state_update import selective_state_update

        _, _, h, p, n = (int(v) for v in args.shapes.split(",")[0].split("x"))
        for b in (int(v) for v in args.decode_batches.split(",")):
            state = torch.randn(b, h, p, n, device=dev)
            x = torch.randn(b, h, p, device=dev)
            dt = torch.randn(b, h, device=dev)[..., None].expand(b, h, p)
            A = (-torch.empty(h, device=dev).uniform_(1.0, 16.0))[:, None, None].expand(h, p, n)
            B = torch.randn(b, 1, n, device=dev)
            C = torch.randn(b, 1, n, device=dev)
            D = torch.ones(h, device=dev)[:, None].expand(h, p)
            dt_bias = torch.empty(h, device=dev).uniform_(-4.0, -2.0)[:, None].expand(h, p)

            def step():
                selective_state_update(state, x, dt, A, B, C, D, dt_bias=dt_bias, dt_softplus=True)

            with torch.no_grad():
                ms = triton.testing.do_bench(step, warmup=50, rep=max(100, 20 * args.iters), return_mode="median")
            print(json.dumps({"decode_batch": b, "decode_ms": ms}), flush=True)


if __name__ == "__main__":
    main()
