#!/usr/bin/env python3
"""ctypes bindings for the libselfindexkv C ABI (include/selfindexkv.h), for the Python benchmarks.

Pointers are passed as plain integers (a torch tensor's data_ptr(), a numpy array's
ctypes.data), so the same bindings drive the CUDA device (device pointers, a stream handle) and
the CPU device (host pointers, stream ignored). Every call's status is checked; a failure raises
SikvError carrying sikv_last_error_message() and, for SIKV_ERR_CUDA, the driver's CUresult.

The struct layouts mirror the header field by field. The library exports no sizeof/offsetof
query, so `self_check()` verifies them three ways: (1) the header is parsed and every struct's
field names and C types are compared with the ctypes definitions, (2) where a C compiler is
present, a probe compiled against the header prints sizeof/offsetof of every field, which must
equal ctypes' figures, (3) the library fills SikvConfig / SikvLayoutInfo and known values must
land in the right fields (e.g. 112 bytes per token for 2+1 at head_dim 128).

Run `python3 scripts/bench/sikv_ctypes.py --lib PATH` for the self-check plus a CPU end-to-end
decode through the stateless calls (calibrate, append, decode, attend_dense, select) compared
with a float64 dense attention over the same K/V. Needs numpy, no GPU.
"""
import ctypes as C
import os
import re
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
HEADER = os.path.join(REPO, "include", "selfindexkv.h")
DEFAULT_LIB = ".gpu/libselfindexkv.so"

# Constants of the header (values are part of the ABI).
SIKV_DEVICE_AUTO, SIKV_DEVICE_CPU, SIKV_DEVICE_CUDA = 0, 1, 2
SIKV_DTYPE_F16, SIKV_DTYPE_BF16, SIKV_DTYPE_F32 = 0, 1, 2
SIKV_PROFILE_2_1, SIKV_PROFILE_4_1, SIKV_PROFILE_16_1, SIKV_PROFILE_PARITY = 0, 1, 2, 3
PROFILES = {"2+1": SIKV_PROFILE_2_1, "4+1": SIKV_PROFILE_4_1, "16+1": SIKV_PROFILE_16_1, "parity": SIKV_PROFILE_PARITY}
SIKV_NUM_PLANES = 7
PLANE_NAMES = ["SIGN", "KMAG", "VCODE", "KPAR", "VPAR", "KFULL", "VFULL"]
SIKV_ABI_VERSION = 1
STATUS_NAMES = {
    0: "SIKV_OK", 1: "SIKV_ERR_INVALID_ARGUMENT", 2: "SIKV_ERR_NULL_POINTER", 3: "SIKV_ERR_OUT_OF_BOUNDS",
    4: "SIKV_ERR_UNSUPPORTED", 5: "SIKV_ERR_OUT_OF_PAGES", 6: "SIKV_ERR_UNKNOWN_SEQUENCE",
    7: "SIKV_ERR_SEQUENCE_EXISTS", 8: "SIKV_ERR_NOT_CALIBRATED", 9: "SIKV_ERR_ALREADY_CALIBRATED",
    10: "SIKV_ERR_BUFFER_TOO_SMALL", 11: "SIKV_ERR_NO_DEVICE", 12: "SIKV_ERR_CUDA", 13: "SIKV_ERR_POISONED",
    14: "SIKV_ERR_INTERNAL", 15: "SIKV_ERR_MISALIGNED", 16: "SIKV_ERR_OUT_OF_MEMORY",
}
SIKV_ERR_NO_DEVICE = 11
SIKV_ERR_CUDA = 12


class SikvConfig(C.Structure):
    _fields_ = [
        ("device", C.c_uint32), ("device_ordinal", C.c_int32), ("dtype", C.c_uint32),
        ("num_layers", C.c_uint32), ("num_q_heads", C.c_uint32), ("num_kv_heads", C.c_uint32),
        ("head_dim", C.c_uint32), ("key_bits", C.c_uint32), ("value_bits", C.c_uint32),
        ("page_size", C.c_uint32), ("num_pages", C.c_uint32), ("max_seqs", C.c_uint32),
        ("max_seq_len", C.c_uint32), ("max_batch", C.c_uint32), ("max_append_tokens", C.c_uint32),
        ("n_sink", C.c_uint32), ("n_heavy", C.c_uint32), ("n_window", C.c_uint32),
        ("budget_ratio", C.c_float), ("budget_min", C.c_uint32), ("budget_max", C.c_uint32),
        ("rerank_factor", C.c_uint32), ("selector", C.c_uint32), ("centre", C.c_uint32),
        ("flags", C.c_uint32), ("softmax_scale", C.c_float), ("dense_crossover", C.c_uint32),
    ]

    def as_dict(self):
        return {n: getattr(self, n) for n, _ in self._fields_}


