"""Shared pieces of the Python benchmarks: timing, tables/CSV, and the library's per-layer
attention over engine-owned pools (torch tensors) through the stateless C ABI.

Everything here works on a CUDA device (device pointers, torch's current stream) and on the CPU
(the library's CPU device on host tensors, no stream), so the wiring is exercised without a GPU.
"""
import csv
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sikv_ctypes as S  # noqa: E402


def on_cuda(dev):
    return dev.type == "cuda"


def stream_handle(torch, dev):
    """The raw cudaStream_t of torch's current stream (the capture stream inside
    torch.cuda.graph), or 0 on the CPU."""
    return torch.cuda.current_stream(dev).cuda_stream if on_cuda(dev) else 0


def sync(torch, dev):
    if on_cuda(dev):
        torch.cuda.synchronize(dev)


def quantiles(ms):
    s = sorted(ms)
    at = lambda q: s[int(round((len(s) - 1) * q))]  # noqa: E731
    return statistics.median(s), at(0.1), at(0.9)


def time_fn(torch, dev, fn, warmup, iters):
    """Median / p10 / p90 milliseconds of fn(): CUDA events around each call on the GPU (after
    `warmup` untimed calls), perf_counter around a synchronous call on the CPU."""
    for _ in range(warmup):
        fn()
    sync(torch, dev)
    ms = []
    if on_cuda(dev):
        ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
        for e0, e1 in ev:
            e0.record()
            fn()
            e1.record()
        torch.cuda.synchronize(dev)
        ms = [e0.elapsed_time(e1) for e0, e1 in ev]
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            ms.append((time.perf_counter() - t0) * 1e3)
    return quantiles(ms)


def write_csv(path, rows, fields):
    if not path:
        return
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow(r)
    print(f"wrote {path}")


