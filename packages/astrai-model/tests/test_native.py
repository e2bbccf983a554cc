"""The C kernels' build cache (`astrai.model.native.build`), the fused CPU kernels (`native.fused`) and the
float32 matrix product (`native.matmul`) against the torch expressions they replace, alone and inside the
model's layers, and the decode step's C layer loop (`native.layers`) against the Python loop it replaces."""

import ctypes
import platform
import shutil
import subprocess

import pytest
import torch
import torch.nn.functional as F

from astrai.config import AutoRegressiveLMConfig
from astrai.model import AutoRegressiveLM, RMSNorm, pack_linear_weights
from astrai.model.native import build, fused, layers, matmul
from astrai.model.rope import apply_rotary_emb

HAS_COMPILER = platform.system() == "Linux" and any(shutil.which(c) for c in ("cc", "gcc"))
pytestmark = pytest.mark.skipif(not HAS_COMPILER, reason="the kernels are built with a C compiler on Linux")
DTYPES = [torch.float32, torch.bfloat16]


def _close(got, expected):
    """float32: within a few ulps (a sum in another order); bfloat16: at most one bf16 ulp, on few elements."""
    assert got.dtype == expected.dtype and got.shape == expected.shape and got.is_contiguous()
    if got.dtype == torch.bfloat16:
        torch.testing.assert_close(got.float(), expected.float(), rtol=2**-7, atol=1e-6)
        assert (got != expected).float().mean() < 0.01
    else:
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_the_kernels_build_here():
    assert fused.available(), "a C compiler is on PATH, so the kernels must build (see the warning for why not)"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 384), (3, 7, 384), (2, 5, 40), (1, 600, 384), (4, 1, 7)])
def test_rms_norm_equals_torch(dtype, shape):
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=gen) * 3).to(dtype)
    weight = torch.randn(shape[-1], generator=gen).to(dtype)
    expected = weight * F.rms_norm(x.float(), (shape[-1],), eps=1e-5).to(dtype)
    with torch.inference_mode():
        _close(fused.rms_norm(x, weight, 1e-5), expected)
        wide = torch.cat((x, x), dim=-1)[..., : shape[-1]]  # rows spaced 2d apart: read in place
        _close(fused.rms_norm(wide, weight, 1e-5), expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B, T, H, Hkv, d", [(1, 1, 6, 2, 64), (2, 9, 4, 2, 40), (1, 300, 6, 2, 128), (3, 2, 2, 1, 6)])
def test_rotary_equals_torch_bit_for_bit(dtype, B, T, H, Hkv, d):
    gen = torch.Generator().manual_seed(1)
    qkv = torch.randn(B, T, (H + 2 * Hkv) * d, generator=gen).to(dtype)  # one projection's output, as GQA's
    q = qkv[..., : H * d].view(B, T, H, d)
    k = qkv[..., H * d : (H + Hkv) * d].view(B, T, Hkv, d)
    cos, sin = torch.randn(B, T, d, generator=gen), torch.randn(B, T, d, generator=gen)  # every channel its own
    expected_q, expected_k = apply_rotary_emb(torch.cat((q, k), dim=2), cos, sin).split((H, Hkv), dim=2)
    with torch.inference_mode():
        got_q, got_k = fused.rotary(q, k, cos, sin)
    assert torch.equal(got_q, expected_q) and torch.equal(got_k, expected_k)
    assert got_q.is_contiguous() and got_k.is_contiguous()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 1152), (16, 1, 1152), (1, 512, 1152), (3, 5, 37)])