class SikvLayoutInfo(C.Structure):
    _fields_ = [
        ("bytes_per_token", C.c_size_t), ("bytes_per_page", C.c_size_t), ("compression_vs_fp16", C.c_double),
        ("row_bytes", C.c_size_t * SIKV_NUM_PLANES), ("plane_offset", C.c_size_t * SIKV_NUM_PLANES),
        ("plane_bytes", C.c_size_t * SIKV_NUM_PLANES), ("layer_plane_bytes", C.c_size_t),
        ("state_record_bytes", C.c_size_t), ("layer_state_bytes", C.c_size_t),
        ("total_plane_bytes", C.c_size_t), ("total_state_bytes", C.c_size_t), ("workspace_bytes", C.c_size_t),
        ("num_pages", C.c_uint32), ("dense_capacity", C.c_uint32), ("key_bits", C.c_uint32),
        ("value_bits", C.c_uint32), ("rerank_factor", C.c_uint32),
    ]


class SikvPoolsDesc(C.Structure):
    _fields_ = [
        ("planes", C.c_void_p), ("planes_bytes", C.c_size_t), ("state", C.c_void_p),
        ("state_bytes", C.c_size_t), ("workspace", C.c_void_p), ("workspace_bytes", C.c_size_t),
    ]


class SikvCacheInfo(C.Structure):
    _fields_ = [
        ("device", C.c_uint32), ("num_seqs", C.c_uint32), ("free_pages", C.c_uint32),
        ("num_pages", C.c_uint32), ("bytes_per_token", C.c_size_t),
    ]


class SikvLayerPools(C.Structure):
    _fields_ = [("plane", C.c_void_p * SIKV_NUM_PLANES), ("state", C.c_void_p)]


class SikvPageTable(C.Structure):
    _fields_ = [("indptr", C.c_void_p), ("indices", C.c_void_p), ("last_page_len", C.c_void_p), ("batch", C.c_uint32)]


STRUCTS = [SikvConfig, SikvLayoutInfo, SikvPoolsDesc, SikvCacheInfo, SikvLayerPools, SikvPageTable]


class SikvError(RuntimeError):
    def __init__(self, what, status, message, cuda_code=0):
        name = STATUS_NAMES.get(status, f"status {status}")
        extra = f" (CUresult {cuda_code})" if cuda_code else ""
        super().__init__(f"{what}: {name}: {message}{extra}")
        self.status = status
        self.cuda_code = cuda_code


_P = C.c_void_p
_U32 = C.c_uint32
_SZ = C.c_size_t
# name -> (argtypes, restype); pointers to caller memory are c_void_p so that integers pass.
_SIGNATURES = {
    "sikv_config_init": ([C.POINTER(SikvConfig), _U32], C.c_int),
    "sikv_query_layout": ([C.POINTER(SikvConfig), C.POINTER(SikvLayoutInfo)], C.c_int),
    "sikv_kernels_create": ([C.POINTER(SikvConfig), C.POINTER(_P)], C.c_int),
    "sikv_kernels_destroy": ([_P], None),
    "sikv_workspace_size": ([_P, _U32, C.POINTER(_SZ)], C.c_int),
    "sikv_kernel_calibrate": ([_P, C.POINTER(SikvLayerPools), _U32, _U32, _P, _P, _U32, _P, _P, _P, _SZ, _P], C.c_int),
    "sikv_kernel_append": ([_P, C.POINTER(SikvLayerPools), _U32, _P, _P, _P, _P, _P, _P], C.c_int),
    "sikv_kernel_select": ([_P, C.POINTER(SikvLayerPools), C.POINTER(SikvPageTable), _P, _P, _P, _P, _P, _SZ, _P], C.c_int),
    "sikv_kernel_attend": ([_P, C.POINTER(SikvLayerPools), C.POINTER(SikvPageTable), _P, _P, _P, _P, _P, _P, _SZ, _P], C.c_int),
    "sikv_kernel_attend_dense": ([_P, C.POINTER(SikvLayerPools), C.POINTER(SikvPageTable), _P, _P, _P, _P, _SZ, _P], C.c_int),
    "sikv_kernel_reset_slot": ([_P, C.POINTER(SikvLayerPools), _U32, _P], C.c_int),
    "sikv_kernel_decode": ([_P, C.POINTER(SikvLayerPools), C.POINTER(SikvPageTable), _P, _P, _P, _P, _SZ, _P], C.c_int),
    "sikv_version": ([], C.c_char_p),
    "sikv_abi_version": ([], _U32),
    "sikv_build_info": ([], C.c_char_p),
    "sikv_last_error_message": ([], C.c_char_p),
    "sikv_last_error_cuda_code": ([], C.c_int32),
}


