// Attention over tiles of 16 tokens on tensor cores (mma.sync m16n8k16, f16 operands, f32
// accumulation), for the dense decode's candidate chunks (dense.cu) and the sparse attend's
// splits of selected tokens (attend.cu), when the planes hold key magnitudes and values of the
// same width, 2 or 4 bits (profiles 2+1 and 4+1; each width has kernels of its own, so the
// wider tiles' registers do not cost the 2-bit code), d is 64 or 128, a KV head has at most 8
// query heads and pages hold a multiple of 16 tokens (tc_shape_ok). Per tile of 16 tokens, in
// one warp:
//   S^T = K Q'^T (M = the 16 tokens, N = the G heads, K = 16 channels), Q' = q * a *
//        softmax_scale * log2(e), scaled by a power of two into f16 range; K = the signed
//        magnitudes s * (code * delta + zero) made in f16x2 straight from the code words;
//   O^T += V^T P^T (M = 16 channels, N = the heads, K = the 16 tokens): P^T is the softmax of
//        S^T, its two 8x8 blocks transposed across the warp (movmatrix), V = code * delta + zero.
// Channels are permuted freely inside a dot product, so each thread's operands come from a
// few contiguous code words: tid-in-group j holds key channels [j d/4, (j+1) d/4), group g
// value channels [g d/8, (g+1) d/8). A 32-bit word of codes pairs its channels i and
// i + (channels per word) / 2, one in each f16 half, so a pair takes one shift and one mask at
// either width. f16 operands with f32 accumulation keep the output within ~1e-3 of the f32
// reference.
#pragma once
#include "common.cuh"

// BITS: the code width of key magnitudes and of values (2 or 4).
template <int D, int BITS = 2>
struct TcShape {
    static constexpr bool OK = D == 64 || D == 128;
    static constexpr int KCH = D / 4;             // key channels of one thread (tid-in-group j)
    static constexpr int CPW = 32 / BITS;         // channels per 32-bit code word
    static constexpr int PPW = CPW / 2;           // f16 pairs per code word: channels i, i + PPW
    static constexpr int KW = KCH / CPW;          // key code words per token and thread
    static constexpr int KB = D / 16;             // k-blocks of S^T = K Q'^T
    static constexpr int MB = D / 16;             // m-blocks (16 channels) of O^T
    static constexpr int VCH = D / 8;             // value channels of one thread (group g)
    static constexpr int VH = VCH * BITS / 16;    // 16-bit halves of a value token's codes
    static constexpr int VW = VH > 1 ? VH / 2 : 1; // 32-bit words holding them
    static constexpr int WARPS = ATTEND_THREADS / 32;
    static constexpr int GMAX = 8;      // heads in the N = 8 columns of S^T and O^T
    // Row bytes of the planes (layout.rs).
    static constexpr int RB_SIGN = D / 8, RB_KMAG = D * BITS / 8, RB_VCODE = D * BITS / 8;
    static constexpr int RB_KPAR = D / QUANT_GROUP * PAR_BYTES_PER_GROUP, RB_VPAR = RB_KPAR;
    static constexpr int DS = OK ? D : 1;  // smem extent (nothing for the shapes it does not take)
    static constexpr u32 CODE_MASK = BITS == 2 ? 0x00030003u : 0x000F000Fu;
};

SIKV_DEV u32 h2_sub(u32 a, u32 b) {
    u32 d;
    asm("sub.rn.f16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
    return d;
}
SIKV_DEV u32 h2_fma(u32 a, u32 b, u32 c) {
    u32 d;
    asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
}
// (lo, hi) -> f16x2, lo in the low half.
SIKV_DEV u32 h2_pack(float lo, float hi) {
    u32 d;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo));
    return d;
}
SIKV_DEV float h_lo(u32 x) { return half_bits_to_f32((u16)(x & 0xffffu)); }
SIKV_DEV float h_hi(u32 x) { return half_bits_to_f32((u16)(x >> 16)); }

// c += A B, m16n8k16, f16 operands, f32 accumulators (PTX fragment layouts).
SIKV_DEV void mma_16816(float* c, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#endif
}

