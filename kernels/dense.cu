// Dense decode (cpu::attend_dense): attention over the kept dense entries and every candidate
// position of the sequence, dequantised from the planes, with no selection. It is the path
// below the crossover length and the library's own dense baseline. Same split-K body as the
// sparse attend (attend.cu); grid (dense_splits + ceil(max_seq_len / dense_chunk), H_kv, B);
// the combine kernel of attend.cu merges the partials.
#include "attend.cu"

template <int D, typename T>
SIKV_DEV void sikv_attend_dense_impl(const SikvParams& p) { attend_body<D, T, true>(p); }
SIKV_ENTRIES_D_T(sikv_attend_dense, ATTEND_THREADS)
