"""Payload types side by side: torch bf16 vs numpy float32 (vs ml_dtypes bf16), in one run.

    python -m benchmarks.payload_bench [--sizes 64KiB,1MiB,16MiB] [--reps 5] [--seconds 0.2] [--markdown]

For each size S (every variant moves exactly S bytes), in one process, on one
ring (``RingBuffer.create(..., slots=4, slot_bytes=S + 64 KiB)``):

  put    memcpy        ``np.copyto(dst, src)`` of S bytes between two warm buffers (the reference)
         numpy-f32     ``ring.put({"x": a})``, ``a`` a float32 numpy array of S/4 elements
         np-bf16       ``ring.put({"x": b})``, ``b`` an ml_dtypes bfloat16 numpy array of S/2 elements
         torch-bf16    ``ring.put({"x": t})``, ``t`` a torch.bfloat16 CPU tensor of S/2 elements
                       (converted to an ml_dtypes numpy view, copied once into the slot)
         Freeing the slots again (claim + ack) is not timed.
  read   numpy         ``with ring.claim() as lease: x = lease.payload["x"]; float(x[0])``
         to_torch      ``with ring.claim() as lease: x = lease.payload.to_torch()["x"]; float(x[0])``
         Both read the same bf16 payload; the touch (one element) is the same for both, so the
         figure is the access overhead (claim, decode, view, ack), not compute. Refilling the
         ring is not timed.
  pack   numpy         as read, then ``np.copyto(dst, x)``: every byte copied into a batch buffer
         to_torch      as read, then ``dst_t.copy_(x)``: what a data packer does with the tensor

Every variant runs in every repetition, interleaved (noise on a shared box hits all alike);
a repetition's figure is the median over ``--seconds`` of single operations. Reported: the
best repetition, and [min-max] over repetitions.

Ratios (each names what it divides; all are "torch speed relative to numpy", target >= 0.9x):
  put  torch-bf16/numpy-f32 = put GB/s of the torch bf16 tensor / put GB/s of the float32 array
  put  torch-bf16/np-bf16   = put GB/s of the torch bf16 tensor / put GB/s of the ml_dtypes bf16 array
  read to_torch/numpy       = reads/s through to_torch() / reads/s through the numpy view
                            = (numpy read us) / (to_torch read us)
  pack to_torch/numpy       = (numpy pack us) / (to_torch pack us)

Without torch the torch columns read "n/a" (and the run still exits 0).
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import sys
import time
import uuid

import ml_dtypes
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from shm import RingBuffer  # noqa: E402
from ucxx_transport.units import format_size, parse_size  # noqa: E402

try:
    import torch
except ImportError:  # pragma: no cover - depends on the environment
    torch = None

SLOTS = 4
TARGET = 0.9


def _touch(v) -> float:
    """The same small access for every read variant: one element."""
    return float(v[0])


def _rep_median(op, before, seconds: float, min_iters: int = 5) -> float:
    """Median seconds of one ``op()`` over about ``seconds`` (``before()`` untimed before each)."""
    samples = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(samples) < min_iters:
        before()
        t0 = time.perf_counter()
        op()
        samples.append(time.perf_counter() - t0)
    return float(np.median(samples))


def _drain(ring: RingBuffer) -> None:
    while ring.ready_count():
        ring.claim(timeout=0).ack()


def measure(size: int, reps: int, seconds: float) -> dict:
    """Per variant, the per-repetition median seconds of one operation (lists of ``reps``)."""
    if size % 4 or size < 4:
        raise ValueError(f"size {size} must be a positive multiple of 4 bytes")
    name = f"payload-bench-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    ring = RingBuffer.create(name, slots=SLOTS, slot_bytes=size + (1 << 16))
    try:
        rng = np.random.default_rng(0)
        f32 = rng.standard_normal(size // 4, dtype=np.float32)
        bf16 = rng.standard_normal(size // 2, dtype=np.float32).astype(ml_dtypes.bfloat16)
        src = np.full(size, 7, np.uint8)
        dst = np.ones(size, np.uint8)
        assert f32.nbytes == bf16.nbytes == size
        tens = None
        if torch is not None:
            tens = torch.randn(size // 2, dtype=torch.bfloat16)
            assert tens.numel() * tens.element_size() == size

        p_f32, p_bf16, p_torch = {"x": f32}, {"x": bf16}, ({"x": tens} if tens is not None else None)

        def free_one():
            if ring.ready_count() == SLOTS:
                _drain(ring)

        def refill():
            if not ring.ready_count():
                for _ in range(SLOTS):
                    ring.put(p_bf16)

        def read_numpy():
            with ring.claim(timeout=0) as lease:
                x = lease.payload["x"]
                _touch(x)

        def read_torch():
            with ring.claim(timeout=0) as lease:
                x = lease.payload.to_torch()["x"]
                _touch(x)

        pack_np = np.empty(size // 2, ml_dtypes.bfloat16)
        pack_t = torch.empty(size // 2, dtype=torch.bfloat16) if torch is not None else None

        def pack_numpy():
            with ring.claim(timeout=0) as lease:
                np.copyto(pack_np, lease.payload["x"])

        def pack_torch():
            with ring.claim(timeout=0) as lease:
                pack_t.copy_(lease.payload.to_torch()["x"])

        nothing = lambda: None  # noqa: E731
        variants = {
            "memcpy": (lambda: np.copyto(dst, src), nothing, "put"),
            "put_numpy_f32": (lambda: ring.put(p_f32), free_one, "put"),
            "put_np_bf16": (lambda: ring.put(p_bf16), free_one, "put"),
        }
        if p_torch is not None:
            variants["put_torch_bf16"] = (lambda: ring.put(p_torch), free_one, "put")
        variants["read_numpy"] = (read_numpy, refill, "read")
        if p_torch is not None:
            variants["read_to_torch"] = (read_torch, refill, "read")
        variants["pack_numpy"] = (pack_numpy, refill, "read")
        if p_torch is not None:
            variants["pack_to_torch"] = (pack_torch, refill, "read")

        # sanity: the torch put round-trips to the same bits, and to_torch is zero-copy bf16
        if p_torch is not None:
            _drain(ring)
            ring.put(p_torch)
            with ring.claim(timeout=0) as lease:
                back = lease.payload.to_torch()["x"]
                assert back.dtype == torch.bfloat16 and torch.equal(back, tens)
                assert lease.payload["x"].dtype == ml_dtypes.bfloat16
                del back
        _drain(ring)

        out = {k: [] for k in variants}
        for op, before, _ in variants.values():  # warm-up, untimed
            _rep_median(op, before, 0.0, min_iters=3)
        for _ in range(reps):
            for name_, (op, before, kind) in variants.items():
                if kind == "put":
                    _drain(ring)
                gc.collect()
                out[name_].append(_rep_median(op, before, seconds))
        _drain(ring)
        return {"size": size, "times": out}
    finally:
        ring.close()
        ring.unlink()


def _summary(row: dict) -> dict:
    size, t = row["size"], row["times"]
    s: dict = {"size": size}
    for k, v in t.items():
        v = np.asarray(v)
        if k.startswith(("read", "pack")):
            s[k] = (v.min() * 1e6, v.min() * 1e6, v.max() * 1e6)  # us: best, min, max
        else:
            g = size / v / 1e9
            s[k] = (g.max(), g.min(), g.max())  # GB/s: best, min, max

    def ratio(num: str, den: str):
        if num not in t or den not in t:
            return None
        a, b = np.asarray(t[num]), np.asarray(t[den])
        per_rep = b / a  # speed of num relative to den, per repetition
        return (b.min() / a.min(), per_rep.min(), per_rep.max())

    s["ratio_put_torch_vs_numpy_f32"] = ratio("put_torch_bf16", "put_numpy_f32")
    s["ratio_put_torch_vs_np_bf16"] = ratio("put_torch_bf16", "put_np_bf16")
    s["ratio_put_np_bf16_vs_numpy_f32"] = ratio("put_np_bf16", "put_numpy_f32")
    s["ratio_put_numpy_f32_vs_memcpy"] = ratio("put_numpy_f32", "memcpy")
    s["ratio_read_to_torch_vs_numpy"] = ratio("read_to_torch", "read_numpy")
    s["ratio_pack_to_torch_vs_numpy"] = ratio("pack_to_torch", "pack_numpy")
    return s


def _cell(v, fmt: str) -> str:
    if v is None:
        return "n/a"
    best, lo, hi = v
    return f"{best:{fmt}} [{lo:{fmt}}-{hi:{fmt}}]"


COLUMNS = [
    ("size", None, None),
    ("put numpy-f32 GB/s", "put_numpy_f32", ".2f"),
    ("put torch-bf16 GB/s", "put_torch_bf16", ".2f"),
    ("put torch-bf16/numpy-f32", "ratio_put_torch_vs_numpy_f32", ".2f"),
    ("put np-bf16 GB/s", "put_np_bf16", ".2f"),
    ("put torch-bf16/np-bf16", "ratio_put_torch_vs_np_bf16", ".2f"),
    ("memcpy GB/s", "memcpy", ".2f"),
    ("read numpy us", "read_numpy", ".1f"),
    ("read to_torch us", "read_to_torch", ".1f"),
    ("read to_torch/numpy (reads/s)", "ratio_read_to_torch_vs_numpy", ".2f"),
    ("pack numpy us", "pack_numpy", ".1f"),
    ("pack to_torch us", "pack_to_torch", ".1f"),
    ("pack to_torch/numpy (packs/s)", "ratio_pack_to_torch_vs_numpy", ".2f"),
]


def _rows(summaries: list[dict]) -> list[list[str]]:
    rows = []
    for s in summaries:
        rows.append([format_size(s["size"])] + [_cell(s.get(k), f) for _, k, f in COLUMNS[1:]])
    return rows


def print_table(summaries: list[dict], markdown: bool) -> None:
    heads = [c[0] for c in COLUMNS]
    rows = _rows(summaries)
    if markdown:
        print("| " + " | ".join(heads) + " |")
        print("|" + "---|" * len(heads))
        for r in rows:
            print("| " + " | ".join(r) + " |")
        return
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(heads)]
    print("  ".join(h.rjust(w) for h, w in zip(heads, widths)))
    for r in rows:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))


def _verdict(v) -> str:
    if v is None:
        return "n/a (torch is not installed)"
    best, lo, hi = v
    return (f"{best:.2f}x  (per repetition {lo:.2f}-{hi:.2f}x; target >= {TARGET}x: "
            f"{'met' if best >= TARGET else 'MISSED'})")


def print_ratios(summaries: list[dict]) -> None:
    for s in summaries:
        sz = format_size(s["size"])
        print(f"ratio put  {sz:>6}: torch-bf16 GB/s / numpy-f32 GB/s = "
              f"{_verdict(s['ratio_put_torch_vs_numpy_f32'])}")
        print(f"ratio put  {sz:>6}: torch-bf16 GB/s / np-bf16 GB/s   = "
              f"{_verdict(s['ratio_put_torch_vs_np_bf16'])}")
        print(f"ratio read {sz:>6}: to_torch reads/s / numpy reads/s = numpy us / to_torch us = "
              f"{_verdict(s['ratio_read_to_torch_vs_numpy'])}")
        print(f"ratio pack {sz:>6}: to_torch+copy_ packs/s / numpy+copyto packs/s = "
              f"{_verdict(s['ratio_pack_to_torch_vs_numpy'])}")


def machine() -> str:
    tv = torch.__version__ if torch is not None else "not installed"
    return (f"{os.cpu_count()} CPUs, {platform.platform()}, Python {platform.python_version()}, "
            f"numpy {np.__version__}, ml_dtypes {ml_dtypes.__version__}, torch {tv}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.payload_bench", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="64KiB,1MiB,16MiB",
                    help="comma-separated payload sizes in bytes, units KiB/MiB/GiB allowed; each a multiple "
                         "of 4 (default: %(default)s)")
    ap.add_argument("--reps", type=int, default=5,
                    help="repetitions; the best is reported, with [min-max] across them (default: %(default)s)")
    ap.add_argument("--seconds", type=float, default=0.2,
                    help="time per variant per repetition; its median single operation is the "
                         "repetition's figure (default: %(default)s)")
    ap.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    a = ap.parse_args(argv)
    if a.reps < 1:
        ap.error("--reps must be >= 1")
    try:
        sizes = [parse_size(s.strip()) for s in a.sizes.split(",") if s.strip()]
    except ValueError as exc:
        ap.error(str(exc))
    for s in sizes:
        if s < 4 or s % 4:
            ap.error(f"size {s} must be a positive multiple of 4 bytes")

    print(f"machine: {machine()}")
    print(f"command: python -m benchmarks.payload_bench --sizes {a.sizes} --reps {a.reps} --seconds {a.seconds}")
    if torch is None:
        print("torch is not installed: the torch columns are skipped (n/a); install torch to measure them")
    summaries = [_summary(measure(s, a.reps, a.seconds)) for s in sizes]
    print(f"best of {a.reps} repetitions [min-max across repetitions]; GB/s: higher is better, us: lower is better")
    print_table(summaries, a.markdown)
    print_ratios(summaries)
    return 0


if __name__ == "__main__":
    sys.exit(main())