// The 8x8 f16 matrix whose row r, columns 2c and 2c+1 lane 4r + c holds, transposed.
SIKV_DEV u32 movmatrix_trans(u32 x) {
    u32 d;
    asm("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;" : "=r"(d) : "r"(x));
    return d;
}

// Two codes of BITS bits (at bit BITS i of each 16-bit half of w) -> f16x2 (code * delta +
// zero): the codes go into the mantissa of 1024.0 and 1024 is taken away, exactly.
#define H2_MAGIC 0x64006400u
template <int BITS>
SIKV_DEV u32 code_pair(u32 w, int i, u32 delta2, u32 zero2, u32 mask) {
    const u32 u = ((w >> (BITS * i)) & mask) | H2_MAGIC;
    return h2_fma(h2_sub(u, H2_MAGIC), delta2, zero2);
}

// The code words of one 16-token tile a thread needs.
template <int D, int BITS>
struct TcRaw {
    u32 ksign[2];                         // key signs of its tokens g and g + 8
    u32 kcode[2][TcShape<D, BITS>::KW];   // their key codes
    u32 kpar[2];                          // their (delta, zero) f16 pair
    u32 vcode[4][TcShape<D, BITS>::VW];   // value codes of tokens 2j, 2j+1, 2j+8, 2j+9
    u32 vpar[4];
};

template <int D>
struct TcSmem {
    typedef TcShape<D> Sh;
    float wm[Sh::WARPS][Sh::GMAX];
    float wl[Sh::WARPS][Sh::GMAX];
    // init stages Q' here; finish the warps' accumulators. Head hh's channel c is at
    // [hh][col(hh, c)] (below).
    __align__(16) float acc[Sh::WARPS][Sh::GMAX][Sh::DS];
    float qmax[Sh::WARPS];
    int count[Sh::WARPS];
    u32 cmask;

    // Channel c of head hh rotated inside its 32-channel segment, so that no two lanes of a
    // warp meet in one bank: init's reads of Q' (lane (g, j) reads head g, channels j d/4 +
    // ...), finish's writes of the accumulators (lane (g, j) writes heads 2j, 2j+1, channels
    // g d/8 + ...) and the row-order accesses of both. Unrotated, those reads were 16-32-way
    // and the writes 8-16-way bank conflicts, in series before the first tile and after the
    // last. scripts/diag/tc_smem_banks.py checks it for d = 64 and 128, both code widths,
    // heads 0..7 (it mirrors this formula: change both together).
    static SIKV_DEV int col(int hh, int c) {
        const int r = (c >> 5) + (Sh::DS / 32) * (hh >> 1) + (Sh::DS / 8) * (hh & 1);
        return (c & ~31) | ((c + r) & 31);
    }
};

// Whether the planes and the grouping fit the tensor-core tiles of width BITS (uniform over a
// grid).
template <int D, int BITS>
SIKV_DEV bool tc_shape_ok(const SikvParams& p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    typedef TcShape<D, BITS> Sh;
    return Sh::OK && p.key_bits == BITS && p.value_bits == BITS && p.group <= Sh::GMAX &&
           p.row_bytes[SIKV_PLANE_SIGN] == Sh::RB_SIGN && p.row_bytes[SIKV_PLANE_KMAG] == Sh::RB_KMAG &&
           p.row_bytes[SIKV_PLANE_VCODE] == Sh::RB_VCODE && p.row_bytes[SIKV_PLANE_KPAR] == Sh::RB_KPAR &&
           p.row_bytes[SIKV_PLANE_VPAR] == Sh::RB_VPAR && p.page_size % 16 == 0;
#else
    return false;
#endif
}


// One warp's attention over its tiles, and the block's merge of its warps into one partial.
template <int D, typename T, int BITS>
struct TcWarp {
    typedef TcShape<D, BITS> Sh;
    typedef TcRaw<D, BITS> Raw;
    int lane, warp, g, j;  // g, j: mma groupID and thread-in-group
    u32 qa[Sh::KB][2];     // B fragments of Q'^T (column g: head g; zero for g >= G)
    float s_up;            // undoes Q''s power-of-two scale on S
    // The code mask of code_pair (Sh::CODE_MASK). Read from shared memory in init: as a
    // literal, ptxas (at the 128-register bound) re-created it with a move before every use,
    // 43 moves per tile at d = 128.
    u32 cmask;
    float oacc[Sh::MB][4];
    // Heads 2j, 2j+1: running max (log2 units) and this thread's part of the sum.
    float m_run[2], l_run[2];
    const u8* pl_sign; const u8* pl_kmag; const u8* pl_kpar; const u8* pl_vcode; const u8* pl_vpar;

