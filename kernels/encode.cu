// Stage `encode` (append, and the prompt encode of calibrate): one warp per (token, KV head),
// d/32 consecutive channels per lane, 32/(d/32) lanes per 32-channel quantisation group
// (method §10.6 K1). Group min/max by __shfl_xor inside the group; the group leader writes the
// group's packed sign word, code words and fp16 (delta, zero) pair. Arithmetic follows
// reference/encode.rs exactly (no FMA, stored fp16 params used for the codes). K and V are
// read through sanitize<T>, k - m through centred_key, and the 16-bit stores of k' and v
// saturate at the storage type's largest finite value, as in cpu::stages (docs/DESIGN.md).
#include "common.cuh"

// Quantises CPL values of this lane (y = |x| for keys, v for values) with the group's
// stored params; returns the lane's codes packed at `bits` each (lane-local, channel order).
template <int CPL, int GL>
SIKV_DEV void quant_group(const float* y, int bits, u32* par_word, u64* packed_lo, u64* packed_hi) {
    float lo = SIKV_INF, hi = SIKV_NEG_INF;
    #pragma unroll
    for (int i = 0; i < CPL; ++i) { lo = fminf(lo, y[i]); hi = fmaxf(hi, y[i]); }
    #pragma unroll
    for (int o = GL / 2; o > 0; o >>= 1) {
        lo = fminf(lo, __shfl_xor_sync(0xffffffffu, lo, o));
        hi = fmaxf(hi, __shfl_xor_sync(0xffffffffu, hi, o));
    }
    const float levels = (float)((1 << bits) - 1);
    // Capped at the fp16 maximum like the CPU encoder: an infinite delta would decode 0 * inf.
    const u16 dh = f32_to_half_bits(fminf(div_rn(sub_rn(hi, lo), levels), 65504.0f));
    const u16 zh = f32_to_half_bits(fminf(fmaxf(lo, -65504.0f), 65504.0f));
    const float delta = half_bits_to_f32(dh), zero = half_bits_to_f32(zh);
    *par_word = (u32)dh | ((u32)zh << 16);
    // Codes of this lane at their bit offset inside the group's 32 * bits stream.
    int lane = threadIdx.x & 31;
    int c0 = (lane % GL) * CPL;  // first channel of this lane inside the group
    u64 lo_w = 0, hi_w = 0;
    #pragma unroll
    for (int i = 0; i < CPL; ++i) {
        u32 code = 0;
        if (delta > 0.0f) {
            float c = floorf(add_rn(div_rn(sub_rn(y[i], zero), delta), 0.5f));
            c = fminf(fmaxf(c, 0.0f), levels);  // NaN -> 0 (fmaxf drops NaN), as `as u32` does
            code = (u32)c;
        }
        int bit = (c0 + i) * bits;
        if (bit < 64) lo_w |= (u64)code << bit;
        else hi_w |= (u64)code << (bit - 64);
    }
    // OR the lanes' disjoint bit fields together across the group.
    #pragma unroll
    for (int o = GL / 2; o > 0; o >>= 1) {
        lo_w |= __shfl_xor_sync(0xffffffffu, lo_w, o);
        hi_w |= __shfl_xor_sync(0xffffffffu, hi_w, o);
    }
    *packed_lo = lo_w;
    *packed_hi = hi_w;
}

// Should the dense entry `e` written by token t (of sequence `slot`) survive this call, i.e.
// does no later token of the call write the same entry of the same sequence? (cpu::append
// processes tokens in order, so the last writer wins.) Warp-cooperative scan.
SIKV_DEV int append_dense_entry(const SikvParams& p, int pos) {
    if (pos < p.n_sink) return pos;
    if (p.n_window > 0) return p.n_sink + p.n_heavy + pos % p.n_window;
    return -1;
}

SIKV_DEV bool last_writer(const SikvParams& p, int t, int slot, int e) {
    const int* slots = reinterpret_cast<const int*>(p.seq_slot);
    const int* positions = reinterpret_cast<const int*>(p.position);
    int lane = threadIdx.x & 31;
    bool later = false;
    for (int u = t + 1 + lane; u < p.n_tokens; u += 32) {
        int pu = positions[u];
        if (slots[u] == slot && pu >= 0 && pu < p.max_seq_len && append_dense_entry(p, pu) == e) later = true;
    }
    return __ballot_sync(0xffffffffu, later) == 0;
}

