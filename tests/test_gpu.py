"""GPU receive path (device='cuda'): skipped cleanly without cupy or a CUDA device."""

import numpy as np
import pytest

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(180)]


def _cupy():
    try:
        import cupy
    except Exception:
        pytest.skip("cupy is not installed")
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            pytest.skip("no CUDA device")
    except Exception as exc:
        pytest.skip(f"no usable CUDA device ({exc})")
    return cupy


def test_fetch_into_device_memory(make_ring, ring_name, serve):
    cupy = _cupy()
    from clients import TransportClient

    ring = make_ring(slots=8, slot_bytes=8 << 20)
    serve(ring_name)
    rng = np.random.default_rng(0)
    payload = {"tokens": rng.integers(0, 50000, size=100_000, dtype=np.int32),
               "logprobs": rng.standard_normal((1000, 17)).astype(np.float32),
               "reward": np.float64(0.5)}
    refs = [ring.put(payload, meta={"i": i}) for i in range(3)]
    with TransportClient(device="cuda", local_fast_path=False) as c:
        p = c.fetch(refs[0])
        assert isinstance(p["tokens"], cupy.ndarray)
        assert p["tokens"].data.ptr % 64 == 0 and p["logprobs"].data.ptr % 64 == 0
        for k, v in payload.items():
            np.testing.assert_array_equal(cupy.asnumpy(p[k]), v)
        assert p.meta == {"i": 0}
        res = c.fetch_many(refs[1:])
        assert all(r.ok for r in res)
        got = [r.payload for r in res]
        np.testing.assert_array_equal(cupy.asnumpy(got[1]["logprobs"]), payload["logprobs"])
        p.release()
    assert ring.state_counts()["FREE"] == 8


def test_take_into_device_memory(make_ring, ring_name, serve):
    cupy = _cupy()
    from clients import TransportClient

    ring = make_ring(slots=4, slot_bytes=1 << 20)
    srv = serve(ring_name)
    ring.put({"x": np.arange(1000, dtype=np.float32)})
    ring.put(b"raw bytes on the gpu")
    with TransportClient(device="cuda", local_fast_path=False) as c:
        got = c.take(srv.address, n=2, wait=1.0)
    assert len(got) == 2
    np.testing.assert_array_equal(cupy.asnumpy(got[0]["x"]), np.arange(1000, dtype=np.float32))
    assert cupy.asnumpy(got[1].raw).tobytes() == b"raw bytes on the gpu"


def test_torch_tensors_on_the_gpu_and_cupy_input(make_ring, ring_name, serve):
    """tensor_type="torch" with device="cuda" hands out CUDA torch tensors (DLPack, no copy);
    a cupy array put into the ring is copied device-to-host straight into the slot."""
    cupy = _cupy()
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA")
    from clients import TransportClient

    ring = make_ring(slots=4, slot_bytes=1 << 20)
    serve(ring_name)
    src = cupy.arange(1000, dtype=cupy.int32)
    ref = ring.put({"ids": src, "r": [np.arange(3), np.arange(2)]})
    with TransportClient(device="cuda", tensor_type="torch", local_fast_path=False) as c:
        p = c.fetch(ref)
        assert isinstance(p["ids"], torch.Tensor) and p["ids"].is_cuda
        assert p["ids"].cpu().tolist() == list(range(1000))
        assert p["r"].padded(-1).cpu().tolist() == [[0, 1, 2], [0, 1, -1]]