def resolve_lib(path=None):
    """The library path: the one given, else the GPU bundle's, else this checkout's release build."""
    cands = [path] if path else [DEFAULT_LIB, os.path.join(REPO, DEFAULT_LIB), os.path.join(REPO, "target", "release", "libselfindexkv.so")]
    for c in cands:
        if c and os.path.exists(c):
            return os.path.abspath(c)
    raise FileNotFoundError(f"libselfindexkv.so not found (tried {', '.join(c for c in cands if c)})")


class Lib:
    """The loaded library. Methods take integers for every caller pointer (0 = NULL)."""

    def __init__(self, path=None):
        self.path = resolve_lib(path)
        self.dll = C.CDLL(self.path)
        for name, (args, res) in _SIGNATURES.items():
            f = getattr(self.dll, name)
            f.argtypes = args
            f.restype = res
        abi = self.dll.sikv_abi_version()
        if abi != SIKV_ABI_VERSION:
            raise RuntimeError(f"{self.path}: ABI version {abi}, these bindings mirror {SIKV_ABI_VERSION}")

    # --- errors -------------------------------------------------------------------------------
    def check(self, status, what):
        if status != 0:
            msg = self.dll.sikv_last_error_message().decode(errors="replace")
            raise SikvError(what, status, msg, self.dll.sikv_last_error_cuda_code() if status == SIKV_ERR_CUDA else 0)

    def last_error_message(self):
        return self.dll.sikv_last_error_message().decode(errors="replace")

    def version(self):
        return self.dll.sikv_version().decode()

    def build_info(self):
        return self.dll.sikv_build_info().decode()

    # --- configuration and layout ---------------------------------------------------------------
    def config(self, profile="2+1", **fields):
        """sikv_config_init(profile) then the given field overrides (names as in SikvConfig)."""
        cfg = SikvConfig()
        p = PROFILES[profile] if isinstance(profile, str) else int(profile)
        self.check(self.dll.sikv_config_init(C.byref(cfg), p), f"sikv_config_init({profile})")
        names = {n for n, _ in SikvConfig._fields_}
        for k, v in fields.items():
            if k not in names:
                raise KeyError(f"SikvConfig has no field {k!r}")
            setattr(cfg, k, v)
        return cfg

    def query_layout(self, cfg):
        info = SikvLayoutInfo()
        self.check(self.dll.sikv_query_layout(C.byref(cfg), C.byref(info)), "sikv_query_layout")
        return info

    def kernels(self, cfg):
        return Kernels(self, cfg)


