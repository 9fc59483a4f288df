#!/usr/bin/env python3
"""A model of the stage-1 final select's bitmap windows (kernels/topk.cu final_select) when
PARTS CTAs of a cluster share a row, to check that their outputs, each CTA storing its own
part, are the one-CTA output: every position of the gt bitmap or of a candidate above the
threshold, then the first `remaining` candidates equal to it in position order, ascending.

Not the kernel's timing, its arithmetic: per window of BM_WORDS words, CTA c takes words
[c CW, (c + 1) CW), WPT words a thread; the marks, the per-thread counts and block scans, the
parts' exchanged counts (bg, be before the part; ag, ae in the window), the take of equal keys,
each word's first output index and the staged emission in rounds of EMIT_STAGE outputs. NT (the
threads of a CTA) is a parameter so that small rows exercise several windows and rounds.
Prints the mismatching cases (none expected). Usage: final_select_parts_model.py [seed]
"""
import random
import sys


def popc(x):
    return bin(x).count("1")


def low_set_bits(x, n):
    """The n lowest set bits of x (kernels/topk.cu low_set_bits)."""
    out = 0
    while x and n:
        b = x & -x
        out |= b
        x ^= b
        n -= 1
    return out


def expected(gt_pos, eq_pos, remaining):
    return sorted(set(gt_pos) | set(sorted(eq_pos)[:remaining]))


def model(nt, parts, w0, w1, gtmap, cand_gt, cand_eq, remaining):
    """The output list the CTAs store, as final_select<parts> writes it."""
    bm_words = nt * 4
    emit_stage = 2 * bm_words
    cw = bm_words // parts
    wpt = cw // nt
    out = {}
    carry_gt = carry_eq = 0
    wb = w0
    while wb < w1:
        we = min(wb + bm_words, w1)
        per_cta = []
        for c in range(parts):
            pb = wb + c * cw
            pe = min(pb + cw, we)
            bm_gt = [0] * cw
            bm_eq = [0] * cw
            for pos in cand_gt:
                w = pos >> 5
                if pb <= w < pe:
                    bm_gt[w - pb] |= 1 << (pos & 31)
            for pos in cand_eq:
                w = pos >> 5
                if pb <= w < pe:
                    bm_eq[w - pb] |= 1 << (pos & 31)
            g = [[0] * 4 for _ in range(nt)]
            e = [[0] * 4 for _ in range(nt)]
            for t in range(nt):
                for j in range(4):
                    lw = t * wpt + j
                    if j < wpt and pb + lw < pe:
                        g[t][j] = bm_gt[lw] | gtmap.get(pb + lw, 0)
                        e[t][j] = bm_eq[lw]
            ngt = [sum(popc(x) for x in g[t]) for t in range(nt)]
            neq = [sum(popc(x) for x in e[t]) for t in range(nt)]
            xg = [sum(ngt[:t]) for t in range(nt)]
            xe = [sum(neq[:t]) for t in range(nt)]
            per_cta.append((pb, g, e, xg, xe, sum(ngt), sum(neq)))
        ag = sum(x[5] for x in per_cta)
        ae = sum(x[6] for x in per_cta)
        for c, (pb, g, e, xg, xe, tg, te) in enumerate(per_cta):
            bg = sum(x[5] for x in per_cta[:c])
            be = sum(x[6] for x in per_cta[:c])
            part_gt, part_eq = carry_gt + bg, carry_eq + be
            sel = [[0] * 4 for _ in range(nt)]
            at = [[0] * 4 for _ in range(nt)]
            for t in range(nt):
                gt_before, eq_before = part_gt + xg[t], part_eq + xe[t]
                for j in range(4):
                    ne = popc(e[t][j])
                    take = min(remaining - eq_before, ne) if eq_before < remaining else 0
                    at[t][j] = gt_before + min(eq_before, remaining)
                    sel[t][j] = g[t][j] | low_set_bits(e[t][j], take)
                    gt_before += popc(g[t][j])
                    eq_before += ne
            o0 = part_gt + min(part_eq, remaining)
            o1 = part_gt + tg + min(part_eq + te, remaining)
            ob = o0
            while ob < o1:
                stage = {}
                for t in range(nt):
                    for j in range(4):
                        pos0 = (pb + t * wpt + j) << 5
                        x = sel[t][j]
                        i = (at[t][j] - ob) % (1 << 32)
                        while x:
                            bit = (x & -x).bit_length() - 1
                            x &= x - 1
                            if i < emit_stage:
                                stage[i] = pos0 + bit
                            i = (i + 1) % (1 << 32)  # u32: a word begun below ob wraps into it
                n_out = min(o1 - ob, emit_stage)
                for i in range(n_out):
                    assert ob + i not in out, f"output {ob + i} stored twice"
                    out[ob + i] = stage[i]
                ob += emit_stage
        carry_gt += ag
        carry_eq += ae
        wb += bm_words
    n = len(out)
    assert sorted(out) == list(range(n)), "outputs with gaps"
    return [out[i] for i in range(n)]


def case(rng, nt, parts, positions, s_sink):
    w0, w1 = s_sink >> 5, (positions + 31) >> 5
    gt_pos, eq_pos, gtmap = set(), set(), {}
    cand_gt, cand_eq = [], []
    for pos in range(s_sink, positions):
        r = rng.random()
        if r < 0.05:  # a bin above t: the compaction's bitmap
            gtmap[pos >> 5] = gtmap.get(pos >> 5, 0) | (1 << (pos & 31))
            gt_pos.add(pos)
        elif r < 0.07:  # bin t, above the threshold
            cand_gt.append(pos)
            gt_pos.add(pos)
        elif r < 0.09:  # bin t, equal to it
            cand_eq.append(pos)
            eq_pos.add(pos)
    rng.shuffle(cand_gt)
    rng.shuffle(cand_eq)
    remaining = rng.randint(0, len(eq_pos))
    want = expected(gt_pos, eq_pos, remaining)
    got = model(nt, parts, w0, w1, gtmap, cand_gt, cand_eq, remaining)
    return got == want


def main():
    rng = random.Random(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
    bad = 0
    runs = 0
    for nt in (8, 32):
        window = nt * 4 * 32  # positions of a window
        for parts in (1, 2, 4):
            for positions in (1, 100, window - 1, window, window + 33, 3 * window + 7, 5 * window):
                for s_sink in (0, 4, 64):
                    if s_sink >= positions:
                        continue
                    runs += 1
                    if not case(rng, nt, parts, positions, s_sink):
                        bad += 1
                        print(f"mismatch: nt {nt} parts {parts} positions {positions} sink {s_sink}")
    # The kernel's width, one row of two windows.
    for parts in (1, 2, 4):
        runs += 1
        if not case(rng, 1024, parts, 139000, 4):
            bad += 1
            print(f"mismatch: nt 1024 parts {parts} positions 139000")
    print(f"{runs} cases, {bad} mismatches")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
