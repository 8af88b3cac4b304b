"""Element types a payload field may have, and how they are named in a frame.

Every numeric numpy dtype (bool, int, uint, float, complex) is recorded by its
``dtype.str`` (``"<f4"``). The machine-learning types numpy lacks -- bfloat16,
the float8/float6/float4 family, int4/int2 -- come from ``ml_dtypes`` (the
numpy extension JAX uses) and are recorded by *name* (``"bfloat16"``), so a
reader without torch still gets a correct numpy array of the right type.
``ml_dtypes`` is imported on first need (its import takes about a second): a
process that never meets one of its types never pays for it.

Tensors of other libraries are converted here too, without copying data:
torch CPU tensors (any dtype, non-contiguous, ``requires_grad``) become numpy
views; :func:`to_torch` turns a numpy view back into a torch tensor sharing its
memory (bf16/fp8 included). torch is imported only when a torch object is seen.
"""

from __future__ import annotations

import re
import sys
import warnings
from typing import Any

import numpy as np

#: numpy dtype kinds recorded by dtype.str: bool, signed, unsigned, float, complex
NUMERIC_KINDS = frozenset("biufc")

_ML_NAMES = (
    "bfloat16", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e4m3b11fnuz",
    "float8_e3m4", "float8_e4m3", "float8_e8m0fnu", "float6_e2m3fn", "float6_e3m2fn", "float4_e2m1fn",
    "int4", "uint4", "int2", "uint2",
)
#: ml_dtypes types by the name a frame records (those this ml_dtypes version has), once loaded
_ML: dict[str, np.dtype] = {}
_ML_BY_DTYPE: dict[np.dtype, str] = {}


def ml_dtypes_by_name() -> dict[str, np.dtype]:
    """The ml_dtypes types by the name a frame records (imports ml_dtypes once)."""
    if not _ML:
        import ml_dtypes

        found = {n: np.dtype(getattr(ml_dtypes, n)) for n in _ML_NAMES if hasattr(ml_dtypes, n)}
        _ML_BY_DTYPE.update({dt: name for name, dt in found.items()})
        _ML.update(found)
    return _ML


def _ml_name(dtype: np.dtype) -> str | None:
    """The recorded name of an ml_dtypes type, None for any other dtype. numpy's own types
    never are one (ml_dtypes' are user-defined: ``isbuiltin`` 2); an ml_dtypes array
    exists only once ml_dtypes is imported."""
    if dtype.isbuiltin != 2 or "ml_dtypes" not in sys.modules:
        return None
    ml_dtypes_by_name()
    return _ML_BY_DTYPE.get(dtype)

#: torch dtype name -> the ml_dtypes name of the same bits (torch's own numpy() cannot export these)
_TORCH_TO_ML = {
    "bfloat16": "bfloat16", "float8_e4m3fn": "float8_e4m3fn", "float8_e5m2": "float8_e5m2",
    "float8_e4m3fnuz": "float8_e4m3fnuz", "float8_e5m2fnuz": "float8_e5m2fnuz", "float8_e8m0fnu": "float8_e8m0fnu",
}
_SAME_WIDTH_INT = {1: np.uint8, 2: np.int16, 4: np.int32, 8: np.int64}
#: torch dtype -> (torch int dtype of the same width, ml_dtypes dtype), or () for torch's own numpy types
_TORCH_VIA: dict = {}
#: numpy dtype -> (numpy dtype viewed as for torch.from_numpy, torch dtype of the tensor's view); see to_torch
_NUMPY_TO_TORCH: dict = {}
_from_numpy = None  # torch.from_numpy, once torch is loaded and its read-only warning silenced


def is_supported(dtype: np.dtype) -> bool:
    """Can a field hold elements of ``dtype``?"""
    if _ml_name(dtype) is not None:
        return True
    return dtype.kind in NUMERIC_KINDS and dtype.fields is None and dtype.subdtype is None


def check(dtype: np.dtype, name: str) -> np.dtype:
    """``dtype`` if a field may hold it, else a TypeError naming the field and what is accepted."""
    if not is_supported(dtype):
        raise TypeError(
            f"field {name!r}: dtype {dtype} is not supported; use a numeric dtype (bool, int, uint, float, "
            f"complex) or one of ml_dtypes' {', '.join(ml_dtypes_by_name())}"
        )
    return dtype


def encode_name(dtype: np.dtype) -> str:
    """The name a frame records for ``dtype``."""
    return _ml_name(dtype) or dtype.str


