"""Regenerate ``tests/loading/data/kquants_reference.npz``: llama.cpp's K-quant bytes for fixed inputs.

``sd35.loading.gguf_kquants`` quantizes Q4_K, Q5_K and Q6_K in torch as ggml's reference C code does
(``quantize_row_q{4,5,6}_K_ref`` in ``ggml/src/ggml-quants.c``), and the ``gguf`` package has no K-quant
quantizer to compare with. So this script compiles that C file from a ggml source tree (ggml-org/ggml, or the
copy vendored in llama.cpp or stable-diffusion.cpp), runs it on seeded random rows plus the blocks a quantizer
can get wrong (zeros, constants, one sign, tiny and rounded values), and stores inputs and bytes; the test
(``tests/loading/test_gguf_writer.py``) needs no compiler. The C is built with ``gcc -O2`` for plain x86-64,
which has no fused multiply-add, so each operation rounds as the source says (a ``-march=native`` build of
llama.cpp may fuse some and differ in rare last bits). Run from the repository root::

    python scripts/kquant_reference.py --ggml ~/src/ggml
"""

from __future__ import annotations

import argparse
import ctypes
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

OUT = Path("tests/loading/data/kquants_reference.npz")
TYPES = {"Q4_K": 144, "Q5_K": 176, "Q6_K": 210}  # bytes per 256-value block
STUBS = r"""
#include <stdio.h>
#include <stdlib.h>
#include <stddef.h>
#include <stdint.h>
void ggml_abort(const char * file, int line, const char * fmt, ...) { fprintf(stderr, "%s:%d\n", file, line); abort(); }
void ggml_log_internal(int level, const char * fmt, ...) {}
const char * ggml_type_name(int t) { return "?"; }
size_t ggml_type_size(int t) { return 0; }
size_t ggml_row_size(int t, int64_t n) { return 0; }
"""


def inputs(seed: int = 0) -> np.ndarray:
    """24 rows of 512 values (48 blocks): random rows of mixed scales, and the awkward blocks."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((24, 512)) * rng.exponential(1.0, (24, 1))).astype(np.float32)
    x[0, :256] = 0  # an empty block
    x[1, :256] = 0.5  # a constant
    x[2, :32] = 0  # an empty sub-block
    x[3, :256] = -0.25  # a negative constant
    x[4, :16] = 1e-20  # values below any scale
    x[5] = np.abs(x[5])  # one sign
    x[6] = -np.abs(x[6])
    x[7] = np.round(x[7] * 4) / 4  # many ties
    x[8, :256] = np.geomspace(1e-6, 1e3, 256, dtype=np.float32)  # a huge range
    return x


def build(ggml: Path, work: Path) -> ctypes.CDLL:
    src = ggml / "src" if (ggml / "src" / "ggml-quants.c").exists() else ggml / "ggml" / "src"
    include = src.parent / "include"
    (work / "stubs.c").write_text(STUBS)
    lib = work / "libquants.so"
    subprocess.run(
        ["gcc", "-O2", "-fPIC", "-shared", "-std=gnu11", "-DNDEBUG", f"-I{include}", f"-I{src}",
         str(src / "ggml-quants.c"), str(work / "stubs.c"), "-o", str(lib), "-lm"],
        check=True,
    )  # fmt: skip
    return ctypes.CDLL(str(lib))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--ggml", type=Path, required=True, help="a ggml source tree (with src/ggml-quants.c)"
    )
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--commit", default=None, help="the tree's commit, where it is not a git checkout")
    args = parser.parse_args()
    x = np.ascontiguousarray(inputs())
    out = {"inputs": x}
    with tempfile.TemporaryDirectory() as tmp:
        lib = build(args.ggml, Path(tmp))
        for name, size in TYPES.items():
            quantize = getattr(lib, f"quantize_row_{name[:2].lower()}_K_ref")
            raw = np.zeros(x.size // 256 * size, dtype=np.uint8)
            quantize(
                x.ctypes.data_as(ctypes.c_void_p), raw.ctypes.data_as(ctypes.c_void_p), ctypes.c_int64(x.size)
            )
            out[name] = raw
    commit = subprocess.run(
        ["git", "-C", str(args.ggml), "rev-parse", "HEAD"], capture_output=True, text=True
    )
    out["ggml_commit"] = np.array(args.commit or commit.stdout.strip() or "unknown")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **out)
    print(f"wrote {args.out} from {args.ggml} ({out['ggml_commit']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
