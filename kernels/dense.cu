// Dense decode (cpu::attend_dense): attention over the kept dense entries and every candidate
// position of the sequence, dequantised from the planes, with no selection. It is the path
// below the crossover length and the library's own dense baseline. grid (dense_splits +
// dense_chunks, H_kv, B); the combine kernel of attend.cu merges the partials. Blocks
// j < dense_splits attend the kept dense entries with the split-K body of attend.cu; the others
// each take one chunk of candidate positions (dense_chunk_of).
//
// Candidate chunks on tensor cores (attend_tc.cuh) for the shapes tc_shape_ok takes: the
// chunk's warps each walk their own quarter of it in tiles of 16 positions (one page, one
// page-table lookup), with the next tile's code words in flight. Other shapes take
// attend_body's candidate chunks.
#include "attend.cu"

// The candidate chunks' shared memory (beside the kept splits' AttendSmem: a block takes one).
template <int D>
struct DenseTcSmem {
    TcSmem<D> tc;
    u32 heavy[DENSE_TC_MAX_CHUNK / 32];
};

// Candidate chunk split - dense_splits: absolute positions [c * chunk, (c + 1) * chunk) of
// [S, cand_end), heavy positions left out. Writes the split's partial.
// chunk: dense_chunk_of the row (at most DENSE_TC_MAX_CHUNK); len, slot: row_seq's.
template <int D, typename T, int BITS>
SIKV_DEV void dense_tc_chunk(const SikvParams& p, int chunk, int len, int slot, DenseTcSmem<D>& sm) {
    typedef TcShape<D, BITS> Sh;
    TcSmem<D>& s = sm.tc;
    u32* heavy = sm.heavy;
    const int b = blockIdx.z, h = blockIdx.y, split = blockIdx.x;
    const int G = p.group;
    const int tid = threadIdx.x;
    const long long hq_base = (long long)b * p.num_kv_heads * G + (long long)h * G;
    // The page table's row start does not depend on the length: in flight from the start.
    const int* pages = reinterpret_cast<const int*>(p.page_indices) + reinterpret_cast<const int*>(p.indptr)[b];
    const int end = slot < 0 ? 0 : cand_end(p, len);
    const int clo = (split - p.dense_splits) * chunk;
    const int lo = clo > p.n_sink ? clo : p.n_sink;
    const int hi = clo + chunk < end ? clo + chunk : end;
    if (lo >= hi) {  // nothing of this chunk is a candidate
        write_empty_partial<D>(p, hq_base, split);
        return;
    }
    const u8* rec = state_record(p, slot, h);
    const int* dpos = reinterpret_cast<const int*>(rec + p.off_dense_pos);
    const float* ascale = reinterpret_cast<const float*>(rec + p.off_scale);
    TcWarp<D, T, BITS> w;
    w.bind_lanes();
    w.bind_planes(p);

    // This warp's quarter of the chunk, in tiles of 16 positions aligned to 16: tile k starts
    // at wlo + 16 k, k < nt (at most 32: DENSE_TC_MAX_CHUNK / WARPS / 16).
    const int quarter = chunk / Sh::WARPS;
    const int wlo0 = clo + w.warp * quarter;
    const int whi = wlo0 + quarter < hi ? wlo0 + quarter : hi;
    const int wlo = (wlo0 > lo ? wlo0 : lo) & ~15;
    const int nt = whi > wlo ? (whi - wlo + 15) >> 4 : 0;
    static_assert(DENSE_TC_MAX_CHUNK / Sh::WARPS / 16 <= 32, "one lane per tile of a warp");

    // Tile k's first plane row, or -1 past the warp's range or on a page index outside the
    // pool (fault raised, the tile skipped): lane k looks it up, so the walk never waits on
    // the page table (a round trip per tile before).
    long long lane_row = -1;
    {
        const int base = wlo + 16 * w.lane;
        if (base < whi) {
            int pi, off;
            page_split(p, base, &pi, &off);
            const int page = pages[pi];
            if (page < 0 || page >= p.num_pages) raise_fault(p, FAULT_PAGE_INDEX);
            else lane_row = ((long long)page * p.num_kv_heads + h) * p.page_size + off;
        }
    }
    auto row_of = [&](int k) -> long long { return __shfl_sync(0xffffffffu, lane_row, k); };
    // The 16 positions' validity (bit t: position base + t): a candidate of this warp's range
    // on a good page (tile_range), and not heavy (tile_valid, once init has built the bitmap).
    // Uniform over the warp: the range as a bit interval, the heavy positions from the chunk's
    // bitmap (a tile is an aligned half word of it).
    const int vlo = lo > wlo0 ? lo : wlo0;
    auto tile_range = [&](int k, long long row0) -> u32 {
        const int base = wlo + 16 * k;
        const int a = vlo - base > 0 ? vlo - base : 0;
        const int e = whi - base < 16 ? whi - base : 16;
        if (row0 < 0 || a >= e) return 0u;
        return ((0xffffu >> (16 - e)) >> a) << a;  // bits [a, e)
    };
    auto tile_valid = [&](int k, long long row0) -> u32 {
        const int off = wlo + 16 * k - clo;  // a multiple of 16 in [0, chunk)
        return tile_range(k, row0) & ~(heavy[off >> 5] >> (off & 31));
    };
    auto build_heavy = [&](int hp0) {
        for (int i = tid; i < p.n_heavy; i += ATTEND_THREADS) {
            const int off = (i == tid ? hp0 : dpos[p.n_sink + i]) - clo;
            if (off >= 0 && off < chunk) atomicOr(&heavy[off >> 5], 1u << (off & 31));
        }
    };
    TcRaw<D, BITS> ra, rb;
    u32 va, vb;

    // The first tile's words and the heavy list are loaded before init, beside its query
    // loads, instead of one round trip after another; the heavy tokens' words are zeroed
    // once the bitmap is known.
    const long long r0 = row_of(0);
    w.load_tile(r0, nt > 0 ? tile_range(0, r0) : 0u, ra);
    const int hp0 = tid < p.n_heavy ? dpos[p.n_sink + tid] : -1;
    for (int i = tid; i < chunk / 32; i += ATTEND_THREADS) heavy[i] = 0u;
    w.init(p, s, hq_base, ascale, [&]() { build_heavy(hp0); });
    va = nt > 0 ? tile_valid(0, r0) : 0u;
    w.keep_valid(va, ra);
    // The loop alternates two register sets, so the next tile's words load into one while
    // the other is used (no copy between them).
    for (int k = 0; k < nt; k += 2) {
        const long long r1 = row_of(k + 1);
        vb = k + 1 < nt ? tile_valid(k + 1, r1) : 0u;
        if (k + 1 < nt) w.load_tile(r1, vb, rb);
        w.tile(ra, va);
        if (k + 1 >= nt) break;
        const long long r2 = row_of(k + 2);
        va = k + 2 < nt ? tile_valid(k + 2, r2) : 0u;
        if (k + 2 < nt) w.load_tile(r2, va, ra);
        w.tile(rb, vb);
    }
    w.finish(p, s, hq_base, split);
}

