"""`astrai.model.cpu_step` (the packed CPU step's decoder layers, checked once per step) against the module path
it shortcuts, through a real paged KV cache: the same logits and cache contents bit for bit, and the module path
wherever it does not serve."""

import pytest
import torch

import astrai.model.cpu_step as cpu_step
from astrai.config import AutoRegressiveLMConfig
from astrai.inference.cache import KVCache
from astrai.inference.executor import _packed_inputs
from astrai.model import AutoRegressiveLM, RMSNorm, pack_linear_weights
from astrai.model.native import fused, matmul

pytestmark = pytest.mark.skipif(not fused.available(), reason="the fused kernels are built with a C compiler")


# Continued chunks, first chunks and decodes in one packed step (as the scheduler mixes them).
ROWS = [(12, 1), (0, 9), (20, 6), (5, 1), (0, 1), (33, 1)]


def _model(dtype, **layout):
    torch.manual_seed(0)
    config = dict(vocab_size=64, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, dim_ffn=96, max_len=128) | layout
    model = AutoRegressiveLM(AutoRegressiveLMConfig(**config)).to(dtype).eval()
    with torch.no_grad():
        for norm in [m for m in model.modules() if isinstance(m, RMSNorm)]:
            norm.weight.uniform_(0.5, 1.5)  # each norm its own weights (initialised all ones)
    pack_linear_weights(model)
    return model


def _step(model, rows, monkeypatch, fast):
    """Logits of one packed step over `rows` (start, count) after each row's history was written, and the
    cache afterwards; with `fast` False `cpu_step` is switched off (the module path). Returns also whether
    `cpu_step` ran the layers."""
    ran = []
    run_layers = cpu_step.run_layers

    def spy(*args):
        out = run_layers(*args) if fast else None
        ran.append(out is not None)
        return out

    monkeypatch.setattr(cpu_step, "run_layers", spy)
    cache = KVCache.from_config(model.config, num_pages=200, page_size=4, dtype=next(model.parameters()).dtype)
    gen = torch.Generator().manual_seed(1)
    ids = [f"t{i}" for i in range(len(rows))]
    tokens = [torch.randint(0, 64, (start + count,), generator=gen).tolist() for start, count in rows]
    with torch.inference_mode():
        for task, (start, _), seq in zip(ids, rows, tokens):
            assert cache.task_alloc(task, seq + [0])
            if start:  # the history, written by an earlier (module path) step
                history = cache.bind_tasks([task], [0], [start], packed=True)
                model(**_packed_inputs([seq[:start]], [0], [start]), paged_cache=history)
        ran.clear()
        step = cache.bind_tasks(ids, [s for s, _ in rows], [n for _, n in rows], packed=True)
        chunks = [seq[start:] for (start, _), seq in zip(rows, tokens)]
        inputs = _packed_inputs(chunks, [s for s, _ in rows], [n for _, n in rows])
        logits = model(**inputs, paged_cache=step)["logits"]
    return logits, cache._storage.k_cache.clone(), cache._storage.v_cache.clone(), ran == [True]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "qkv-bias"])
def test_the_packed_cpu_step_equals_the_module_path(dtype, bias, monkeypatch):
    model = _model(dtype, attn_bias=bias)
    *fast, ran_fast = _step(model, ROWS, monkeypatch, fast=True)
    *modules, ran_modules = _step(model, ROWS, monkeypatch, fast=False)
    assert ran_fast and not ran_modules
    assert all(torch.equal(a, b) for a, b in zip(fast, modules, strict=True))  # logits, k and v caches


def _spy_native(patch) -> list[bool]:
    """Record what `cpu_step._native_layers` answers (True: the step's layers ran as one C call)."""
    answers = []
    run_native = cpu_step._native_layers
    patch.setattr(cpu_step, "_native_layers", lambda *args: answers.append(run_native(*args)) or answers[-1])
    return answers


DECODES = [(12, 1), (3, 1), (0, 1), (33, 1), (7, 1)]  # a decode step: one token per row
MANY_DECODES = [(3 * i % 40, 1) for i in range(20)]  # two groups of rows in every product
NATIVE_DTYPES = [  # the C loop runs matmul.c's products: bfloat16 ones on CPUs with AVX512-BF16
    torch.float32,
    pytest.param(
        torch.bfloat16, marks=pytest.mark.skipif(not matmul.has_bf16_dot(), reason="no AVX512-BF16 on this CPU")
    ),
]


