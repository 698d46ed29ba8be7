"""The TensorRT runner without torch (runtimes/trt.py): DeviceArray views, the plugin library it chooses, and on a GPU
its CUDA plumbing (stream-ordered memory, copies, views) through polygraphy's libcudart wrapper. TensorRT itself
cannot run engines on these machines (tests/test_trt_build.py checks the runner's refusals)."""

import ctypes
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from bytedeploy.exporters import trt_build as tb
from bytedeploy.runtimes import trt as rt


def view(shape, dtype=np.float32) -> rt.DeviceArray:
    """A DeviceArray over a stand-in allocation at address 4096 (views only do address arithmetic)."""
    return rt.DeviceArray(SimpleNamespace(ptr=4096), shape, dtype)


def test_the_runner_imports_no_torch(tmp_path):
    code = "import sys, bytedeploy.runtimes.trt, bytedeploy.exporters.trt_build; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=tmp_path).returncode == 0  # the installed package


def test_views_are_contiguous_selections_of_the_same_memory():
    a = view((4, 1, 6))  # bGPT's feature (B, 1, C)
    b = a[:, 0]
    assert (b.shape, b.ptr, b.dtype) == ((4, 6), 4096, np.float32)
    assert a[2].shape == (1, 6) and a[2].ptr == 4096 + 2 * 6 * 4
    assert a[1:3].shape == (2, 1, 6) and a[1:3].ptr == 4096 + 6 * 4
    assert a[-1, 0, 2:5].shape == (3,) and a[-1, 0, 2:5].ptr == 4096 + (3 * 6 + 2) * 4
    assert a[:, :, :0].size == 0
    caches = view((2, 3, 4, 5), np.float16)  # (L, B, T, D): one layer, one row
    assert caches[1, 2].shape == (4, 5) and caches[1, 2].ptr == 4096 + (1 * 3 + 2) * 20 * 2
    assert a.reshape(4, 6).shape == (4, 6) and a.reshape(-1).shape == (24,) and a.reshape((2, -1)).shape == (2, 12)
    assert a.nbytes == 96 and a.ndim == 3


@pytest.mark.parametrize("key", [(slice(None), slice(None), 0), (slice(None), 0, slice(1, 3)), (slice(0, 4, 2),),
                                 (0, 0, 0, 0), (None,), (9,)])
def test_views_that_would_need_a_copy_or_are_out_of_range_raise(key):
    with pytest.raises(IndexError):
        view((4, 1, 6))[key]


def test_reshape_keeps_the_size():
    with pytest.raises(ValueError, match=r"cannot reshape a DeviceArray of shape \(4, 6\) into \(5, 5\)"):
        view((4, 6)).reshape(5, 5)


def test_the_runner_loads_the_named_then_the_recorded_then_the_built_library(tmp_path, monkeypatch):
    named, recorded, built = (tmp_path / f"{n}.so" for n in ("named", "recorded", "built"))
    for f in (named, recorded, built):
        f.write_bytes(b"library")
    monkeypatch.setattr(tb, "default_library", lambda: built)
    meta = {"plugin_library": {"path": str(recorded), "sha256": "0" * 64}}
    assert rt.runner_plugin_library(named, meta) == named.resolve()
    assert rt.runner_plugin_library(None, meta) == recorded
    recorded.unlink()
    assert rt.runner_plugin_library(None, meta) == built
    assert rt.runner_plugin_library(None, {"plugin_library": "python"}) == built
    built.unlink()
    assert rt.runner_plugin_library(None, meta) is None  # the Python plugins


# ---- GPU ----------------------------------------------------------------------------------------------------------

def cuda_or_skip() -> rt.Cuda:
    if tb.cuda_compute_capability() is None:
        pytest.skip("needs a CUDA GPU")
    return rt.Cuda()


@pytest.mark.gpu
def test_device_arrays_round_trip_through_the_stream():
    cuda = cuda_or_skip()
    host = np.arange(2 * 3 * 5, dtype=np.float16).reshape(2, 3, 5)
    a = cuda.upload(host)
    assert (a.shape, a.dtype) == ((2, 3, 5), np.float16)
    assert np.array_equal(cuda.download(a), host)
    assert np.array_equal(cuda.download(a[1, 1:]), host[1, 1:])  # a view, no copy on the device
    assert np.array_equal(cuda.download(a.reshape(6, 5)[4]), host.reshape(6, 5)[4])
    assert cuda.download(cuda.upload(np.zeros((3, 0), np.int64))).shape == (3, 0)
    ints = cuda.upload(np.array([1, -2, 3], np.int64))
    assert cuda.download(ints).tolist() == [1, -2, 3]


@pytest.mark.gpu
def test_device_memory_goes_back_to_the_pool():
    cuda = cuda_or_skip()
    free = ctypes_free_bytes(cuda)
    for _ in range(2000):  # 2000 x 64 MB, more than the GPU has: runs out unless each array's memory is reused
        a = cuda.empty((16, 1024, 1024), np.float32)
        del a
    cuda.synchronize()
    keep = cuda.upload(np.ones(4, np.float32))
    assert cuda.download(keep).tolist() == [1.0] * 4
    assert ctypes_free_bytes(cuda) > free - 2**30


def ctypes_free_bytes(cuda: rt.Cuda) -> int:
    free, total = ctypes.c_size_t(), ctypes.c_size_t()
    cuda.check(cuda.lib.cudaMemGetInfo(ctypes.byref(free), ctypes.byref(total)), "cudaMemGetInfo")
    return free.value