class Kernels:
    """A sikv_kernels_create handle plus its layout; the stateless calls as methods."""

    def __init__(self, lib, cfg):
        self.lib, self.cfg = lib, cfg
        self.layout = lib.query_layout(cfg)
        h = _P()
        lib.check(lib.dll.sikv_kernels_create(C.byref(cfg), C.byref(h)), "sikv_kernels_create")
        self.h = h

    def close(self):
        if self.h:
            self.lib.dll.sikv_kernels_destroy(self.h)
            self.h = _P()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def workspace_size(self, batch):
        n = _SZ()
        self.lib.check(self.lib.dll.sikv_workspace_size(self.h, batch, C.byref(n)), f"sikv_workspace_size({batch})")
        return n.value

    def layer_pools(self, planes_base, state_base, layer):
        """SikvLayerPools of `layer` inside one allocation of all layers' planes (planes_base, of
        total_plane_bytes) and one of all layers' state (state_base, of total_state_bytes), as
        sikv_query_layout lays them out: layer l's planes start at l * layer_plane_bytes, plane
        p at plane_offset[p] inside that block; absent planes get NULL."""
        L = self.layout
        lp = SikvLayerPools()
        for p in range(SIKV_NUM_PLANES):
            lp.plane[p] = (planes_base + layer * L.layer_plane_bytes + L.plane_offset[p]) if L.plane_bytes[p] else None
        lp.state = state_base + layer * L.layer_state_bytes
        return lp

    def calibrate(self, pools, seq_slot, n_tokens, k, v, n_query, q_tail, slot_mapping, ws, ws_bytes, stream=0):
        st = self.lib.dll.sikv_kernel_calibrate(self.h, C.byref(pools), seq_slot, n_tokens, k, v, n_query, q_tail,
                                                slot_mapping, ws or None, ws_bytes, stream or None)
        self.lib.check(st, "sikv_kernel_calibrate")

    def append(self, pools, n_tokens, k, v, slot_mapping, seq_slot, position, stream=0):
        st = self.lib.dll.sikv_kernel_append(self.h, C.byref(pools), n_tokens, k, v, slot_mapping, seq_slot, position,
                                             stream or None)
        self.lib.check(st, "sikv_kernel_append")

    def decode(self, pools, table, seq_slot, q, out, ws, ws_bytes, stream=0):
        st = self.lib.dll.sikv_kernel_decode(self.h, C.byref(pools), C.byref(table), seq_slot, q, out, ws or None,
                                             ws_bytes, stream or None)
        self.lib.check(st, "sikv_kernel_decode")

    def attend_dense(self, pools, table, seq_slot, q, out, ws, ws_bytes, stream=0):
        st = self.lib.dll.sikv_kernel_attend_dense(self.h, C.byref(pools), C.byref(table), seq_slot, q, out,
                                                   ws or None, ws_bytes, stream or None)
        self.lib.check(st, "sikv_kernel_attend_dense")

    def select(self, pools, table, seq_slot, q, indices, counts, ws, ws_bytes, stream=0):
        st = self.lib.dll.sikv_kernel_select(self.h, C.byref(pools), C.byref(table), seq_slot, q, indices, counts,
                                             ws or None, ws_bytes, stream or None)
        self.lib.check(st, "sikv_kernel_select")

    def attend(self, pools, table, seq_slot, q, indices, counts, out, ws, ws_bytes, stream=0):
        st = self.lib.dll.sikv_kernel_attend(self.h, C.byref(pools), C.byref(table), seq_slot, q, indices, counts, out,
                                             ws or None, ws_bytes, stream or None)
        self.lib.check(st, "sikv_kernel_attend")

    def reset_slot(self, pools, seq_slot, stream=0):
        self.lib.check(self.lib.dll.sikv_kernel_reset_slot(self.h, C.byref(pools), seq_slot, stream or None),
                       "sikv_kernel_reset_slot")


def page_table(ptr_indptr, ptr_indices, ptr_last, batch):
    t = SikvPageTable()
    t.indptr, t.indices, t.last_page_len, t.batch = ptr_indptr, ptr_indices, ptr_last, batch
    return t