    // The thread's place in the warp (init's first step) and its plane pointers (init's last):
    // a walk that issues its first tile's loads before init calls both first. The sparse
    // splits do not: their pointers would live through init beside its registers.
    SIKV_DEV void bind_lanes() {
        const int tid = threadIdx.x;
        lane = tid & 31; warp = tid >> 5; g = lane >> 2; j = lane & 3;
    }
    SIKV_DEV void bind_planes(const SikvParams& p) {
        pl_sign = reinterpret_cast<const u8*>(p.plane[SIKV_PLANE_SIGN]) + Sh::KCH * j / 8;
        pl_kmag = reinterpret_cast<const u8*>(p.plane[SIKV_PLANE_KMAG]) + Sh::KCH * j * BITS / 8;
        pl_kpar = reinterpret_cast<const u8*>(p.plane[SIKV_PLANE_KPAR]) + 4 * (Sh::KCH * j / QUANT_GROUP);
        pl_vcode = reinterpret_cast<const u8*>(p.plane[SIKV_PLANE_VCODE]) + Sh::VCH * g * BITS / 8;
        pl_vpar = reinterpret_cast<const u8*>(p.plane[SIKV_PLANE_VPAR]) + 4 * (Sh::VCH * g / QUANT_GROUP);
    }

    // Q' of the G heads -> fragments. Every thread of the block calls (two barriers);
    // `between` runs between them (shared-memory work that the walk reads afterwards).
    template <typename Between>
    SIKV_DEV void init(const SikvParams& p, TcSmem<D>& s, long long hq_base, const float* ascale, Between between) {
        const int tid = threadIdx.x, G = p.group;
        bind_lanes();
        float qm = 0.0f;
        const T* q = reinterpret_cast<const T*>(p.q);
        const float f = p.softmax_scale * 1.4426950408889634f;  // log2(e): exp2 in the softmax
        for (int i = tid; i < G * D; i += ATTEND_THREADS) {
            const int hh = i / D, c = i % D;
            const float v = to_f32(q[(hq_base + hh) * D + c]) * ascale[c] * f;
            s.acc[0][hh][TcSmem<D>::col(hh, c)] = v;
            qm = fmaxf(qm, fabsf(v));
        }
        qm = warp_max(qm);
        if (lane == 0) s.qmax[warp] = qm;
        if (tid == 0) s.cmask = Sh::CODE_MASK;
        __syncthreads();
        between();
        qm = s.qmax[0];
        #pragma unroll
        for (int w = 1; w < Sh::WARPS; ++w) qm = fmaxf(qm, s.qmax[w]);
        // A power of two puts max |Q'| in [2^13, 2^14): no f16 overflow, full f16 precision.
        int e2 = 0;
        if (qm > 0.0f && qm <= 3.0e38f) e2 = ilogbf(qm) - 13;
        const float q_down = ldexpf(1.0f, -e2);
        s_up = ldexpf(1.0f, e2);
        cmask = s.cmask;
        #pragma unroll
        for (int kb = 0; kb < Sh::KB; ++kb) {
            #pragma unroll
            for (int half = 0; half < 2; ++half) {
                const int pp = 2 * kb + half;  // key pair index of the thread
                // its low channel (word pp / PPW, pair pp % PPW); high = c + PPW
                const int c = Sh::KCH * j + Sh::CPW * (pp / Sh::PPW) + pp % Sh::PPW;
                qa[kb][half] = g < G ? h2_pack(s.acc[0][g][TcSmem<D>::col(g, c)] * q_down,
                                                    s.acc[0][g][TcSmem<D>::col(g, c + Sh::PPW)] * q_down)
                                            : 0u;
            }
        }
        #pragma unroll
        for (int mb = 0; mb < Sh::MB; ++mb)
            #pragma unroll
            for (int i = 0; i < 4; ++i) oacc[mb][i] = 0.0f;
        m_run[0] = m_run[1] = SIKV_NEG_INF;
        l_run[0] = l_run[1] = 0.0f;
        bind_planes(p);
        __syncthreads();  // Q' read (s.acc is reused by finish)
    }

