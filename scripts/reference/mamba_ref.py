"""Reference math for ouro's parity fixtures and peer benchmarks, in PyTorch.

Written from the definitions in `mamba_ssm` (ssd_minimal.py's `ssd_minimal_discrete`,
selective_scan_interface.py's `selective_scan_ref`, layernorm_gated.py's `rms_norm_ref`) and
checked against them by their documented semantics: see shared notes/reference-math.md.
All functions take channels-last tensors like ouro: x (b, l, h, p), B/C (b, l, g, n).
"""
import torch
import torch.nn.functional as F


def segsum(a):
    """a (..., T) -> (..., T, T) with [i, j] = sum_{j<k<=i} a_k for j <= i, else -inf (stable form)."""
    T = a.size(-1)
    rep = a.unsqueeze(-1).expand(*a.shape, T)  # [..., k, j] = a_k
    strict = torch.tril(torch.ones(T, T, dtype=torch.bool, device=a.device), diagonal=-1)
    rep = rep.masked_fill(~strict, 0)
    out = torch.cumsum(rep, dim=-2)
    incl = torch.tril(torch.ones(T, T, dtype=torch.bool, device=a.device), diagonal=0)
    return out.masked_fill(~incl, float("-inf"))


def heads_from_groups(t, h):
    """(b, l, g, n) -> (b, l, h, n) with head i using group i // (h // g) (mamba_ssm's mapping)."""
    g = t.shape[2]
    return t.repeat_interleave(h // g, dim=2)


def ssd_minimal_discrete(X, A, B, C, block_len, initial_states=None):
    """The SSD chunked algorithm. X (b, l, h, p) = x*dt; A (b, l, h) = dt*A; B, C (b, l, h, n).
    l must be a multiple of block_len. Returns Y (b, l, h, p), final state (b, h, p, n)."""
    b, l, h, p = X.shape
    c = l // block_len
    Xc = X.reshape(b, c, block_len, h, p)
    Bc = B.reshape(b, c, block_len, h, -1)
    Cc = C.reshape(b, c, block_len, h, -1)
    Ac = A.reshape(b, c, block_len, h).permute(0, 3, 1, 2)  # (b, h, c, l)
    A_cum = torch.cumsum(Ac, dim=-1)
    # 1. within chunks: masked attention
    L = torch.exp(segsum(Ac))  # (b, h, c, l, s)
    Y_diag = torch.einsum("bclhn,bcshn,bhcls,bcshp->bclhp", Cc, Bc, L, Xc)
    # 2. each chunk's own end state
    decay_states = torch.exp(A_cum[..., -1:] - A_cum)
    states = torch.einsum("bclhn,bhcl,bclhp->bchpn", Bc, decay_states, Xc)
    # 3. pass states between chunks
    if initial_states is None:
        initial_states = torch.zeros_like(states[:, :1])
    else:
        initial_states = initial_states.unsqueeze(1)
    states = torch.cat([initial_states, states], dim=1)
    decay_chunk = torch.exp(segsum(F.pad(A_cum[..., -1], (1, 0))))  # (b, h, c+1, c+1)
    new_states = torch.einsum("bhzc,bchpn->bzhpn", decay_chunk, states)
    states, final = new_states[:, :-1], new_states[:, -1]
    # 4. incoming state to outputs
    Y_off = torch.einsum("bclhn,bchpn,bhcl->bclhp", Cc, states, torch.exp(A_cum))
    return (Y_diag + Y_off).reshape(b, l, h, p), final


def ssd_sequential(X, A, B, C, initial_states=None):
    """The recurrence S_t = exp(A_t) S_{t-1} + X_t (x) B_t, y_t = S_t C_t. Shapes as ssd_minimal_discrete."""
    b, l, h, p = X.shape
    n = B.shape[-1]
    S = torch.zeros(b, h, p, n, dtype=X.dtype) if initial_states is None else initial_states.clone()
    ys = []
    for t in range(l):
        S = S * torch.exp(A[:, t])[:, :, None, None] + X[:, t, :, :, None] * B[:, t, :, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", S, C[:, t]))
    return torch.stack(ys, dim=1), S


def mamba_chunk_scan_ref(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, dt_softplus=False,
                         dt_limit=(0.0, float("inf")), initial_states=None):
    """`mamba_chunk_scan_combined` semantics on top of ssd_minimal_discrete (l padded to the chunk)."""
    b, l, h, p = x.shape
    if dt_bias is not None:
        dt = dt + dt_bias
    if dt_softplus:
        dt = F.softplus(dt)
    if dt_limit != (0.0, float("inf")):
        dt = dt.clamp(dt_limit[0], dt_limit[1])
    Bh, Ch = heads_from_groups(B, h), heads_from_groups(C, h)
    pad = (-l) % chunk_size
    X = x * dt[..., None]
    Ad = dt * A
    if pad:
        X = F.pad(X, (0, 0, 0, 0, 0, pad))
        Ad = F.pad(Ad, (0, 0, 0, pad))
        Bh = F.pad(Bh, (0, 0, 0, 0, 0, pad))
        Ch = F.pad(Ch, (0, 0, 0, 0, 0, pad))
    y, final = ssd_minimal_discrete(X, Ad, Bh, Ch, chunk_size, initial_states)
    y = y[:, :l]
    if pad:  # padded steps have zero input and zero log-decay: the state is unchanged
        pass
    if D is not None:
        y = y + x * (D[:, None] if D.dim() == 1 else D)
    if z is not None:
        y = y * F.silu(z)
    return y, final


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       initial_state=None):
    """Mamba-1 S6, channels-last: u, delta (b, l, d); A (d, n); B, C (b, l, n) or (b, l, g, n)."""
    b, l, d = u.shape
    n = A.shape[1]
    if delta_bias is not None:
        delta = delta + delta_bias
    if delta_softplus:
        delta = F.softplus(delta)
    if B.dim() == 3:
        B, C = B.unsqueeze(2), C.unsqueeze(2)
    g = B.shape[2]
    Bd = B.repeat_interleave(d // g, dim=2)  # (b, l, d, n)
    Cd = C.repeat_interleave(d // g, dim=2)
    h = torch.zeros(b, d, n, dtype=u.dtype) if initial_state is None else initial_state.clone()
    ys = []
    for t in range(l):
        dA = torch.exp(delta[:, t, :, None] * A)
        h = dA * h + (delta[:, t] * u[:, t])[:, :, None] * Bd[:, t]
        ys.append((h * Cd[:, t]).sum(-1))
    y = torch.stack(ys, dim=1)
    if D is not None:
        y = y + u * D
    if z is not None:
        y = y * F.silu(z)
    return y, h


def rms_norm_gated_ref(x, weight, z=None, eps=1e-5, group_size=None, norm_before_gate=True):
    """`rms_norm_ref` of mamba_ssm.ops.triton.layernorm_gated."""
    dtype = x.dtype
    x, weight = x.float(), weight.float()
    if z is not None and not norm_before_gate:
        x = x * F.silu(z.float())
    if group_size is None:
        rstd = 1 / torch.sqrt(x.square().mean(dim=-1, keepdim=True) + eps)
        out = x * rstd * weight
    else:
        xg = x.reshape(*x.shape[:-1], -1, group_size)
        rstd = 1 / torch.sqrt(xg.square().mean(dim=-1, keepdim=True) + eps)
        out = (xg * rstd).reshape(x.shape) * weight
    if z is not None and norm_before_gate:
        out = out * F.silu(z.float())
    return out.to(dtype)


def causal_conv1d_ref(x, weight, bias=None, initial_state=None):
    """x (b, l, c), weight (c, k) -> (b, l, c); initial_state (b, k-1, c) are the inputs before x."""
    b, l, c = x.shape
    k = weight.shape[1]
    prev = torch.zeros(b, k - 1, c, dtype=x.dtype) if initial_state is None else initial_state
    xs = torch.cat([prev, x], dim=1).transpose(1, 2)  # (b, c, l+k-1)
    y = F.conv1d(xs, weight.unsqueeze(1), bias, groups=c)
    return y.transpose(1, 2)
