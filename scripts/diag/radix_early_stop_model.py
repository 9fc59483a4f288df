#!/usr/bin/env python3
"""A model of the one-CTA radix select's passes (kernels/common.cuh block_radix_passes,
collect_tile; kernels/topk.cu final_select), to check that stopping once the picked bin is taken
whole selects the same set as the full passes: the k best keys, ties to the smaller index.

Not the kernel: one histogram per pass, no threads. It models the selection state (prefix,
mask, remaining, the picked bin's count), the ordered collection under a partial mask, and the
final select's case (candidates of the threshold bin only, in any order, with padding lanes of
key 0 and position 0 past the count). Key sets: random 32-bit keys, a few repeated values
(ties, zeros), small integers (everything in bin 0; below 1024, with every candidate taken,
the partial-mask threshold is 0, as the padding lanes' key) and keys inside one bin. Prints
the mismatches of each part (0 expected). Usage: radix_early_stop_model.py [seed]
"""
import random
import sys

SHIFTS = [21, 10, 0]
BIN_MASKS = [2047, 2047, 1023]


def passes(keys, k, first_pass=0, prefix=0, mask=0, remaining=None, early=True):
    """The selection state after the passes: (prefix, mask, remaining)."""
    rem = k if remaining is None else remaining
    for p in range(first_pass, 3):
        shift, bm = SHIFTS[p], BIN_MASKS[p]
        hist = [0] * (bm + 1)
        for key in keys:
            if key & mask == prefix:
                hist[(key >> shift) & bm] += 1
        above = 0
        for b in range(bm, -1, -1):
            if above + hist[b] >= rem:
                prefix |= b << shift
                mask |= bm << shift
                rem -= above
                count = hist[b]
                break
            above += hist[b]
        else:
            raise AssertionError("no bin holds the remaining-th key")
        if early and rem == count:
            break
    return prefix, mask, rem


def collect(keys, prefix, mask, rem):
    """Indices taken, in ascending order (collect_tile)."""
    out, eq = [], 0
    for i, key in enumerate(keys):
        km = key & mask
        if km > prefix:
            out.append(i)
        elif km == prefix:
            if eq < rem:
                out.append(i)
            eq += 1
    return out


def reference(keys, k):
    return sorted(sorted(range(len(keys)), key=lambda i: (-keys[i], i))[:k])


def key_set(rng, kind, n):
    if kind == 0:
        return [rng.getrandbits(32) for _ in range(n)]
    if kind == 1:
        vals = [0, 1, 2, 3, 1 << 21, (1 << 21) + 5, 0x80000000, 0x80000001]
        return [rng.choice(vals) for _ in range(n)]
    if kind == 2:
        return [rng.randint(1, 4000) for _ in range(n)]
    if kind == 3:
        return [0x40000000 + rng.randint(0, 1 << 12) for _ in range(n)]
    return [rng.randint(1, 1023) for _ in range(n)]


def main():
    rng = random.Random(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
    bad_block = stops = 0
    for trial in range(3000):
        keys = key_set(rng, trial % 5, rng.randint(2, 3000))
        nonzero = sum(1 for x in keys if x)
        if nonzero == 0:
            continue
        k = rng.randint(1, nonzero)
        if k >= len(keys):
            continue
        state = passes(keys, k)
        stops += state[1] != 0xFFFFFFFF
        got = collect(keys, *state)
        if got != reference(keys, k) or got != collect(keys, *passes(keys, k, early=False)):
            bad_block += 1
    bad_final = 0
    for trial in range(3000):
        n = rng.randint(50, 4000)
        keys = key_set(rng, trial % 5, n)
        if trial % 5 == 1:
            keys = [x | 1 for x in keys]  # candidates are non-zero keys
        # Every candidate taken (k = n) now and then: the passes then stop at once, on the
        # lowest bins, where small keys leave a threshold of 0 under the mask.
        k = n if rng.random() < 0.2 else rng.randint(1, n - 1)
        hist = [0] * 2048
        for x in keys:
            hist[x >> 21] += 1
        above = 0
        for t in range(2047, -1, -1):
            if above + hist[t] >= k:
                break
            above += hist[t]
        # Positions from S = 4 on (the sinks are never candidates): position 0 is only ever a
        # padding lane's.
        cand = [(x, i + 4) for i, x in enumerate(keys) if x >> 21 == t]
        rng.shuffle(cand)  # the compaction's order never matters
        prefix, mask, rem = passes([c[0] for c in cand], k, 1, t << 21, 2047 << 21, k - above)
        lanes = cand + [(0, 0)] * 7  # padding past the count: skipped by index, not by key
        taken = {i + 4 for i, x in enumerate(keys) if x >> 21 > t}
        equal = []
        for lane, (x, i) in enumerate(lanes):
            if lane >= len(cand):
                continue
            if x & mask > prefix:
                taken.add(i)
            elif x & mask == prefix:
                equal.append(i)
        taken |= set(sorted(equal)[:rem])
        if sorted(taken) != [i + 4 for i in reference(keys, k)]:
            bad_final += 1
    print(f"block select: {bad_block} mismatches ({stops} selections stopped early)")
    print(f"final select: {bad_final} mismatches")


if __name__ == "__main__":
    main()
