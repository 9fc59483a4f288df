#!/usr/bin/env python3
"""Shared-memory bank conflicts of the tensor-core tiles' staging (kernels/attend_tc.cuh,
TcSmem::col): for each warp-wide access of init (lane (g, j) reads Q' of head g at its key
channels) and of finish (lane (g, j) writes heads 2j, 2j+1 at its value channels), the worst
number of distinct addresses that meet in one bank, with channels unrotated and rotated. Also
checks that the rotation is a bijection of each head's row and that row-order accesses (init's
staging writes, finish's merge reads) stay conflict-free. Mirrors the kernel's formula: change
both together."""
import sys


def col(d, hh, c):
    r = (c >> 5) + (d // 32) * (hh >> 1) + (d // 8) * (hh & 1)
    return (c & ~31) | ((c + r) & 31)


def init_reads(d, bits):
    kch, cpw = d // 4, 32 // bits
    ppw = cpw // 2
    for pp in range(2 * (d // 16)):
        for hi in (0, 1):
            yield [(g, kch * j + cpw * (pp // ppw) + pp % ppw + hi * ppw) for g in range(8) for j in range(4)]


def finish_writes(d):
    vch, mb_n = d // 8, d // 16
    for mb in range(mb_n):
        for e in (0, 1):
            for hi in (0, 1):
                yield [(2 * j + e, vch * g + mb + hi * mb_n) for g in range(8) for j in range(4)]


def ways(d, accesses, place):
    worst = 1
    for lanes in accesses:
        banks = {}
        for hh, c in lanes:
            a = hh * d + place(hh, c)
            banks.setdefault(a % 32, set()).add(a)
        worst = max(worst, max(len(s) for s in banks.values()))
    return worst


def main():
    ok = True
    for d in (64, 128):
        rot = lambda hh, c, d=d: col(d, hh, c)
        plain = lambda hh, c: c
        for hh in range(8):
            row = [rot(hh, c) for c in range(d)]
            if sorted(row) != list(range(d)):
                print(f"d {d} head {hh}: the rotation is not a bijection")
                ok = False
            for s in range(0, d, 32):
                if len({(hh * d + row[c]) % 32 for c in range(s, s + 32)}) != 32:
                    print(f"d {d} head {hh}: row-order access conflicts")
                    ok = False
        for bits in (2, 4):
            w0, w1 = ways(d, init_reads(d, bits), plain), ways(d, init_reads(d, bits), rot)
            print(f"d {d} bits {bits}: init reads {w0}-way unrotated, {w1}-way rotated")
            ok &= w1 == 1
        w0, w1 = ways(d, finish_writes(d), plain), ways(d, finish_writes(d), rot)
        print(f"d {d}: finish writes {w0}-way unrotated, {w1}-way rotated")
        ok &= w1 == 1
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