@pytest.mark.parametrize("dtype", NATIVE_DTYPES)
@pytest.mark.parametrize(
    "bias, head_dim, rows",
    [(False, 16, DECODES), (True, 16, DECODES), (False, 64, MANY_DECODES)],  # 64: bf16 scores in pairs
    ids=["no-bias", "qkv-bias", "wide-heads-20-rows"],
)
def test_a_decode_step_runs_its_layers_as_one_c_call_equal_to_the_python_loop(dtype, bias, head_dim, rows, monkeypatch):
    """A decode step's view binds its attention for C (`native_attend`): every layer runs in one call of
    `native.layers`, equal bit for bit to cpu_step's Python loop over the same kernels and to the module path
    (logits and both caches); a step with prefill chunks keeps the Python loop."""
    model = _model(dtype, attn_bias=bias, dim=4 * head_dim)
    native = _spy_native(monkeypatch)
    *c_call, ran = _step(model, rows, monkeypatch, fast=True)
    assert ran and native[-1] is True  # (the rows' histories, written first, are steps with chunks)
    _step(model, ROWS, monkeypatch, fast=True)
    assert native[-1] is False  # prefill chunks in the step: no binding for C
    monkeypatch.setattr(cpu_step, "_native_layers", lambda *args: False)
    *python_loop, ran = _step(model, rows, monkeypatch, fast=True)
    *modules, _ = _step(model, rows, monkeypatch, fast=False)
    assert ran
    assert all(torch.equal(a, b) for a, b in zip(c_call, python_loop, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(c_call, modules, strict=True))


@pytest.mark.parametrize(
    "cache_dtype, cache_layers", [(torch.float32, 2), (torch.bfloat16, 1)], ids=["dtype", "fewer-layers"]
)
def test_a_cache_that_does_not_hold_the_models_entries_fails_the_step_cleanly(cache_dtype, cache_layers):
    """A decode step over a cache of another dtype, or with fewer layers than the model: the C loop is not used
    (its kernels would trust the binding), and the step raises where the Python loop finds the mismatch."""
    model = _model(torch.bfloat16)
    config = model.config.replace(n_layers=cache_layers)
    cache = KVCache.from_config(config, num_pages=20, page_size=4, dtype=cache_dtype)
    with pytest.MonkeyPatch.context() as patch, torch.inference_mode():
        native = _spy_native(patch)
        for task in ("a", "b"):
            assert cache.task_alloc(task, [1, 2])
        step = cache.bind_tasks(["a", "b"], [0, 0], [1, 1], packed=True)
        with pytest.raises((RuntimeError, IndexError, ValueError)):
            model(**_packed_inputs([[1], [2]], [0, 0], [1, 1]), paged_cache=step)
    assert native == [False]


def test_it_follows_an_in_place_weight_update(monkeypatch):
    """An optimizer step between inference steps (RL sharing the model): the packed copies are re-made."""
    model = _model(torch.float32)
    before, *_ = _step(model, ROWS, monkeypatch, fast=True)
    with torch.no_grad():
        model.layers[1].attention.v_proj.weight.mul_(1.5)  # one of a packed group
        model.layers[0].mlp.down.weight.add_(0.01)  # a single packed product
    *fast, ran = _step(model, ROWS, monkeypatch, fast=True)
    *modules, _ = _step(model, ROWS, monkeypatch, fast=False)
    assert ran and not torch.equal(fast[0], before)
    assert all(torch.equal(a, b) for a, b in zip(fast, modules, strict=True))


@pytest.mark.parametrize(
    "layout, rows, packed",
    [
        (dict(use_qk_norm=True), ROWS, True),
        (dict(use_gated_attention=True), ROWS, True),
        (dict(ffn_type="moe", n_routed_experts=4, n_activated_experts=2, n_shared_experts=1), ROWS, True),
        (dict(), [(3, 1), (7, 1)], True),  # 2 float32 rows: the split product's
        (dict(), ROWS, False),  # weights not packed
    ],
    ids=["qk-norm", "gated", "moe", "few-float32-rows", "unpacked"],
)
def test_where_it_does_not_serve_the_modules_run(layout, rows, packed, monkeypatch):
    model = _model(torch.float32, **layout)
    pack_linear_weights(model, enable=packed)
    *_, ran = _step(model, rows, monkeypatch, fast=True)
    assert not ran


def test_a_bias_the_kernels_cannot_read_keeps_the_module_path():
    """The products read a bias as they read the weights: one of another dtype (or shape) is left to the module
    path, whose `Linear` says what is wrong, instead of being read as the weights' dtype."""
    model = _model(torch.float32)
    x, cos = torch.zeros(1, 3, 64), torch.zeros(1, 3, 16)
    with torch.inference_mode():
        assert cpu_step._plan(model.layers[0], x, cos) is not None
        model.layers[0].attention.o_proj.bias = torch.nn.Parameter(torch.zeros(64, dtype=torch.bfloat16))
        assert cpu_step._plan(model.layers[0], x, cos) is None
        model.layers[0].attention.o_proj.bias = torch.nn.Parameter(torch.zeros(32))
        assert cpu_step._plan(model.layers[0], x, cos) is None


def test_only_under_inference_mode():
    model = _model(torch.float32)
    x, cos = torch.zeros(1, 8, 64), torch.zeros(1, 8, 16)
    assert not cpu_step._serves(x, cos, cos)
    with torch.inference_mode():
        assert cpu_step._serves(x, cos, cos)
    with torch.no_grad():  # evaluation with autograd off but not inference mode: the modules (the reference)
        assert cpu_step.run_layers(model.layers, x, (cos, cos), None) is None


@pytest.mark.parametrize("where", ["o_proj", "down", "mlp", "q_proj"])
def test_a_forward_hook_keeps_the_module_path(where, monkeypatch):
    """A hook (a LoRA adapter's, here adding a constant) on any module the step would shortcut: the module path
    runs, hook included."""
    model = _model(torch.float32)
    modules = {"o_proj": model.layers[1].attention.o_proj, "down": model.layers[0].mlp.down,
               "mlp": model.layers[1].mlp, "q_proj": model.layers[0].attention.q_proj}  # fmt: skip
    calls = []
    handle = modules[where].register_forward_hook(lambda module, args, out: calls.append(1) or out + 0.5)
    logits, *_, ran = _step(model, ROWS, monkeypatch, fast=True)
    assert not ran and calls
    handle.remove()
    unhooked, *_ = _step(model, ROWS, monkeypatch, fast=True)
    assert not torch.equal(logits, unhooked)