def gpu_bench_rows(bench, args, timeout=None):
    """Runs the gpu_bench binary `bench` with `args`, its rows written to a temporary CSV:
    (rows as dicts, None), or ([], why) when it could not run, failed or wrote no CSV."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.csv")
        try:
            r = subprocess.run([bench, *args, "--csv", out], capture_output=True, text=True, timeout=timeout)
        except (OSError, subprocess.TimeoutExpired) as e:
            return [], str(e)
        if r.returncode != 0 or not os.path.exists(out):
            tail = (r.stdout + r.stderr).strip().splitlines()[-5:]
            return [], "\n  ".join([f"exited {r.returncode}:"] + tail)
        with open(out, newline="") as f:
            return list(csv.DictReader(f)), None


def print_table(rows, cols, title=None):
    """cols: list of (key, header, format) ; missing values print as '-'."""
    if title:
        print(title)
    cells = []
    for r in rows:
        line = []
        for k, _, fmt in cols:
            v = r.get(k)
            if v is None or v == "" or (isinstance(v, float) and math.isnan(v)):
                line.append("-")
            else:
                line.append(format(v, fmt) if fmt else str(v))
        cells.append(line)
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, (_, h, _) in enumerate(cols)]
    print("  " + " ".join(h.rjust(w) for (_, h, _), w in zip(cols, widths)))
    for c in cells:
        print("  " + " ".join(x.rjust(w) for x, w in zip(c, widths)))


def gib(n):
    return n / 2**30


class SikvLayers:
    """The library's KV cache for `num_layers` layers of one model, in engine-owned torch
    memory: one allocation for all layers' planes, one for all layers' state records, one
    workspace (sizes from sikv_query_layout / sikv_workspace_size). Sequence b owns the
    contiguous page range [b*P, (b+1)*P), P = ceil(n_ctx / page_size); slot b is its state.

    `n_ctx` is the context length the decode step sees, the new token included: the step
    appends the token at position n_ctx-1 and attends over n_ctx tokens."""

    def __init__(self, torch, lib, dev, profile, num_layers, hq, hkv, d, n_ctx, max_batch, **overrides):
        self.torch, self.lib, self.dev = torch, lib, dev
        self.num_layers, self.hq, self.hkv, self.d, self.n_ctx = num_layers, hq, hkv, d, n_ctx
        self.profile = profile
        self.cfg = self.make_config(lib, dev, profile, num_layers, hq, hkv, d, n_ctx, max_batch, **overrides)
        self.kern = lib.kernels(self.cfg)
        L = self.kern.layout
        self.layout = L
        self.page = self.cfg.page_size
        self.pp = -(-n_ctx // self.page)
        u8 = torch.uint8
        self.planes = torch.empty(L.total_plane_bytes, dtype=u8, device=dev)
        # State records start out zeroed: "not calibrated, no dense entries".
        self.state = torch.zeros(L.total_state_bytes, dtype=u8, device=dev)
        ws = max(self.kern.workspace_size(max_batch), self.kern.workspace_size(1))
        self.ws_bytes = ws
        self.ws = torch.empty(max(ws, 256), dtype=u8, device=dev)
        self.pools = [self.kern.layer_pools(self.planes.data_ptr(), self.state.data_ptr(), l) for l in range(num_layers)]
        self.max_batch = max_batch
        self.batch = None

    @staticmethod
    def make_config(lib, dev, profile, num_layers, hq, hkv, d, n_ctx, max_batch, **overrides):
        kw = dict(device=S.SIKV_DEVICE_CUDA if on_cuda(dev) else S.SIKV_DEVICE_CPU,
                  device_ordinal=(dev.index or 0) if on_cuda(dev) else 0, dtype=S.SIKV_DTYPE_BF16,
                  num_layers=num_layers, num_q_heads=hq, num_kv_heads=hkv, head_dim=d, max_seq_len=n_ctx,
                  max_seqs=max_batch, max_batch=max_batch,
                  # the step appends one token per sequence; the fill appends a recent-window tail
                  max_append_tokens=max(max_batch, 256))
        kw.update(overrides)
        return lib.config(profile, **kw)

    @staticmethod
    def bytes_needed(lib, dev, profile, num_layers, hq, hkv, d, n_ctx, max_batch, **overrides):
        """Device bytes of planes + state + workspace for max_batch sequences (the layout query's
        own figures; the workspace figure is the one for max_batch on a GPU)."""
        cfg = SikvLayers.make_config(lib, dev, profile, num_layers, hq, hkv, d, n_ctx, max_batch, **overrides)
        info = lib.query_layout(cfg)
        return info.total_plane_bytes + info.total_state_bytes + info.workspace_bytes, info

    def reopen(self):
        """A fresh kernels handle over the same pools (the handle holds no cache data), for when
        a failed graph capture left the old one poisoned."""
        self.kern.close()
        self.kern = self.lib.kernels(self.cfg)
        self.pools = [self.kern.layer_pools(self.planes.data_ptr(), self.state.data_ptr(), l)
                      for l in range(self.num_layers)]

    def stream(self):
        return stream_handle(self.torch, self.dev)

    def slot_mapping(self, b, positions):
        """int64 slot_mapping of the given positions (a torch int64 tensor) of sequence b."""
        return (b * self.pp + positions // self.page) * self.page + positions % self.page

    def calibrate(self, layer, b, k, v, q_tail):
        """sikv_kernel_calibrate of sequence b at `layer` from a prompt k, v [T, hkv, d] and its
        last queries q_tail [n_query, hq, d], written to the sequence's first pages."""
        t = self.torch
        n = k.shape[0]
        sm = self.slot_mapping(b, t.arange(n, device=self.dev, dtype=t.int64))
        k, v, q_tail = k.contiguous(), v.contiguous(), q_tail.contiguous()
        self.kern.calibrate(self.pools[layer], b, n, k.data_ptr(), v.data_ptr(), q_tail.shape[0], q_tail.data_ptr(),
                            sm.data_ptr(), self.ws.data_ptr(), self.ws_bytes, self.stream())
        # Keep the inputs alive until the (asynchronous) calibrate has read them.
        self._keep = (k, v, q_tail, sm)

    def append_tokens(self, layer, b, k, v, start):
        """sikv_kernel_append of k, v [n, hkv, d] to sequence b at positions start..start+n-1."""
        t = self.torch
        n = k.shape[0]
        pos = t.arange(start, start + n, device=self.dev, dtype=t.int64)
        sm = self.slot_mapping(b, pos)
        slots = t.full((n,), b, dtype=t.int32, device=self.dev)
        pos32 = pos.to(t.int32)
        k, v = k.contiguous(), v.contiguous()
        self.kern.append(self.pools[layer], n, k.data_ptr(), v.data_ptr(), sm.data_ptr(), slots.data_ptr(),
                         pos32.data_ptr(), self.stream())
        self._keep = (k, v, sm, slots, pos32)

    def tail_len(self):
        """Tokens the fill appends after tiling: the recent window, so that the window entries of
        the state are the positions just before the decode step's token, as after a real
        prefill (tiled pages alone would leave the prompt's window in the state)."""
        return max(self.cfg.n_window, 1)

    def tile_pages(self, layer, batch, calib_pages):
        """Fill pages [calib_pages, P) of sequences 0..batch-1 at `layer` with copies of their
        first calib_pages pages (same sequence, same calibration), so a prompt shorter than the
        context stands for the whole context. Pages are the outermost index of every plane, so
        a page is a contiguous block of plane_bytes / num_pages bytes."""
        L = self.layout
        if calib_pages >= self.pp:
            return
        base = layer * L.layer_plane_bytes
        for p in range(S.SIKV_NUM_PLANES):
            if not L.plane_bytes[p]:
                continue
            stride = L.plane_bytes[p] // L.num_pages
            assert stride * L.num_pages == L.plane_bytes[p] and stride == L.row_bytes[p] * self.page * self.hkv, \
                f"plane {S.PLANE_NAMES[p]}: {L.plane_bytes[p]} bytes is not num_pages x page blocks"
            off = base + L.plane_offset[p]
            view = self.planes[off:off + batch * self.pp * stride].view(batch, self.pp, stride)
            start = calib_pages
            while start < self.pp:
                n = min(start, self.pp - start)  # doubling: copy what is filled so far
                view[:, start:start + n].copy_(view[:, :n])
                start += n

    def set_batch(self, batch):
        """Per-step device arrays for sequences 0..batch-1: append targets (slot_mapping,
        seq_slot, position = n_ctx-1) and the CSR page table of n_ctx tokens."""
        t = self.torch
        assert 1 <= batch <= self.max_batch
        i32 = dict(dtype=t.int32, device=self.dev)
        pos = self.n_ctx - 1
        self.b_slots = t.arange(batch, **i32)
        self.b_pos = t.full((batch,), pos, **i32)
        self.b_sm = t.tensor([S.slot_of(b, pos, self.pp, self.page) for b in range(batch)], dtype=t.int64, device=self.dev)
        indptr, indices, last = S.contiguous_pages(batch, self.n_ctx, self.page)
        self.t_indptr, self.t_indices, self.t_last = (t.tensor(x, **i32) for x in (indptr, indices, last))
        self.table = S.page_table(self.t_indptr.data_ptr(), self.t_indices.data_ptr(), self.t_last.data_ptr(), batch)
        self.batch = batch

    def attend(self, layer, q, k, v, dense=False, out=None):
        """One decode step at `layer` for the current batch: append k, v [B, hkv, d] at position
        n_ctx-1, then sikv_kernel_decode (select + attend) of q [B, hq, d]. Returns out
        [B, hq * d] (written into `out` [B, hq, d] when given). All on torch's current stream, so it can be captured in a CUDA graph."""
        t = self.torch
        B = self.batch
        k, v, q = k.contiguous(), v.contiguous(), q.contiguous()
        st = self.stream()
        self.kern.append(self.pools[layer], B, k.data_ptr(), v.data_ptr(), self.b_sm.data_ptr(), self.b_slots.data_ptr(),
                         self.b_pos.data_ptr(), st)
        if out is None:
            out = t.empty((B, self.hq, self.d), dtype=q.dtype, device=self.dev)
        fn = self.kern.attend_dense if dense else self.kern.decode
        fn(self.pools[layer], self.table, self.b_slots.data_ptr(), q.data_ptr(), out.data_ptr(), self.ws.data_ptr(),
           self.ws_bytes, st)
        return out.view(B, self.hq * self.d)

    def close(self):
        self.kern.close()
        self.planes = self.state = self.ws = None


def reference_attention(torch, q, K, V):
    """float32 softmax attention of one query per sequence: q [B, hq, d], K, V [B, N, hkv, d];
    query head h reads KV head h // (hq / hkv). Returns [B, hq, d] float32."""
    B, hq, d = q.shape
    g = hq // K.shape[2]
    Kf = K.float().repeat_interleave(g, dim=2).permute(0, 2, 1, 3)  # [B, hq, N, d]
    Vf = V.float().repeat_interleave(g, dim=2).permute(0, 2, 1, 3)
    s = torch.einsum("bhd,bhnd->bhn", q.float(), Kf) / math.sqrt(d)
    return torch.einsum("bhn,bhnd->bhd", torch.softmax(s, dim=-1), Vf)


def rel_err(torch, out, ref):
    """Worst relative L2 error over sequences."""
    o, r = out.float().reshape(out.shape[0], -1), ref.float().reshape(ref.shape[0], -1)
    return max((torch.linalg.vector_norm(o[b] - r[b]) / torch.linalg.vector_norm(r[b])).item() for b in range(o.shape[0]))