def test_silu_mul_equals_torch(dtype, shape):
    gen = torch.Generator().manual_seed(2)
    both = (torch.randn(*shape[:-1], 2 * shape[-1], generator=gen) * 6).to(dtype)
    both[..., :3] = torch.tensor([-100.0, 100.0, 0.0])  # e^-g past float32's range on either side
    gate, up = both.split(shape[-1], dim=-1)  # two column slices of one tensor, as MLP's
    with torch.inference_mode():
        _close(fused.silu_mul(gate, up), F.silu(gate) * up)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_at_the_edges_of_exp(dtype):
    """Where e^-g leaves float32's range (and the band just before), infinities and NaN: as torch."""
    edges = [-100.0, -88.72, -88.5, -88.0, -87.5, -50.0, -1e-30, 0.0, 1e-30, 50.0, 88.5, 100.0]
    gate = torch.tensor(edges + [float("nan"), float("inf"), float("-inf")]).to(dtype)
    up = torch.full_like(gate, 3.0)
    with torch.inference_mode():
        got = fused.silu_mul(gate, up)
    expected = F.silu(gate) * up
    torch.testing.assert_close(got, expected, rtol=5e-7 if dtype == torch.float32 else 0, atol=0, equal_nan=True)
    numbers = ~expected.isnan()
    assert torch.equal(got[numbers].signbit(), expected[numbers].signbit())  # -0.0 stays -0.0


def test_the_kernels_serve_only_cpu_inference_in_float32_or_bfloat16():
    x, weight = torch.randn(2, 3, 16), torch.ones(16)
    assert fused.rms_norm(x, weight, 1e-6) is None  # outside inference mode: autograd needs torch's ops
    with torch.inference_mode():
        assert fused.rms_norm(x, weight, 1e-6) is not None
        assert fused.rms_norm(x.half(), weight.half(), 1e-6) is None  # float16
        assert fused.rms_norm(x.bfloat16(), weight, 1e-6) is None  # mixed dtypes
        assert fused.rms_norm(x, torch.ones(8), 1e-6) is None  # a weight of another size
        assert fused.rms_norm(x[..., ::2], torch.ones(8), 1e-6) is None  # channels not contiguous
        assert fused.rms_norm(x.transpose(0, 1), weight, 1e-6) is None  # rows not equally spaced
        assert fused.silu_mul(x, x.transpose(0, 1).contiguous().transpose(0, 1)) is None  # different layouts
        cos = torch.ones(2, 3, 16)
        q = torch.randn(2, 3, 4, 16)
        assert fused.rotary(q, q[:, :, :2], cos, cos) is not None
        assert fused.rotary(q, q[:, :, :2], cos.double(), cos.double()) is None  # angles must be float32
        assert fused.rotary(q, q[:, :, :2], cos, cos.to("meta")) is None  # angles elsewhere are not read
        assert fused.rotary(q.transpose(1, 2), q[:, :, :2], cos, cos) is None  # heads not side by side


@pytest.mark.parametrize("dtype", DTYPES)
def test_model_forward_in_inference_mode_matches_torch(lm_config, tokens, dtype):
    """The whole model with the kernels (inference mode) against the same model without them (no_grad):
    GQA with qk-norm (the q/k norms read strided heads, and fall back), gated attention and biases too."""
    for overrides in ({}, {"use_qk_norm": True, "use_gated_attention": True, "attn_bias": True}):
        torch.manual_seed(0)
        model = AutoRegressiveLM(lm_config(**overrides)).to(dtype).eval()
        ids = tokens(2, 12)
        with torch.no_grad():
            expected = model(ids)["logits"]
        with torch.inference_mode():
            got = model(ids)["logits"]
        tol = 1e-5 if dtype == torch.float32 else 3e-2
        torch.testing.assert_close(got, expected, rtol=tol, atol=tol)


def test_rms_norm_module_uses_the_kernel_under_inference_mode(monkeypatch):
    norm = RMSNorm(16)
    served = []
    kernel = fused.rms_norm

    def recorded(*args):
        out = kernel(*args)
        served.append(out is not None)
        return out

    monkeypatch.setattr(fused, "rms_norm", recorded)
    x = torch.randn(3, 16)
    with torch.inference_mode():
        fast = norm(x)
    slow = norm(x)  # autograd: torch's ops
    assert served == [True, False]
    torch.testing.assert_close(fast, slow.detach())


