#!/usr/bin/env python3
"""A numpy model of the tensor-core tiles' f16 roundings in the dense decode, against exact
attention over the same quantised keys and values (docs/RELIABILITY.md §13).

Not the kernel: it rounds what the tiles round (each key magnitude code * delta + zero once to
f16, Q' to f16 after a power-of-two scale, the softmax weights and the values to f16) and keeps
the rest exact. The data follow the GPU decode tests' activations (normal, per-channel key
offsets of 0.7 sigma, one value in 97 six times larger); the per-channel scale is a stand-in.
Prints, per (head_dim, group, bits), the worst and median error of a row relative to its
largest output over 40 random contexts of 2049 tokens. Usage: dense_tile_f16_model.py [seed]
(needs numpy).
"""
import numpy as np, sys
rng = np.random.default_rng(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
f16 = lambda x: np.asarray(x, np.float64).astype(np.float16).astype(np.float64)

def acts(shape, off=None):
    x = rng.standard_normal(shape)
    if off is not None: x = x + off
    out = rng.integers(0, 97, shape) == 0
    return np.where(out, x * 6.0, x)

def quant(y, bits, G=32):
    lv = (1 << bits) - 1
    T, D = y.shape
    yg = y.reshape(T, D // G, G)
    lo, hi = yg.min(-1, keepdims=True), yg.max(-1, keepdims=True)
    delta = f16(np.minimum((hi - lo).astype(np.float32) / lv, 65504))
    zero = f16(np.clip(lo, -65504, 65504))
    with np.errstate(divide='ignore', invalid='ignore'):
        code = np.where(delta > 0, np.clip(np.floor((yg - zero) / delta + 0.5), 0, lv), 0)
    return code, delta, zero  # exact value: code * delta + zero

def trial(d, G, bits, T):
    off = rng.standard_normal(d) * 0.7
    prompt = acts((512, d), off)
    centre = np.median(prompt, 0)
    k = acts((T, d), off); v = acts((T, d)); q = acts((G, d))
    kp = k - centre
    a = np.sqrt(np.mean(np.abs(prompt - centre), 0)) + 1e-3  # a stand-in per-channel scale
    x = kp / a
    c, dl, z = quant(np.abs(x), bits); s = np.where(x >= 0, 1.0, -1.0).reshape(T, d // 32, 32)
    kref = (s * (c * dl + z)).reshape(T, d)          # exact, times a below
    kemu = (s * f16(c * dl + z)).reshape(T, d)       # one f16 rounding (fma)
    cv, dv, zv = quant(v, bits)
    vref = (cv * dv + zv).reshape(T, d); vemu = f16(cv * dv + zv).reshape(T, d)
    ss = 1 / np.sqrt(d); L2E = 1.4426950408889634
    qa = q * a * ss * L2E                              # log2 units
    e2 = int(np.floor(np.log2(np.abs(qa).max()))) - 13
    qh = f16(qa * 2.0 ** -e2)
    Sref = qa @ kref.T                                 # [G, T]
    Semu = (qh @ kemu.T) * 2.0 ** e2
    def out(S, V, round_p):
        p = np.exp2(S - S.max(1, keepdims=True))
        if round_p: p = f16(p)
        return (p @ V) / p.sum(1, keepdims=True)
    oref, oemu = out(Sref, vref, False), out(Semu, vemu, True)
    err = np.abs(oemu - oref).max(1) / np.abs(oref).max(1)
    return err.max(), (Sref.max(1) - Sref.min(1)).max()

for d, G, bits in [(64, 7, 4), (64, 7, 2), (64, 1, 4), (128, 7, 4), (128, 4, 4), (64, 4, 2)]:
    errs = [trial(d, G, bits, 2049) for _ in range(40)]
    e = np.array([x[0] for x in errs]); span = np.array([x[1] for x in errs])
    print(f"d {d} G {G} bits {bits}: worst rel err {e.max():.2e}, median {np.median(e):.2e}, >1%: {(e > 0.01).mean():.2f}; logit span (log2) median {np.median(span):.1f}")