    // The thread's key code words at km (KW words) and value code words at vc (VH halves);
    // zeros where !ok. At 4 bits and d = 128 one 16-byte (8-byte) load each: the offsets are
    // multiples of 16 (8) bytes.
    SIKV_DEV void load_kcode(const u8* km, bool ok, u32* out) const {
        if constexpr (Sh::KW == 4) {
            const uint4 x = ok ? *reinterpret_cast<const uint4*>(km) : make_uint4(0u, 0u, 0u, 0u);
            out[0] = x.x; out[1] = x.y; out[2] = x.z; out[3] = x.w;
        } else {
            #pragma unroll
            for (int w = 0; w < Sh::KW; ++w) out[w] = ok ? reinterpret_cast<const u32*>(km)[w] : 0u;
        }
    }
    SIKV_DEV void load_vcode(const u8* vc, bool ok, u32* out) const {
        if constexpr (Sh::VH == 1) {
            out[0] = ok ? (u32)*reinterpret_cast<const u16*>(vc) : 0u;
        } else if constexpr (Sh::VW == 1) {
            out[0] = ok ? *reinterpret_cast<const u32*>(vc) : 0u;
        } else {
            const uint2 x = ok ? *reinterpret_cast<const uint2*>(vc) : make_uint2(0u, 0u);
            out[0] = x.x; out[1] = x.y;
        }
    }