MATMUL_DTYPES = [
    torch.float32,
    pytest.param(
        torch.bfloat16, marks=pytest.mark.skipif(not matmul.has_bf16_dot(), reason="no AVX512-BF16 on this CPU")
    ),
]


@pytest.mark.parametrize("dtype", MATMUL_DTYPES)
@pytest.mark.parametrize("M", [0, 1, 2, 13, 16, 17, 31, 300])  # last row groups of 1-16
@pytest.mark.parametrize("K, N", [(384, 640), (1152, 384), (40, 16)])
@pytest.mark.parametrize("threads", [1, 2])
def test_matmul_equals_the_float64_product(dtype, M, K, N, threads):
    gen = torch.Generator().manual_seed(M + K)
    x, weight, bias = (torch.randn(shape, generator=gen).to(dtype) for shape in ((M, K), (N, K), (N,)))
    packed = matmul.pack(weight)
    assert packed.shape == ((N // 16, K, 16) if dtype == torch.float32 else (N // 16, K // 2, 16, 2))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        plain, biased = matmul.linear(x, packed), matmul.linear(x, packed, bias)
        strided = matmul.linear(torch.cat((x, x), dim=1)[:, :K], packed)  # a non-contiguous x is copied first
    finally:
        torch.set_num_threads(before)
    for got, b in ((plain, None), (biased, bias), (strided, None)):
        expected = F.linear(x.double(), weight.double(), None if b is None else b.double())
        assert got.shape == (M, N) and got.dtype == dtype
        # float32 sums of K products in another order: a few ulps of the sum of their magnitudes; bfloat16: the
        # products are exact in float32 and the one rounding at the end dominates
        scale = (x.double().abs() @ weight.double().abs().T).clamp(min=1)
        if dtype == torch.float32:
            assert ((got.double() - expected).abs() <= 4 * 2**-24 * scale * K**0.5).all()
        else:
            assert ((got.double() - expected).abs() <= 2**-8 * expected.abs() + 2**-20 * scale * K**0.5).all()


@pytest.mark.parametrize("dtype", MATMUL_DTYPES)
@pytest.mark.parametrize("M", [1, 13, 17, 300])
@pytest.mark.parametrize("in_place", [False, True], ids=["new", "in-place"])
def test_matmul_adds_a_residual_as_torch_rounds_it(dtype, M, in_place):
    """`linear_into(..., residual)` is `residual + linear(...)` bit for bit: the product rounded to the dtype
    first, then the sum (the decoder layer's residual connection), into `out` or into the residual itself."""
    gen = torch.Generator().manual_seed(M)
    x, weight, bias = (torch.randn(shape, generator=gen).to(dtype) for shape in ((M, 384), (640, 384), (640,)))
    residual = (100 * torch.randn(M, 640, generator=gen)).to(dtype)  # large: the product's rounding shows
    packed = matmul.pack(weight)
    expected = residual + matmul.linear(x, packed, bias)
    out = residual.clone() if in_place else torch.full_like(residual, float("nan"))
    matmul.linear_into(x, packed, bias, out, out if in_place else residual)
    assert torch.equal(out, expected)


def test_matmul_serves_blocks_of_16_outputs_only():
    weight = torch.randn(32, 8)
    assert matmul.pack(torch.randn(33, 8)) is None and matmul.pack(weight.to("meta")) is None
    assert matmul.pack(weight.half()) is None and matmul.pack(torch.randn(32, 7).bfloat16()) is None  # K odd
    assert (matmul.pack(weight.bfloat16()) is not None) == matmul.has_bf16_dot()
    packed = matmul.pack(weight)
    with pytest.raises(ValueError, match="x"):
        matmul.linear(torch.randn(3, 9), packed)  # another in_features
    with pytest.raises(ValueError, match="x"):
        matmul.linear(torch.randn(3, 8).double(), packed)
    with pytest.raises(ValueError, match="bias"):
        matmul.linear(torch.randn(3, 8), packed, torch.randn(16))
    with pytest.raises(ValueError, match="packed"):
        matmul.linear(torch.randn(3, 8), weight.view(2, 8, 16).transpose(1, 2))  # not what pack() returns
    for dtype in (torch.float16, torch.float64, torch.int32):  # never packed: refused, not read as another layout
        with pytest.raises(ValueError, match="packed"):
            matmul.linear(torch.ones(3, 8, dtype=dtype), torch.ones(2, 4, 16, 2, dtype=dtype))


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="-mno-avx512bf16 is an x86 flag")
def test_matmul_built_without_the_bfloat16_dot_product_refuses_bfloat16(tmp_path, monkeypatch):
    """A CPU without AVX512-BF16 builds the float32 kernel only: `has_bf16_dot()` is 0 there (so `pack` leaves
    bfloat16 weights to oneDNN) and the bfloat16 entry refuses instead of computing anything."""
    monkeypatch.setenv("ASTRAI_CACHE_DIR", str(tmp_path))
    lib = build.load_library(matmul._SOURCE, "matmul without bf16", ("-mno-avx512bf16",))
    assert lib.has_bf16_dot() == 0
    x = torch.randn(2, 8).bfloat16()
    y = torch.empty(2, 16, dtype=torch.bfloat16)
    scratch = torch.empty(16 * 4, dtype=torch.int32)
    status = lib.linear(ctypes.c_void_p(x.data_ptr()), ctypes.c_int64(2), ctypes.c_int64(8),
                        ctypes.c_void_p(x.data_ptr()), ctypes.c_int64(16), None, None,
                        ctypes.c_void_p(y.data_ptr()), ctypes.c_void_p(scratch.data_ptr()), 1, 1)  # fmt: skip
    assert status == -1


def test_the_build_is_cached_by_source_and_header(tmp_path, monkeypatch):
    monkeypatch.setenv("ASTRAI_CACHE_DIR", str(tmp_path))
    compiler = shutil.which("cc") or shutil.which("gcc")
    source = tmp_path / "kernel.c"
    source.write_text('#include "simd.h"\nfloat twice(float x) { return 2 * x; }\n')
    first = build.build(source, compiler)
    assert first.parent == tmp_path / "kernels" and first.name.startswith("kernel-") and first.exists()
    stamp = first.stat().st_mtime_ns
    assert build.build(source, compiler) == first and first.stat().st_mtime_ns == stamp  # found, not rebuilt
    assert build.build(source, compiler, ("-ffp-contract=off",)) != first  # other flags build afresh
    header = tmp_path / "simd.h"
    header.write_text(build.HEADER.read_text() + "\n/* an edit */\n")
    monkeypatch.setattr(build, "HEADER", header)
    assert build.build(source, compiler) != first  # an edited shared header builds afresh
    assert sorted(p.suffix for p in (tmp_path / "kernels").iterdir()) == [".so"] * 3  # no temporary left
    assert build.load_library(source, "test kernel").twice is not None


def test_a_kernel_that_cannot_be_built_warns_and_falls_back(tmp_path, monkeypatch):
    monkeypatch.setenv("ASTRAI_CACHE_DIR", str(tmp_path))
    source = tmp_path / "kernel.c"
    source.write_text("float twice(float x) { return 2 * x; }\n")
    monkeypatch.setenv("ASTRAI_NATIVE_KERNELS", "0")
    assert build.load_library(source, "test kernel") is None  # turned off: no warning, no build
    monkeypatch.delenv("ASTRAI_NATIVE_KERNELS")
    monkeypatch.setenv("CC", "/bin/false")
    with pytest.warns(UserWarning, match="test kernel not built"):
        assert build.load_library(source, "test kernel") is None
    monkeypatch.delenv("CC")

    def too_slow(*args, **kwargs):
        raise subprocess.TimeoutExpired(args[0], 120)

    monkeypatch.setattr(build.subprocess, "run", too_slow)
    with pytest.warns(UserWarning, match="test kernel not built"):
        assert build.load_library(source, "test kernel") is None
    assert list((tmp_path / "kernels").iterdir()) == []  # nothing half-written left behind


_ATTEND = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,
                           ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
                           ctypes.c_float)  # fmt: skip


