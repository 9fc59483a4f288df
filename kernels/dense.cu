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

// Candidate chunk split - dense_splits: absolute positions [c * chunk, (c + 1) * chunk) of
// [S, cand_end), heavy positions left out. Writes the split's partial.
// chunk: dense_chunk_of the row (at most DENSE_TC_MAX_CHUNK); len, slot: row_seq's.
template <int D, typename T, int BITS>
SIKV_DEV void dense_tc_chunk(const SikvParams& p, int chunk, int len, int slot) {
    typedef TcShape<D, BITS> Sh;
    __shared__ TcSmem<D> s;
    __shared__ u32 heavy[DENSE_TC_MAX_CHUNK / 32];
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

    // This warp's quarter of the chunk, in tiles of 16 positions aligned to 16.
    const int quarter = chunk / Sh::WARPS;
    const int wlo0 = clo + w.warp * quarter;
    const int whi = wlo0 + quarter < hi ? wlo0 + quarter : hi;
    const int wlo = (wlo0 > lo ? wlo0 : lo) & ~15;

    // Page of a tile (16 positions inside one page): its first plane row, or -1 past the
    // warp's range or on a page index outside the pool (fault raised, the tile skipped).
    auto tile_row = [&](int base) -> long long {
        if (base >= whi) return -1;
        int pi, off;
        page_split(p, base, &pi, &off);
        const int page = pages[pi];
        if (page < 0 || page >= p.num_pages) {
            raise_fault(p, FAULT_PAGE_INDEX);
            return -1;
        }
        return ((long long)page * p.num_kv_heads + h) * p.page_size + off;
    };
    // The 16 positions' validity (bit t: position base + t): a candidate of this warp's range
    // on a good page (tile_range), and not heavy (tile_valid, once init has built the bitmap).
    // Uniform over the warp: the range as a bit interval, the heavy positions from the chunk's
    // bitmap (a tile is an aligned half word of it).
    const int vlo = lo > wlo0 ? lo : wlo0;
    auto tile_range = [&](int base, long long row0) -> u32 {
        const int a = vlo - base > 0 ? vlo - base : 0;
        const int e = whi - base < 16 ? whi - base : 16;
        if (row0 < 0 || a >= e) return 0u;
        return ((0xffffu >> (16 - e)) >> a) << a;  // bits [a, e)
    };
    auto tile_valid = [&](int base, long long row0) -> u32 {
        const int off = base - clo;  // a multiple of 16 in [0, chunk)
        return tile_range(base, row0) & ~(heavy[off >> 5] >> (off & 31));
    };

    // The first tile's words and the heavy list are loaded before init, beside its query
    // loads, instead of one round trip after another (the page table's, the heavy list's, the
    // tile's); the heavy tokens' words are zeroed once the bitmap is known.
    auto load = [&](long long row0, u32 valid, TcRaw<D, BITS>& r) { w.load_tile(row0, valid, r); };
    TcRaw<D, BITS> ra, rb;
    const long long r0 = tile_row(wlo);
    load(r0, tile_range(wlo, r0), ra);
    const int hp0 = tid < p.n_heavy ? dpos[p.n_sink + tid] : -1;

    // Heavy positions of the chunk -> bitmap (zeroed before init's first barrier, set between
    // its two).
    for (int i = tid; i < chunk / 32; i += ATTEND_THREADS) heavy[i] = 0u;
    w.init(p, s, hq_base, ascale, [&]() {
        for (int i = tid; i < p.n_heavy; i += ATTEND_THREADS) {
            const int off = (i == tid ? hp0 : dpos[p.n_sink + i]) - clo;
            if (off >= 0 && off < chunk) atomicOr(&heavy[off >> 5], 1u << (off & 31));
        }
    });
    u32 va = tile_valid(wlo, r0), vb = 0u;
    w.keep_valid(va, ra);
    // The loop alternates two register sets, so the next tile's words load into one while the
    // other is used (no copy between them).
    for (int base = wlo; base < whi; base += 32) {
        const long long r1 = tile_row(base + 16);
        vb = base + 16 < whi ? tile_valid(base + 16, r1) : 0u;
        if (base + 16 < whi) load(r1, vb, rb);
        w.tile(ra, va);
        if (base + 16 >= whi) break;
        const long long r2 = tile_row(base + 32);
        va = base + 32 < whi ? tile_valid(base + 32, r2) : 0u;
        if (base + 32 < whi) load(r2, va, ra);
        w.tile(rb, vb);
    }
    w.finish(p, s, hq_base, split);
}

template <int D, typename T, int BITS>
SIKV_DEV void dense_splits_or_chunks(const SikvParams& p) {
    // A routed decode's dense launch: the route from the lengths, not from the prologue's word
    // (common.cuh route_skips).
    if (p.ws_route != 0 && p.route_as == ROUTE_DENSE && !route_dense_sum(p)) return;
    if constexpr (TcShape<D>::OK) {
        if ((int)blockIdx.x >= p.dense_splits && tc_shape_ok<D, BITS>(p)) {
            int slot;
            const int len = row_seq(p, blockIdx.z, &slot);
            const int chunk = dense_chunk_of(p, slot < 0 ? 0 : cand_end(p, len));
            if (chunk % (16 * TcShape<D>::WARPS) == 0 && chunk <= DENSE_TC_MAX_CHUNK) {
                dense_tc_chunk<D, T, BITS>(p, chunk, len, slot);
                return;
            }
        }
    }
    attend_body<D, T, true>(p);
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
