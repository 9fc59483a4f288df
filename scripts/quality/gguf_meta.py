#!/usr/bin/env python3
"""Print the scalar metadata of a GGUF file (no dependencies).

Usage: gguf_meta.py MODEL.gguf [KEY_PREFIX ...]
Arrays are summarised by type and length (tokenizer vocabularies are long).
"""
import struct
import sys

SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def read_meta(path):
    out = {}
    with open(path, "rb") as f:
        def rd(fmt):
            n = struct.calcsize("<" + fmt)
            return struct.unpack("<" + fmt, f.read(n))[0]

        def rstr():
            n = rd("Q")
            return f.read(n).decode("utf-8", "replace")

        def rval(t):
            if t in SCALARS:
                return rd(SCALARS[t])
            if t == 8:
                return rstr()
            if t == 9:
                et = rd("I")
                n = rd("Q")
                if et == 8:
                    for _ in range(n):
                        rstr()
                elif et in SCALARS:
                    f.seek(n * struct.calcsize("<" + SCALARS[et]), 1)
                else:
                    raise ValueError("nested array")
                return f"<array type={et} len={n}>"
            raise ValueError(f"unknown GGUF type {t}")

        if f.read(4) != b"GGUF":
            raise ValueError("not a GGUF file")
        version = rd("I")
        n_tensors = rd("Q")
        n_kv = rd("Q")
        out["GGUF.version"] = version
        out["GGUF.tensor_count"] = n_tensors
        for _ in range(n_kv):
            key = rstr()
            out[key] = rval(rd("I"))
    return out


def main():
    meta = read_meta(sys.argv[1])
    prefixes = sys.argv[2:]
    for k, v in meta.items():
        if prefixes and not any(k.startswith(p) for p in prefixes):
            continue
        print(f"{k} = {v}")


if __name__ == "__main__":
    main()