template <int D, typename T>
SIKV_DEV void sikv_encode_impl(const SikvParams& p) {
    typedef typename Storage<T>::type S;
    constexpr int CPL = D / 32;   // channels per lane
    constexpr int GL = 32 / CPL;  // lanes per 32-channel group
    const int lane = threadIdx.x & 31;
    const long long gw = (long long)blockIdx.x * (blockDim.x / 32) + (threadIdx.x >> 5);
    const int H = p.num_kv_heads;
    if (gw >= (long long)p.n_tokens * H) return;  // whole warp exits together
    const int t = (int)(gw / H), h = (int)(gw % H);

    const bool calib = p.mode == 1;
    const long long sm = reinterpret_cast<const long long*>(p.slot_mapping)[t];
    const long long page_slots = (long long)p.num_pages * p.page_size;
    int slot, pos;
    if (calib) {
        slot = p.calib_slot;
        pos = t;
    } else {
        slot = reinterpret_cast<const int*>(p.seq_slot)[t];
        pos = reinterpret_cast<const int*>(p.position)[t];
    }
    // The host cannot read these arrays: a token the CPU would reject is skipped whole (pages
    // and dense set) and reported; sm < 0 is padding (no page write) and no fault. Uniform per
    // warp (one token per warp), so the whole warp leaves together.
    {
        u32 fault = 0;
        if (!calib && (slot < 0 || slot >= p.max_seqs)) fault |= FAULT_SEQ_SLOT;
        if (!calib && (pos < 0 || pos >= p.max_seq_len)) fault |= FAULT_POSITION;
        if (sm >= page_slots) fault |= FAULT_SLOT_MAPPING;
        if (fault) {
            if (lane == 0 && h == 0) raise_fault(p, fault);
            return;
        }
    }
    u8* rec = state_record(p, slot, h);
    const float* centre = reinterpret_cast<const float*>(rec + p.off_centre);
    const float* inv_scale = reinterpret_cast<const float*>(rec + p.off_inv_scale);

    const int c0 = lane * CPL;
    float kk[CPL], vv[CPL], m[CPL], r[CPL];
    const long long src = ((long long)t * H + h) * D + c0;
    load_vec<T, CPL>(reinterpret_cast<const T*>(p.k) + src, kk);
    load_vec<T, CPL>(reinterpret_cast<const T*>(p.v) + src, vv);
    load_vec<float, CPL>(centre + c0, m);
    load_vec<float, CPL>(inv_scale + c0, r);

    // kp / vv: what the quantisers see; kst / vst: the same saturated for a 16-bit store.
    float kp[CPL], kst[CPL], vst[CPL], x[CPL], ax[CPL];
    u32 sign_bits = 0;
    #pragma unroll
    for (int i = 0; i < CPL; ++i) {
        kk[i] = sanitize<T>(kk[i]);
        vv[i] = sanitize<T>(vv[i]);
        kp[i] = centred_key(kk[i], m[i]);
        kst[i] = clamp_finite(kp[i], finite_max<S>());
        vst[i] = clamp_finite(vv[i], finite_max<S>());
        x[i] = mul_rn(kp[i], r[i]);
        ax[i] = fabsf(x[i]);
        bool s = p.sign_positive ? (x[i] > 0.0f) : !sign_negative(x[i]);
        sign_bits |= (s ? 1u : 0u) << ((c0 % 32) + i);
    }
    #pragma unroll
    for (int o = GL / 2; o > 0; o >>= 1) sign_bits |= __shfl_xor_sync(0xffffffffu, sign_bits, o);

    const int g = c0 / 32;
    const bool leader = (lane % GL) == 0;
    const bool write_page = sm >= 0;
    long long row = 0;
    if (write_page) {
        long long page = sm / p.page_size, s = sm % p.page_size;
        row = (page * H + h) * p.page_size + s;
    }

    // Keys.
    if (p.key_bits == 16) {
        if (write_page) store_vec<S, CPL>(reinterpret_cast<S*>(plane_row_mut(p, SIKV_PLANE_KFULL, row)) + c0, kst);
    } else {
        u32 par;
        u64 lo_w, hi_w;
        quant_group<CPL, GL>(ax, p.key_bits, &par, &lo_w, &hi_w);
        if (write_page && leader) {
            u8* kmag = plane_row_mut(p, SIKV_PLANE_KMAG, row);
            if (p.key_bits == 2) {
                reinterpret_cast<u64*>(kmag)[g] = lo_w;
            } else {
                reinterpret_cast<u64*>(kmag)[2 * g] = lo_w;
                reinterpret_cast<u64*>(kmag)[2 * g + 1] = hi_w;
            }
            reinterpret_cast<u32*>(plane_row_mut(p, SIKV_PLANE_KPAR, row))[g] = par;
        }
    }
    if (write_page && leader) reinterpret_cast<u32*>(plane_row_mut(p, SIKV_PLANE_SIGN, row))[g] = sign_bits;

    // Values.
    if (p.value_bits == 16) {
        if (write_page) store_vec<S, CPL>(reinterpret_cast<S*>(plane_row_mut(p, SIKV_PLANE_VFULL, row)) + c0, vst);
    } else {
        u32 par;
        u64 lo_w, hi_w;
        quant_group<CPL, GL>(vv, p.value_bits, &par, &lo_w, &hi_w);
        if (write_page && leader) {
            u8* vc = plane_row_mut(p, SIKV_PLANE_VCODE, row);
            if (p.value_bits == 2) {
                reinterpret_cast<u64*>(vc)[g] = lo_w;
            } else {
                reinterpret_cast<u64*>(vc)[2 * g] = lo_w;
                reinterpret_cast<u64*>(vc)[2 * g + 1] = hi_w;
            }
            reinterpret_cast<u32*>(plane_row_mut(p, SIKV_PLANE_VPAR, row))[g] = par;
        }
    }

    // Dense set: sinks, the window ring, and (calibrate) the heavy tokens.
    int e = -1;
    if (calib) {
        int rank = reinterpret_cast<const int*>(p.ws_rank)[(long long)h * p.n_tokens + t];
        int win_lo = p.n_tokens - p.n_window;
        if (win_lo < p.n_sink) win_lo = p.n_sink;
        if (pos < p.n_sink) e = pos;
        else if (rank >= 0) e = p.n_sink + rank;
        else if (p.n_window > 0 && pos >= win_lo) e = p.n_sink + p.n_heavy + pos % p.n_window;
    } else {
        e = append_dense_entry(p, pos);
        if (e >= 0 && !last_writer(p, t, slot, e)) e = -1;
    }
    if (e >= 0 && e < p.dense_cap) {
        S* dk = reinterpret_cast<S*>(rec + p.off_dense_k) + (long long)e * D + c0;
        S* dv = reinterpret_cast<S*>(rec + p.off_dense_v) + (long long)e * D + c0;
        store_vec<S, CPL>(dk, kst);
        store_vec<S, CPL>(dv, vst);
        if (lane == 0) state_dense_pos(p, rec)[e] = pos;
    }
}

SIKV_ENTRIES_D_T(sikv_encode, ENCODE_THREADS)

// NVRTC has no offsetof builtin; the null-pointer form is what it accepts.
#define SIKV_OFFSETOF(T, f) ((int)(unsigned long long)(&(((T*)0)->f)))

// Layout probe of SikvParams, so a test can check that src/gpu/params.rs mirrors it:
// out[0] = sizeof, then the offsets of a few fields spread over the struct.
extern "C" __global__ void sikv_params_layout(int* out) {
    out[0] = (int)sizeof(SikvParams);
    out[1] = SIKV_OFFSETOF(SikvParams, ws_rank);
    out[2] = SIKV_OFFSETOF(SikvParams, row_bytes);
    out[3] = SIKV_OFFSETOF(SikvParams, off_dense_v);
    out[4] = SIKV_OFFSETOF(SikvParams, budget_ratio);
    out[5] = SIKV_OFFSETOF(SikvParams, softmax_scale);
    out[6] = SIKV_OFFSETOF(SikvParams, dense_chunks);
}