    // The thread's code words of one tile: plane rows of its key tokens g, g + 8 (rk) and value
    // tokens 2j, 2j+1, 2j+8, 2j+9 (rv); -1 = not a token (zero words: value 0 * 0 + 0).
    SIKV_DEV void load(const long long* rk, const long long* rv, Raw& r) const {
        #pragma unroll
        for (int nb = 0; nb < 2; ++nb) {
            const bool ok = rk[nb] >= 0;
            const u8* sg = pl_sign + rk[nb] * Sh::RB_SIGN;
            const u8* km = pl_kmag + rk[nb] * Sh::RB_KMAG;
            const u8* kp = pl_kpar + rk[nb] * Sh::RB_KPAR;
            if (D == 128) r.ksign[nb] = ok ? *reinterpret_cast<const u32*>(sg) : 0u;
            else r.ksign[nb] = ok ? (u32)*reinterpret_cast<const u16*>(sg) : 0u;
            load_kcode(km, ok, r.kcode[nb]);
            r.kpar[nb] = ok ? *reinterpret_cast<const u32*>(kp) : 0u;
        }
        #pragma unroll
        for (int u = 0; u < 4; ++u) {
            const bool ok = rv[u] >= 0;
            load_vcode(pl_vcode + rv[u] * Sh::RB_VCODE, ok, r.vcode[u]);
            r.vpar[u] = ok ? *reinterpret_cast<const u32*>(pl_vpar + rv[u] * Sh::RB_VPAR) : 0u;
        }
    }
    // The same words for 16 consecutive plane rows from row0 (a dense tile inside one page):
    // one row product per plane and tile, the token offsets are constants of the thread.
    SIKV_DEV void load_tile(long long row0, u32 valid, Raw& r) const {
        const u8* sg = pl_sign + (row0 + g) * Sh::RB_SIGN;
        const u8* km = pl_kmag + (row0 + g) * Sh::RB_KMAG;
        const u8* kp = pl_kpar + (row0 + g) * Sh::RB_KPAR;
        #pragma unroll
        for (int nb = 0; nb < 2; ++nb) {
            const bool ok = (valid >> key_token(nb)) & 1u;
            const int t = 8 * nb;  // key_token(nb) - g
            if (D == 128) r.ksign[nb] = ok ? *reinterpret_cast<const u32*>(sg + t * Sh::RB_SIGN) : 0u;
            else r.ksign[nb] = ok ? (u32)*reinterpret_cast<const u16*>(sg + t * Sh::RB_SIGN) : 0u;
            load_kcode(km + t * Sh::RB_KMAG, ok, r.kcode[nb]);
            r.kpar[nb] = ok ? *reinterpret_cast<const u32*>(kp + t * Sh::RB_KPAR) : 0u;
        }
        const u8* vc = pl_vcode + (row0 + 2 * j) * Sh::RB_VCODE;
        const u8* vp = pl_vpar + (row0 + 2 * j) * Sh::RB_VPAR;
        #pragma unroll
        for (int u = 0; u < 4; ++u) {
            const bool ok = (valid >> value_token(u)) & 1u;
            const int t = (u & 1) + 8 * (u >> 1);  // value_token(u) - 2 j
            load_vcode(vc + t * Sh::RB_VCODE, ok, r.vcode[u]);
            r.vpar[u] = ok ? *reinterpret_cast<const u32*>(vp + t * Sh::RB_VPAR) : 0u;
        }
    }
    // Zeros the words of the tokens whose bit in `valid` is clear, as load_tile leaves them:
    // for a tile loaded before its validity was known.
    SIKV_DEV void keep_valid(u32 valid, Raw& r) const {
        #pragma unroll
        for (int nb = 0; nb < 2; ++nb) {
            const bool ok = (valid >> key_token(nb)) & 1u;
            r.ksign[nb] = ok ? r.ksign[nb] : 0u;
            #pragma unroll
            for (int w = 0; w < Sh::KW; ++w) r.kcode[nb][w] = ok ? r.kcode[nb][w] : 0u;
            r.kpar[nb] = ok ? r.kpar[nb] : 0u;
        }
        #pragma unroll
        for (int u = 0; u < 4; ++u) {
            const bool ok = (valid >> value_token(u)) & 1u;
            #pragma unroll
            for (int w = 0; w < Sh::VW; ++w) r.vcode[u][w] = ok ? r.vcode[u][w] : 0u;
            r.vpar[u] = ok ? r.vpar[u] : 0u;
        }
    }
    // The tile's token t (0..15) of this thread: key tokens g, g + 8; value tokens 2j, 2j+1,
    // 2j+8, 2j+9.
    SIKV_DEV int key_token(int nb) const { return 8 * nb + g; }
    SIKV_DEV int value_token(int u) const { return 2 * j + (u & 1) + 8 * (u >> 1); }

