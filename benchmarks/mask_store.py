"""Benchmark: why compiled DGL+MAN is no faster than eager on a CPU — the generated kernels' stores of boolean masks.

Compiles DGL+MAN (``--train.compile=default``, as ``benchmarks/compile_speed.py`` does), then looks through every
kernel inductor generated for it for stores of a ``VecMask<float,1>`` into a ``bool*`` output (the ReLU masks that
AOTAutograd saves for the backward pass of a ReLU whose output nothing else keeps). Each such kernel is timed on the
arguments it really received in a training step, three ways, recompiled from its own source each time:

* ``generated``: as inductor wrote it;
* ``without mask stores``: the two-line change that drops the stores (wrong results: it only shows their cost);
* ``AVX-512 mask store``: each store written as a compare-to-mask and one masked byte store
  (``_mm512_movepi32_mask`` and ``_mm_maskz_set1_epi8``: the same bytes, 1 or 0).

If the first is much slower than the other two, ATen's generic ``VecMask<float,1>::store(bool*)`` is the cost — a
PyTorch issue (torch 2.14.1 here), outside this library, and the lead for whoever reports it upstream. Needs an
AVX-512 CPU for the third variant.

    OMP_NUM_THREADS=2 python benchmarks/mask_store.py --method dgl+man
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import statistics
import time

import torch
from torch._inductor.async_compile import AsyncCompile
from torch._inductor.codecache import PyCodeCache

from locallearn import LocalLearner, create_model

STORE = re.compile(r"(tmp\d+)\.store\((out_ptr\d+) \+ (static_cast<int64_t>\([^;]*?\)), static_cast<int64_t>\(16\)\);")
AVX512 = (
    r"{ __mmask16 k_ = _mm512_movepi32_mask(_mm512_castps_si512(__m512(at::vec::Vectorized<float>(\1))));"
    r" _mm_storeu_si128((__m128i*)(\2 + \3), _mm_maskz_set1_epi8(k_, 1)); }"
)


PREFIX = "#include <torch/csrc/inductor/cpp_prefix.h>"


def capturing(kernel, key: str, captured: dict[str, list]):
    """``kernel``, keeping a copy of the arguments of its first call under ``key``."""

    def wrapper(*args):
        captured.setdefault(key, [t.clone() if isinstance(t, torch.Tensor) else t for t in args])
        return kernel(*args)

    return wrapper


def mask_kernels(module) -> dict[str, tuple[list[str], str]]:
    """name → (argument types, C++ source) of the module's kernels that store a float mask into a bool output."""
    text = open(module.__file__).read()
    found = {}
    for m in re.finditer(r"^(\w+) = async_compile\.cpp_pybinding\((\[.*?\]), r'''(.*?)'''\)", text, re.S | re.M):
        name, types, src = m.group(1), ast.literal_eval(m.group(2)), m.group(3)  # the argument types inductor wrote
        if "bool*" in types and "VecMask<float,1>" in src and STORE.search(src):
            found[name] = (types, src)
    return found


def timed(fn, args: list, repeats: int) -> float:
    for _ in range(2):
        fn(*args)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--method", default="dgl+man")
    p.add_argument("--K", type=int, default=4)
    p.add_argument("--arch", default="resnet32")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--repeats", type=int, default=15)
    args = p.parse_args()
    shape = (3, 32, 32)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.rand(args.batch_size, *shape, generator=gen), torch.randint(0, 10, (args.batch_size,), generator=gen)
    torch.manual_seed(0)
    learner = LocalLearner(create_model(args.arch), args.method, args.K, input_shape=shape, compile="default",
                           channels_last=True, check_every=0)  # fmt: skip
    learner.train_step(x, y)  # compiles every block's forward and backward

    # the real arguments of each mask-storing kernel: wrap it in its module, run one more step
    captured: dict[str, list] = {}
    kernels = {}
    for module in list(PyCodeCache.modules):
        for name, (types, src) in mask_kernels(module).items():
            key = f"{module.__file__.rsplit('/', 1)[-1]}:{name}"
            kernels[key] = (types, src)
            setattr(module, name, capturing(getattr(module, name), key, captured))
    learner.train_step(x, y)

    compiler = AsyncCompile()
    rows = []
    for key, (types, src) in kernels.items():
        if key not in captured:
            continue
        variants = {
            "generated": src,
            "without mask stores": STORE.sub("", src),
            "AVX-512 mask store": STORE.sub(AVX512, src).replace(
                "#include <torch/csrc/inductor/cpp_prefix.h>",
                "#include <torch/csrc/inductor/cpp_prefix.h>\n#include <immintrin.h>",
            ),
        }
        row = {"kernel": key, "mask_stores": len(STORE.findall(src))}
        for label, source in variants.items():
            fn = compiler.cpp_pybinding(types, source)
            fn = fn.result() if hasattr(fn, "result") else fn
            row[f"{label} ms"] = round(1e3 * timed(fn, captured[key], args.repeats), 2)
        rows.append(row)
    print(json.dumps({"method": args.method, "threads": torch.get_num_threads(), "torch": torch.__version__,
                      "kernels": rows}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