def contiguous_pages(batch, n_tokens, page_size, first_seq=0):
    """CSR page table (python lists) where sequence b owns pages [(first_seq+b)*P, ...+P), P =
    ceil(n_tokens / page_size), every sequence n_tokens long."""
    pp = -(-n_tokens // page_size)
    indptr = [b * pp for b in range(batch + 1)]
    indices = [(first_seq + b) * pp + i for b in range(batch) for i in range(pp)]
    last = [n_tokens - (pp - 1) * page_size] * batch
    return indptr, indices, last


def slot_of(seq, pos, pages_per_seq, page_size):
    """slot_mapping entry (page * page_size + offset) of token `pos` of sequence `seq` under
    contiguous_pages."""
    return (seq * pages_per_seq + pos // page_size) * page_size + pos % page_size


# --- self-check of the struct layouts ------------------------------------------------------------
_CTYPE_OF_C = {
    "uint32_t": C.c_uint32, "int32_t": C.c_int32, "float": C.c_float, "double": C.c_double, "size_t": C.c_size_t,
    "void *": C.c_void_p, "const int32_t *": C.c_void_p,
}


def _header_structs(path):
    text = open(path).read()
    text = re.sub(r"//[^\n]*", "", text)
    out = {}
    for m in re.finditer(r"typedef struct (\w+) \{(.*?)\} \1;", text, re.S):
        fields = []
        for decl in m.group(2).split(";"):
            decl = " ".join(decl.split())
            if not decl:
                continue
            dm = re.match(r"^(.*?)(\w+)(\[(\w+)\])?$", decl)
            ctype, name, count = dm.group(1).strip(), dm.group(2), dm.group(4)
            ctype = ctype.replace("*", " *").replace("  ", " ").strip()
            ctype = re.sub(r"\s+\*", " *", ctype)
            fields.append((name, ctype, count))
        out[m.group(1)] = fields
    return out


def check_against_header(path=HEADER):
    """Field names and C types of every mirrored struct equal the header's. Returns the number of
    fields checked; raises AssertionError on a mismatch."""
    hs = _header_structs(path)
    n = 0
    for st in STRUCTS:
        name = st.__name__
        assert name in hs, f"{name} not found in {path}"
        hf = hs[name]
        assert [f[0] for f in hf] == [f[0] for f in st._fields_], f"{name}: fields {[f[0] for f in hf]} vs ctypes {[f[0] for f in st._fields_]}"
        for (fname, ctype, count), (_, ct) in zip(hf, st._fields_):
            want = _CTYPE_OF_C.get(ctype)
            assert want is not None, f"{name}.{fname}: C type {ctype!r} unknown to the check"
            if count:
                assert count == "SIKV_NUM_PLANES", f"{name}.{fname}[{count}]"
                want = want * SIKV_NUM_PLANES
            assert C.sizeof(want) == C.sizeof(ct) and getattr(want, "_type_", want) == getattr(ct, "_type_", ct), \
                f"{name}.{fname}: header {ctype}{'[' + count + ']' if count else ''}, ctypes {ct}"
            n += 1
    return n


def check_with_compiler(path=HEADER):
    """sizeof / offsetof of every field from a C probe compiled against the header, compared with
    ctypes. Returns the number of figures compared, or None when no C compiler is present."""
    cc = next((c for c in ("cc", "gcc", "clang") if shutil.which(c)), None)
    if cc is None:
        return None
    lines = ['#include <stdio.h>', '#include <stddef.h>', '#include "selfindexkv.h"', "int main(void) {"]
    for st in STRUCTS:
        n = st.__name__
        lines.append(f'printf("{n} sizeof %zu\\n", sizeof(struct {n}));')
        for f, _ in st._fields_:
            lines.append(f'printf("{n} {f} %zu\\n", offsetof(struct {n}, {f}));')
    lines += ["return 0;", "}"]
    with tempfile.TemporaryDirectory() as d:
        src, exe = os.path.join(d, "probe.c"), os.path.join(d, "probe")
        with open(src, "w") as fh:
            fh.write("\n".join(lines) + "\n")
        r = subprocess.run([cc, "-std=c99", "-I", os.path.dirname(path), src, "-o", exe], capture_output=True, text=True)
        if r.returncode != 0:
            raise AssertionError(f"C probe did not compile: {r.stderr[:500]}")
        got = subprocess.run([exe], capture_output=True, text=True, check=True).stdout.split("\n")
    n = 0
    for line in filter(None, got):
        sname, field, val = line.split()
        st = next(s for s in STRUCTS if s.__name__ == sname)
        mine = C.sizeof(st) if field == "sizeof" else getattr(st, field).offset
        assert mine == int(val), f"{sname}.{field}: C says {val}, ctypes {mine}"
        n += 1
    return n


def check_with_library(lib):
    """Values the library writes land in the expected fields (catches a shifted layout)."""
    c = lib.config("4+1")
    assert (c.key_bits, c.value_bits) == (4, 4), c.as_dict()
    c = lib.config("2+1", device=SIKV_DEVICE_CPU, dtype=SIKV_DTYPE_BF16, num_q_heads=32, num_kv_heads=8, head_dim=128)
    assert (c.key_bits, c.value_bits, c.head_dim, c.page_size % 16) == (2, 2, 128, 0), c.as_dict()
    assert abs(c.budget_ratio - 1.0 / 16.0) < 1e-7 and c.softmax_scale == 0.0, c.as_dict()
    info = lib.query_layout(c)
    assert info.bytes_per_token == 112, f"bytes_per_token {info.bytes_per_token} (112 expected for 2+1, d=128)"
    assert abs(info.compression_vs_fp16 - 512 / 112) < 1e-9, info.compression_vs_fp16
    assert sum(info.row_bytes) == info.bytes_per_token
    assert info.bytes_per_page == info.bytes_per_token * c.page_size * c.num_kv_heads
    assert (info.key_bits, info.value_bits, info.rerank_factor) == (2, 2, c.rerank_factor)
    assert info.dense_capacity == c.n_sink + c.n_heavy + c.n_window
    assert info.total_plane_bytes == c.num_layers * info.layer_plane_bytes
    assert info.layer_state_bytes == c.max_seqs * c.num_kv_heads * info.state_record_bytes
    assert all(o % 256 == 0 for o in info.plane_offset)
    # An unknown profile is refused with a message: the error path works.
    try:
        lib.config(99)
        raise AssertionError("profile 99 accepted")
    except SikvError as e:
        assert e.status == 4 and "99" in str(e), str(e)
    return True


def self_check(lib, header=HEADER, quiet=False):
    say = (lambda *a: None) if quiet else print
    if os.path.exists(header):
        say(f"  header fields match ctypes: {check_against_header(header)} fields")
        n = check_with_compiler(header)
        say(f"  C probe sizeof/offsetof match: {n} figures" if n is not None else "  C probe skipped: no C compiler")
    else:
        say(f"  header {header} absent: field check skipped")
    check_with_library(lib)
    say("  library-filled SikvConfig / SikvLayoutInfo values in the expected fields")


# --- CPU end-to-end check (numpy) ------------------------------------------------------------------
def _bf16_round(np, x):
    """float32 array -> (uint16 bf16 bits, float64 values the bits stand for), round to nearest even."""
    b = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    r = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16).astype(np.uint16)
    back = (r.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return r, back


def _bf16_to_f64(np, bits):
    return (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def cpu_end_to_end(lib, profile="16+1", whole_budget=True, batch=2, n_ctx=333, hq=8, hkv=2, d=128, page=16, seed=1):
    """Calibrate `batch` sequences of n_ctx-1 tokens, append token n_ctx-1 of each, decode, and
    compare with a float64 softmax attention over the same (bf16) K/V. Returns the worst
    relative L2 error over sequences for decode and attend_dense."""
    import numpy as np

    rng = np.random.default_rng(seed)
    kw = {}
    if whole_budget:
        kw = dict(budget_ratio=1.0, budget_min=n_ctx, budget_max=n_ctx)
    cfg = lib.config(profile, device=SIKV_DEVICE_CPU, dtype=SIKV_DTYPE_BF16, num_layers=1, num_q_heads=hq,
                     num_kv_heads=hkv, head_dim=d, page_size=page, max_seqs=batch, max_batch=batch,
                     max_seq_len=n_ctx, max_append_tokens=n_ctx, **kw)
    kern = lib.kernels(cfg)
    L = kern.layout
    assert kern.workspace_size(batch) == 0, "CPU workspace should be 0"
    planes = np.zeros(L.total_plane_bytes, np.uint8)
    state = np.zeros(L.total_state_bytes, np.uint8)
    pools = kern.layer_pools(planes.ctypes.data, state.ctypes.data, 0)
    off = rng.normal(0, 1.5, d).astype(np.float32)  # per-channel key offsets, as real keys have
    K = rng.normal(0, 1, (batch, n_ctx, hkv, d)).astype(np.float32) + off
    V = rng.normal(0, 1, (batch, n_ctx, hkv, d)).astype(np.float32)
    Q = rng.normal(0, 1, (batch, hq, d)).astype(np.float32)
    kb, kf = _bf16_round(np, K)
    vb, vf = _bf16_round(np, V)
    qb, qf = _bf16_round(np, Q)
    pp = -(-n_ctx // page)
    for b in range(batch):
        n = n_ctx - 1
        sm = np.array([slot_of(b, t, pp, page) for t in range(n)], np.int64)
        kk, vv = np.ascontiguousarray(kb[b, :n]), np.ascontiguousarray(vb[b, :n])
        qt = np.ascontiguousarray(qb[b])
        kern.calibrate(pools, b, n, kk.ctypes.data, vv.ctypes.data, 1, qt.ctypes.data, sm.ctypes.data, 0, 0)
    # Decode step: one token per sequence at position n_ctx-1.
    kn, vn = np.ascontiguousarray(kb[:, n_ctx - 1]), np.ascontiguousarray(vb[:, n_ctx - 1])
    sm = np.array([slot_of(b, n_ctx - 1, pp, page) for b in range(batch)], np.int64)
    slots = np.arange(batch, dtype=np.int32)
    pos = np.full(batch, n_ctx - 1, np.int32)
    kern.append(pools, batch, kn.ctypes.data, vn.ctypes.data, sm.ctypes.data, slots.ctypes.data, pos.ctypes.data)
    indptr, indices, last = (np.array(x, np.int32) for x in contiguous_pages(batch, n_ctx, page))
    table = page_table(indptr.ctypes.data, indices.ctypes.data, last.ctypes.data, batch)
    # Reference: float64 softmax attention, GQA (query head h reads KV head h // (hq / hkv)).
    g = hq // hkv
    scale = 1.0 / np.sqrt(d)
    ref = np.zeros((batch, hq, d))
    for b in range(batch):
        for h in range(hq):
            s = kf[b, :, h // g] @ qf[b, h] * scale
            w = np.exp(s - s.max())
            ref[b, h] = (w / w.sum()) @ vf[b, :, h // g]
    errs = {}
    for name in ("decode", "attend_dense"):
        out = np.full((batch, hq, d), 0x7FC0, np.uint16)  # poison: bf16 NaN
        fn = kern.decode if name == "decode" else kern.attend_dense
        fn(pools, table, slots.ctypes.data, qb.ctypes.data, out.ctypes.data, 0, 0)
        o = _bf16_to_f64(np, out)
        assert np.isfinite(o).all(), f"{name}: output has NaN/Inf (unwritten?)"
        errs[name] = max(np.linalg.norm(o[b] - ref[b]) / np.linalg.norm(ref[b]) for b in range(batch))
    # Telemetry path: select into host arrays; whole budget selects every non-dense token.
    idx = np.full((batch, hkv, cfg.budget_max), -7, np.int32)
    cnt = np.full((batch, hkv), -7, np.int32)
    kern.select(pools, table, slots.ctypes.data, qb.ctypes.data, idx.ctypes.data, cnt.ctypes.data, 0, 0)
    assert (cnt >= 0).all() and (cnt <= cfg.budget_max).all(), cnt
    kern.close()
    return errs, int(cnt.min()), L.dense_capacity


def main(argv=None):
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lib", default=None, help=f"path of libselfindexkv.so (default {DEFAULT_LIB}, else target/release)")
    a = ap.parse_args(argv)
    lib = Lib(a.lib)
    print(f"{lib.path}: {lib.version()}")
    self_check(lib)
    try:
        import numpy  # noqa: F401
    except ImportError:
        print("  CPU end-to-end skipped: numpy unavailable")
        return 0
    for profile, whole, tol in (("16+1", True, 2e-2), ("2+1", True, 0.5), ("2+1", False, 0.8)):
        errs, kmin, dense = cpu_end_to_end(lib, profile, whole)
        ok = all(e < tol for e in errs.values())
        print(f"  CPU decode {profile:<5} {'whole budget' if whole else 'default budget':<14}: rel L2 err "
              f"decode {errs['decode']:.4f}, attend_dense {errs['attend_dense']:.4f} (tol {tol}), "
              f"min selected {kmin}, dense set {dense}: {'ok' if ok else 'FAIL'}")
        if not ok:
            return 1
    print("sikv_ctypes self-check passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