    // One tile: S^T, the online softmax, O^T. valid: bit t = token t attends.
    SIKV_DEV void tile(const Raw& cur, u32 valid) {
        // S^T = K Q'^T (M = the 16 tokens, N = the heads): rows g and g + 8 are this thread's
        // tokens; at 2 bits even and odd k-blocks in separate accumulators (two mma chains side
        // by side). At 4 bits one chain: the second's four registers made the kernel spill at
        // the 128-register bound (the tile's code words take 16 more).
        constexpr int CHAINS = BITS == 2 ? 2 : 1;
        float sacc[CHAINS][4];
        #pragma unroll
        for (int c = 0; c < CHAINS; ++c)
            #pragma unroll
            for (int i = 0; i < 4; ++i) sacc[c][i] = 0.0f;
        constexpr u32 LOW = (1u << Sh::PPW) - 1u;  // the sign bits of a word's low channels
        #pragma unroll
        for (int w = 0; w < Sh::KW; ++w) {
            u32 kf[2][Sh::PPW];
            #pragma unroll
            for (int nb = 0; nb < 2; ++nb) {
                const u32 d2 = __byte_perm(cur.kpar[nb], 0u, 0x1010), z2 = __byte_perm(cur.kpar[nb], 0u, 0x3232);
                const u32 ns = ~(cur.ksign[nb] >> (Sh::CPW * w));
                // signs of channels i, i + PPW at bits i, 16 + i
                const u32 s2 = (ns & LOW) | ((ns & (LOW << Sh::PPW)) << (16 - Sh::PPW));
                #pragma unroll
                for (int i = 0; i < Sh::PPW; ++i)
                    kf[nb][i] = code_pair<BITS>(cur.kcode[nb][w], i, d2, z2, cmask) ^ ((s2 << (15 - i)) & 0x80008000u);
            }
            #pragma unroll
            for (int kk = 0; kk < Sh::PPW / 2; ++kk) {
                const int kb = Sh::PPW / 2 * w + kk;
                mma_16816(sacc[kb % CHAINS], kf[0][2 * kk], kf[1][2 * kk], kf[0][2 * kk + 1], kf[1][2 * kk + 1], qa[kb][0],
                          qa[kb][1]);
            }
        }
        // Online softmax of heads 2j, 2j+1 (columns) over tokens g, g + 8 (rows); the other
        // tokens of the tile are on the lanes with the same j (xor 4, 8, 16).
        const bool v0 = (valid >> g) & 1u, v1 = (valid >> (g + 8)) & 1u;
        float sv[4];
        #pragma unroll
        for (int i = 0; i < 4; ++i) {
            const float sc = CHAINS == 2 ? sacc[0][i] + sacc[CHAINS - 1][i] : sacc[0][i];
            sv[i] = ((i < 2) ? v0 : v1) ? sc * s_up : SIKV_NEG_INF;
        }
        float al[2];
        u32 ph[2];  // f16 weights: (token g: heads 2j, 2j+1), (token g + 8: same heads)
        float pw[4];
        #pragma unroll
        for (int e = 0; e < 2; ++e) {
            float mx = fmaxf(sv[e], sv[2 + e]);
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 4));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 8));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 16));
            const float m_new = fmaxf(m_run[e], mx);
            al[e] = 1.0f;
            pw[e] = 0.0f;
            pw[2 + e] = 0.0f;
            if (m_new != SIKV_NEG_INF) {
                al[e] = exp2f(m_run[e] - m_new);  // 0 while m_run is still -inf
                pw[e] = exp2f(sv[e] - m_new);
                pw[2 + e] = exp2f(sv[2 + e] - m_new);
                m_run[e] = m_new;
            }
        }
        ph[0] = h2_pack(pw[0], pw[1]);
        ph[1] = h2_pack(pw[2], pw[3]);
        // The sums take the f16 weights the products use.
        l_run[0] = l_run[0] * al[0] + (h_lo(ph[0]) + h_lo(ph[1]));
        l_run[1] = l_run[1] * al[1] + (h_hi(ph[0]) + h_hi(ph[1]));
        // P^T for the B operand of O^T += V^T P^T: the two 8x8 (token, head) blocks transposed
        // to (head, token) across the warp.
        const u32 pb0 = movmatrix_trans(ph[0]), pb1 = movmatrix_trans(ph[1]);
        // The rescale only when some head's max moved (rare after the first tiles).
        if (__any_sync(0xffffffffu, al[0] != 1.0f || al[1] != 1.0f)) {
            #pragma unroll
            for (int mb = 0; mb < Sh::MB; ++mb) {
                oacc[mb][0] *= al[0]; oacc[mb][1] *= al[1]; oacc[mb][2] *= al[0]; oacc[mb][3] *= al[1];
            }
        }
        // O^T += V^T P^T. vw[pr][h]: the h-th 16-bit half of the codes of the pair's two
        // tokens (CH channels each), the first token in the low half.
        constexpr int CH = 16 / BITS;
        u32 vw[2][Sh::VH], vd[2], vz[2];
        #pragma unroll
        for (int pr = 0; pr < 2; ++pr) {
            #pragma unroll
            for (int h = 0; h < Sh::VH; ++h) {
                const u32 w0 = cur.vcode[2 * pr][h / 2], w1 = cur.vcode[2 * pr + 1][h / 2];
                vw[pr][h] = h & 1 ? (w0 >> 16) | (w1 & 0xffff0000u) : (w0 & 0xffffu) | (w1 << 16);
            }
            vd[pr] = __byte_perm(cur.vpar[2 * pr], cur.vpar[2 * pr + 1], 0x5410);
            vz[pr] = __byte_perm(cur.vpar[2 * pr], cur.vpar[2 * pr + 1], 0x7632);
        }
        #pragma unroll
        for (int mb = 0; mb < Sh::MB; ++mb) {
            const int c_lo = mb, c_hi = Sh::MB + mb;  // local value channels of rows g, g + 8
            const u32 a0 = code_pair<BITS>(vw[0][c_lo / CH], c_lo % CH, vd[0], vz[0], cmask);
            const u32 a1 = code_pair<BITS>(vw[0][c_hi / CH], c_hi % CH, vd[0], vz[0], cmask);
            const u32 a2 = code_pair<BITS>(vw[1][c_lo / CH], c_lo % CH, vd[1], vz[1], cmask);
            const u32 a3 = code_pair<BITS>(vw[1][c_hi / CH], c_hi % CH, vd[1], vz[1], cmask);
            mma_16816(oacc[mb], a0, a1, a2, a3, pb0, pb1);
        }
    }

    // The block's partial for `split`: sums over the 8 lanes of a column, the warps merged in a
    // fixed order (m in natural-log units, as attend_body's). Every thread calls (one barrier).
    SIKV_DEV void finish(const SikvParams& p, TcSmem<D>& s, long long hq_base, int split) {
        const int tid = threadIdx.x, G = p.group;
        float* part_acc = reinterpret_cast<float*>(p.ws_part_acc);
        float* part_ml = reinterpret_cast<float*>(p.ws_part_ml);
        #pragma unroll
        for (int e = 0; e < 2; ++e) {
            l_run[e] += __shfl_xor_sync(0xffffffffu, l_run[e], 4);
            l_run[e] += __shfl_xor_sync(0xffffffffu, l_run[e], 8);
            l_run[e] += __shfl_xor_sync(0xffffffffu, l_run[e], 16);
            if (g == 0 && 2 * j + e < G) {
                s.wm[warp][2 * j + e] = m_run[e];
                s.wl[warp][2 * j + e] = l_run[e];
            }
        }
        #pragma unroll
        for (int mb = 0; mb < Sh::MB; ++mb) {
            const int c_lo = Sh::VCH * g + mb, c_hi = Sh::VCH * g + Sh::MB + mb;
            #pragma unroll
            for (int e = 0; e < 2; ++e) {
                const int hh = 2 * j + e;
                if (hh < G) {
                    s.acc[warp][hh][TcSmem<D>::col(hh, c_lo)] = oacc[mb][e];
                    s.acc[warp][hh][TcSmem<D>::col(hh, c_hi)] = oacc[mb][2 + e];
                }
            }
        }
        __syncthreads();
        for (int i = tid; i < G * D; i += ATTEND_THREADS) {
            const int hh = i / D, c = i % D;
            float M = SIKV_NEG_INF;
            #pragma unroll
            for (int w = 0; w < Sh::WARPS; ++w) M = fmaxf(M, s.wm[w][hh]);
            float v = 0.0f;
            if (M != SIKV_NEG_INF) {
                #pragma unroll
                for (int w = 0; w < Sh::WARPS; ++w)
                    if (s.wm[w][hh] != SIKV_NEG_INF) v += exp2f(s.wm[w][hh] - M) * s.acc[w][hh][TcSmem<D>::col(hh, c)];
            }
            part_acc[((hq_base + hh) * p.num_splits + split) * D + c] = v;
        }
        if (tid < G) {
            float M = SIKV_NEG_INF;
            #pragma unroll
            for (int w = 0; w < Sh::WARPS; ++w) M = fmaxf(M, s.wm[w][tid]);
            float l = 0.0f;
            if (M != SIKV_NEG_INF) {
                #pragma unroll
                for (int w = 0; w < Sh::WARPS; ++w)
                    if (s.wm[w][tid] != SIKV_NEG_INF) l += exp2f(s.wm[w][tid] - M) * s.wl[w][tid];
            }
            // Natural-log units for combine (weights exp(m_j - M) there).
            part_ml[((hq_base + tid) * p.num_splits + split) * 2 + 0] = M != SIKV_NEG_INF ? M * 0.6931471805599453f : M;
            part_ml[((hq_base + tid) * p.num_splits + split) * 2 + 1] = l;
        }
    }
};