template <int D, typename T, int BITS>
SIKV_DEV void dense_splits_or_chunks(const SikvParams& p) {
    // A routed decode's dense launch: the route from the lengths, not from the prologue's word
    // (common.cuh route_skips).
    if (p.ws_route != 0 && p.route_as == ROUTE_DENSE && !route_dense_sum(p)) return;
    // The chunks' and the kept splits' shared memory in one place: a block takes one of them.
    constexpr size_t CHUNK_SMEM = TcShape<D>::OK ? sizeof(DenseTcSmem<D>) : 0;
    constexpr size_t ARENA = CHUNK_SMEM > sizeof(AttendSmem<D>) ? CHUNK_SMEM : sizeof(AttendSmem<D>);
    __shared__ __align__(16) u8 arena[ARENA];
    if constexpr (TcShape<D>::OK) {
        if ((int)blockIdx.x >= p.dense_splits && tc_shape_ok<D, BITS>(p)) {
            int slot;
            const int len = row_seq(p, blockIdx.z, &slot);
            const int chunk = dense_chunk_of(p, slot < 0 ? 0 : cand_end(p, len));
            if (chunk % (16 * TcShape<D>::WARPS) == 0 && chunk <= DENSE_TC_MAX_CHUNK) {
                dense_tc_chunk<D, T, BITS>(p, chunk, len, slot, *reinterpret_cast<DenseTcSmem<D>*>(arena));
                return;
            }
        }
    }
    attend_body_in<D, T, true>(p, *reinterpret_cast<AttendSmem<D>*>(arena));
}
template <int D, typename T>
SIKV_DEV void sikv_attend_dense_impl(const SikvParams& p) {
    dense_splits_or_chunks<D, T, 2>(p);
}
// Four blocks per SM (128 registers): shared memory allows four, and the candidate chunks
// need every resident warp to hide their load latency.
SIKV_ENTRIES_D_T_MINB(sikv_attend_dense, ATTEND_THREADS, 4)
// Planes of 4-bit key magnitudes and values (4+1): the launcher takes this kernel instead.
template <int D, typename T>
SIKV_DEV void sikv_attend_dense_b4_impl(const SikvParams& p) {
    dense_splits_or_chunks<D, T, 4>(p);
}
SIKV_ENTRIES_D_T_MINB(sikv_attend_dense_b4, ATTEND_THREADS, 4)
