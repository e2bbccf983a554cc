"""`ContiguousKVCache`: prefill then one-token decode steps through the cache give the full forward's logits."""

from __future__ import annotations

import pytest
import torch

from astrai.model import AutoRegressiveLM, ContiguousKVCache
from astrai.protocols import KVCacheView

TOL = 1e-5


def full_logits(model, sequences):
    """Each sequence's logits from an uncached forward of that sequence alone."""
    with torch.no_grad():
        return [model(torch.tensor([s]))["logits"][0] for s in sequences]


def right_padded(rows):
    T = max(len(r) for r in rows)
    ids = torch.tensor([r + [0] * (T - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (T - len(r)) for r in rows])
    return ids, mask


@pytest.mark.parametrize(
    "flags",
    [
        dict(),
        dict(use_qk_norm=True, attn_bias=True, tie_weight=True, rope_scaling={"rope_type": "yarn", "factor": 2.0}),
    ],
)
def test_ragged_prefill_then_decode_equals_full_forward(lm_config, tokens, flags):
    torch.manual_seed(0)
    model = AutoRegressiveLM(lm_config(**flags)).eval()
    prompts = [tokens(1, n, seed=n)[0].tolist() for n in (7, 3, 5)]  # three rows of different lengths
    continuations = tokens(3, 4, seed=9).tolist()
    expected = full_logits(model, [p + c for p, c in zip(prompts, continuations)])

    cache = ContiguousKVCache(model.config.n_layers, batch_size=3, max_len=16)
    ids, mask = right_padded(prompts)
    view = cache.bind([len(p) for p in prompts])
    assert isinstance(view, KVCacheView)
    with torch.no_grad():
        logits = model(ids, mask, paged_cache=view)["logits"]
    for b, p in enumerate(prompts):
        assert (logits[b, : len(p)] - expected[b][: len(p)]).abs().max() < TOL
    for step in range(4):  # one new token per row; rows sit at different positions
        new = torch.tensor([[c[step]] for c in continuations])
        with torch.no_grad():
            logits = model(new, paged_cache=cache.bind(1))["logits"]
        for b, p in enumerate(prompts):
            assert (logits[b, 0] - expected[b][len(p) + step]).abs().max() < TOL
    assert cache.lens.tolist() == [11, 7, 9]


def test_ragged_multi_token_step(lm_config, tokens):
    """A decode step where rows bring different numbers of tokens (chunked prefill next to decode)."""
    torch.manual_seed(0)
    model = AutoRegressiveLM(lm_config()).eval()
    seqs = [tokens(1, 9, seed=3)[0].tolist(), tokens(1, 9, seed=4)[0].tolist()]
    expected = full_logits(model, seqs)
    cache = ContiguousKVCache(model.config.n_layers, batch_size=2, max_len=9)
    first = [seqs[0][:2], seqs[1][:6]]
    second = [seqs[0][2:], seqs[1][6:]]  # 7 and 3 tokens
    with torch.no_grad():
        model(*right_padded(first), paged_cache=cache.bind([2, 6]))
        logits = model(*right_padded(second), paged_cache=cache.bind([7, 3]))["logits"]
    assert (logits[0, :7] - expected[0][2:]).abs().max() < TOL
    assert (logits[1, :3] - expected[1][6:]).abs().max() < TOL


def test_overflow_and_bad_sizes_are_errors():
    cache = ContiguousKVCache(n_layers=1, batch_size=2, max_len=4)
    cache.bind([4, 1])
    with pytest.raises(ValueError, match=r"cached \[4, 1\] \+ new \[1, 1\] tokens per row does not fit max_len=4"):
        cache.bind(1)
    cache.reset()
    assert cache.bind(4).seq_lens.tolist() == [4, 4]
    with pytest.raises(ValueError, match="batch_size=0"):
        ContiguousKVCache(n_layers=1, batch_size=0, max_len=4)


class _PackedView:
    """A view announcing a packed step; the model must refuse a step it cannot take before touching it."""

    packed = True
    seq_lens = torch.tensor([3])

    def write(self, layer_id, k, v):
        raise AssertionError("the step should have been refused before any write")

    def gather(self, layer_id):
        raise AssertionError("a packed step never gathers")

    def attend(self, layer_id, q, k, v, scale):
        raise AssertionError("the step should have been refused before attention")


def test_a_packed_step_needs_one_unpadded_row_positions_and_gqa(lm_config):
    torch.manual_seed(0)
    view, positions = _PackedView(), torch.arange(3)[None]
    model = AutoRegressiveLM(lm_config()).eval()
    with pytest.raises(ValueError, match=r"packed cache step takes input_ids \(1, N\)"):
        model(torch.ones(2, 3, dtype=torch.long), paged_cache=view, position_ids=positions.expand(2, 3))
    with pytest.raises(ValueError, match="with position_ids"):
        model(torch.ones(1, 3, dtype=torch.long), paged_cache=view)
    with pytest.raises(ValueError, match="no input_mask"):
        model(torch.ones(1, 3, dtype=torch.long), torch.ones(1, 3), paged_cache=view, position_ids=positions)
    mla = AutoRegressiveLM(
        lm_config(attn_type="mla", kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, n_kv_heads=4)
    ).eval()
    with pytest.raises(ValueError, match="MLA attention takes padded cache steps only"):
        mla(torch.ones(1, 3, dtype=torch.long), paged_cache=view, position_ids=positions)