def _at(address, shape, strides, dtype):
    """The tensor C code handed over as an address (its memory, not a copy)."""
    count = sum((n - 1) * step for n, step in zip(shape, strides, strict=True)) + 1
    memory = (ctypes.c_byte * (count * dtype.itemsize)).from_address(address)
    return torch.frombuffer(memory, dtype=dtype, count=count).as_strided(shape, strides)


class _FirstTokens:
    """A packed decode step in which each row's only position is its new token, so a query head's attention is
    its KV head's value. Its store-and-attend is also callable from C (`native_attend`, a ctypes callback);
    `stored` records each layer's keys and values either way."""

    packed = True

    def __init__(self, rows, heads, kv_heads, head_dim, dtype, native):
        self.shape = rows, heads, kv_heads, head_dim
        self.dtype, self.native, self.stored, self.from_c = dtype, native, [], 0
        self._callback = _ATTEND(self._from_c)

    def write(self, layer_id, k, v):
        self.stored.append((layer_id, k[0].clone(), v[0].clone()))

    def attend(self, layer_id, q, k, v, scale):
        return v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)

    def native_attend(self):
        if not self.native:
            return None
        rows, _, kv_heads, head_dim = self.shape
        address = ctypes.cast(self._callback, ctypes.c_void_p).value
        bound = dict(rows=rows, n_kv_heads=kv_heads, head_dim=head_dim, n_layers=3, dtype=self.dtype, errors={})
        return type("Bound", (), dict(function=address, context=None, **bound))

    def _from_c(self, context, layer, q, n_heads, k, k_stride, v, v_stride, out, scale):
        N, H, Hkv, hd = self.shape
        k, v = (_at(at, (N, Hkv, hd), (stride, hd, 1), self.dtype) for at, stride in ((k, k_stride), (v, v_stride)))
        self.from_c += 1
        self.write(layer, k[None], v[None])
        _at(out, (N, H, hd), (H * hd, hd, 1), self.dtype).copy_(v.repeat_interleave(H // Hkv, dim=1))
        return 0


@pytest.mark.parametrize("dtype", MATMUL_DTYPES)
def test_the_decode_step_layer_loop_in_c_equals_the_python_loop(dtype):
    """`native.layers` runs the same kernel calls as cpu_step's Python loop: equal logits and stored entries,
    bit for bit, through a view whose store-and-attend C calls back into Python."""
    config = AutoRegressiveLMConfig(vocab_size=64, dim=64, n_layers=3, n_heads=4, n_kv_heads=2, dim_ffn=96, max_len=64)
    torch.manual_seed(0)
    model = AutoRegressiveLM(config).to(dtype).eval()
    pack_linear_weights(model)
    assert layers.available()
    inputs = dict(input_ids=torch.tensor([[5, 9, 17, 3]]), position_ids=torch.tensor([[7, 0, 30, 12]]),
                  logits_index=torch.arange(4))  # fmt: skip
    results = []
    for native in (True, False):
        view = _FirstTokens(4, 4, 2, 16, dtype, native)
        with torch.inference_mode():
            logits = model(**inputs, paged_cache=view)["logits"]
        results.append((logits, view.stored))
        assert view.from_c == (3 if native else 0)  # one call per layer from the C loop
    (c_logits, c_stored), (py_logits, py_stored) = results
    assert torch.equal(c_logits, py_logits)
    assert [layer for layer, *_ in c_stored] == [0, 1, 2]
    for (c_layer, c_k, c_v), (py_layer, py_k, py_v) in zip(c_stored, py_stored, strict=True):
        assert c_layer == py_layer and torch.equal(c_k, py_k) and torch.equal(c_v, py_v)
