#!/usr/bin/env python3
"""Device time of every kernel under scripts/bench/append_calibrate.py's calibrate bench at one
length, from the PyTorch profiler (CUPTI), summed by kernel name: which calibrate stage takes
the time. Run on the GPU machine from the repository root.

usage: calibrate_kernels.py [--lib .gpu/libselfindexkv.so] [--n 8192]
The append bench runs first (its setup calibrates once more), so each calibrate kernel is
counted one more time than the bench's warm-up and iterations.
"""
import argparse
import runpy
import sys


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lib", default=".gpu/libselfindexkv.so")
    ap.add_argument("--n", default="8192")
    a = ap.parse_args()
    from torch.profiler import ProfilerActivity, profile

    sys.argv = ["append_calibrate.py", "--lib", a.lib, "--batches", "1", "--lengths", a.n, "--quick"]
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        try:
            runpy.run_path("scripts/bench/append_calibrate.py", run_name="__main__")
        except SystemExit:
            pass
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=50))


if __name__ == "__main__":
    main()