_DECODED: dict[bytes, np.dtype] = {}
#: the names encode_name writes for numpy's own types (``dtype.str``: byte order, kind, size);
#: nothing else reaches ``np.dtype``, whose parser of other strings (comma lists, subarrays)
#: raises what it likes on damaged text (SyntaxError for "01")
_NUMPY_NAME = re.compile(r"[<>|=]?[biufc][0-9]{1,2}")


def decode_name(code: bytes) -> np.dtype:
    """The dtype a frame's recorded name stands for (ValueError/TypeError if none)."""
    dt = _DECODED.get(code)
    if dt is None:
        text = code.decode("ascii")
        dt = ml_dtypes_by_name().get(text) if text in _ML_NAMES else None
        if dt is None:
            if not _NUMPY_NAME.fullmatch(text):
                raise ValueError(f"dtype {text!r} is not a field type")
            dt = np.dtype(text)
            if dt.kind not in NUMERIC_KINDS:  # a bare "V2" or "O" is never a field type
                raise TypeError(f"dtype {text!r} is not a field type")
        if len(_DECODED) < 1024:
            _DECODED[code] = dt
    return dt


# ------------------------------------------------------------------ torch --
def is_torch(value: Any) -> bool:
    return type(value).__module__.partition(".")[0] == "torch"


def is_cupy(value: Any) -> bool:
    return type(value).__module__.partition(".")[0] == "cupy"


def torch_as_numpy(t) -> np.ndarray:
    """A numpy view of CPU tensor ``t`` (no copy): detached, any strides, bf16/fp8 as
    ml_dtypes. A CUDA tensor is copied to host once (use cupy for a copy straight
    into the slot)."""
    import torch

    if not isinstance(t, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(t).__name__}")
    if t.requires_grad:
        t = t.detach()
    if not t.is_cpu:
        t = t.detach().cpu()
    if t.is_conj() or t.is_neg():
        t = t.resolve_conj().resolve_neg()
    via = _TORCH_VIA.get(t.dtype)
    if via is None:
        ml = _TORCH_TO_ML.get(str(t.dtype).removeprefix("torch."))
        if ml is None:
            via = _TORCH_VIA[t.dtype] = ()
        elif ml not in ml_dtypes_by_name():
            raise TypeError(f"torch dtype {t.dtype} needs a newer ml_dtypes (has {', '.join(ml_dtypes_by_name())})")
        else:
            dt = ml_dtypes_by_name()[ml]
            via = _TORCH_VIA[t.dtype] = (getattr(torch, np.dtype(_SAME_WIDTH_INT[dt.itemsize]).name), dt)
    if via:
        return t.view(via[0]).numpy().view(via[1])
    try:
        return t.numpy()
    except TypeError as exc:
        raise TypeError(f"torch dtype {t.dtype} cannot be stored in a payload: {exc}") from None


def _torch_view_of(dtype: np.dtype) -> tuple:
    """How a numpy array of ``dtype`` becomes a torch tensor: (the numpy dtype to view
    it as for ``torch.from_numpy``, the torch dtype to view the tensor as), or (None,
    None) for numpy's own types; cached per dtype."""
    spec = _NUMPY_TO_TORCH.get(dtype)
    if spec is None:
        import torch

        ml = _ml_name(dtype)
        if ml is None:
            spec = (None, None)
        elif getattr(torch, ml, None) is None:
            raise TypeError(f"torch has no {ml} dtype; read this field as numpy")
        else:
            spec = (_SAME_WIDTH_INT[dtype.itemsize], getattr(torch, ml))
        _NUMPY_TO_TORCH[dtype] = spec
    return spec


def to_torch(arr: np.ndarray, device: str | None = None):
    """A torch tensor sharing ``arr``'s memory (bf16/fp8 included); with ``device``
    (e.g. "cuda") a copy on that device. A read-only view becomes a tensor that
    must not be written to (torch has no read-only tensors)."""
    global _from_numpy
    if type(arr) is np.ndarray:  # the common case first: this runs per field per payload read
        as_np, as_torch = _torch_view_of(arr.dtype)
        if _from_numpy is None:  # views of shared memory are read-only on purpose; torch has no such flag
            import torch

            warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)
            _from_numpy = torch.from_numpy
        t = _from_numpy(arr if as_np is None else arr.view(as_np))
        if as_torch is not None:
            t = t.view(as_torch)
        return t if device is None or device == "cpu" else t.to(device)
    import torch

    if isinstance(arr, torch.Tensor):
        return arr if device is None or device == "cpu" else arr.to(device)
    if isinstance(arr, np.ndarray):  # a subclass of ndarray
        return to_torch(np.asarray(arr), device)
    return torch.from_dlpack(arr)  # device memory (cupy): shared through DLPack, no copy
