"""Muon: agreement with torch.optim.Muon and torch.optim.AdamW, parameter split, validation, exact resume."""

import copy

import pytest
import torch
from torch import nn

from astrai.trainer.muon import Muon, muon_param_groups, zeropower_via_newtonschulz5


def gradients(shapes, steps, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=generator) for s in shapes] for _ in range(steps)]


@pytest.mark.parametrize("shape", [(12, 7), (5, 16)])  # tall (transposed inside NS) and wide
@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("adjust_lr", ["original", "match_rms_adamw"])
def test_muon_matches_torch_muon(shape, nesterov, adjust_lr):
    start = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    ours, theirs = start.clone().requires_grad_(), start.clone().requires_grad_()
    opt = Muon(
        [{"params": [ours], "use_muon": True}],
        lr=0.02,
        momentum=0.9,
        nesterov=nesterov,
        weight_decay=0.1,
        adjust_lr=adjust_lr,
    )
    reference = torch.optim.Muon(
        [theirs], lr=0.02, momentum=0.9, nesterov=nesterov, weight_decay=0.1, adjust_lr_fn=adjust_lr
    )
    for (g,) in gradients([shape], steps=6):
        ours.grad, theirs.grad = g.clone(), g.clone()
        opt.step()
        reference.step()
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    assert not torch.equal(ours, start)


def test_adamw_groups_match_torch_adamw():
    shapes = [(7,), (10, 4), (2, 3, 4)]  # a bias, an embedding-like matrix, a 3-D tensor
    starts = [torch.randn(s, generator=torch.Generator().manual_seed(i)) for i, s in enumerate(shapes)]
    ours = [s.clone().requires_grad_() for s in starts]
    theirs = [s.clone().requires_grad_() for s in starts]
    opt = Muon(
        [{"params": ours, "use_muon": False}], adamw_lr=1e-2, adamw_betas=(0.8, 0.99), adamw_eps=1e-6, adamw_wd=0.05
    )
    reference = torch.optim.AdamW(theirs, lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.05)
    for grads in gradients(shapes, steps=5):
        for p, q, g in zip(ours, theirs, grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        reference.step()
        for p, q in zip(ours, theirs):
            torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_newton_schulz_orthogonalises_and_leaves_its_input_alone():
    g = torch.randn(32, 16, generator=torch.Generator().manual_seed(3)).bfloat16()
    before = g.clone()
    o = zeropower_via_newtonschulz5(g, steps=5)
    assert o.shape == (32, 16) and o.dtype == torch.bfloat16
    assert torch.equal(g, before)
    singular = torch.linalg.svdvals(o.float())
    assert 0.6 < singular.min() and singular.max() < 1.25  # the quintic's band around 1, not exactly 1
    zero = zeropower_via_newtonschulz5(torch.zeros(4, 6), steps=5)
    assert torch.equal(zero, torch.zeros(4, 6, dtype=torch.bfloat16))


def test_zero_gradient_without_decay_leaves_weights_unchanged():
    w = torch.randn(6, 6, requires_grad=True)
    start = w.detach().clone()
    opt = Muon([{"params": [w], "use_muon": True}])
    w.grad = torch.zeros(6, 6)
    opt.step()
    assert torch.equal(w.detach(), start)


class TinyLM(nn.Module):
    def __init__(self, tie=False):
        super().__init__()
        self.embed_tokens = nn.Embedding(11, 8)
        self.layers = nn.ModuleList(
            nn.ModuleDict({"q_proj": nn.Linear(8, 8), "up": nn.Linear(8, 16, bias=False)}) for _ in range(2)
        )
        self.norm = nn.RMSNorm(8)
        self.experts = nn.Parameter(torch.randn(2, 8, 4))
        self.lm_head = nn.Linear(8, 11, bias=False)
        if tie:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, ids):
        h = self.embed_tokens(ids)
        for layer in self.layers:
            h = h + layer["q_proj"](h) + layer["up"](h)[..., :8]
        h = self.norm(h) + torch.einsum("btd,edf->btf", h, self.experts).sum(-1, keepdim=True)
        return self.lm_head(h)


def test_param_groups_put_hidden_matrices_on_muon():
    model = TinyLM()
    groups = muon_param_groups(model, lr=0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    muon = sorted(names[id(p)] for p in groups[0]["params"])
    adamw = sorted(names[id(p)] for p in groups[1]["params"])
    assert groups[0]["use_muon"] and groups[0]["lr"] == 0.05 and not groups[1]["use_muon"] and "lr" not in groups[1]
    assert muon == [f"layers.{i}.{m}.weight" for i in range(2) for m in ("q_proj", "up")]
    assert adamw == [
        "embed_tokens.weight",
        "experts",
        "layers.0.q_proj.bias",
        "layers.1.q_proj.bias",
        "lm_head.weight",
        "norm.weight",
    ]
    tied = TinyLM(tie=True)
    assert sum(len(g["params"]) for g in muon_param_groups(tied)) == len(list(tied.parameters()))


def test_exact_resume_from_state_dict():
    ids = torch.randint(0, 11, (3, 5), generator=torch.Generator().manual_seed(0))

    def train(model, opt, steps):
        for _ in range(steps):
            opt.zero_grad()
            model(ids).square().mean().backward()
            opt.step()

    torch.manual_seed(0)
    straight = TinyLM()
    resumed = copy.deepcopy(straight)
    opt = Muon(muon_param_groups(straight), weight_decay=0.01, adamw_wd=0.01)
    train(straight, opt, 6)

    first = Muon(muon_param_groups(resumed), weight_decay=0.01, adamw_wd=0.01)
    train(resumed, first, 3)
    state = copy.deepcopy(first.state_dict())
    second = Muon(muon_param_groups(resumed))  # hyper-parameters come back from the state
    second.load_state_dict(state)
    train(resumed, second, 3)
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name


def test_closure_loss_is_returned_and_schedulers_drive_both_kinds_of_group():
    model = TinyLM()
    opt = Muon(muon_param_groups(model), lr=0.02, adamw_lr=0.001)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5)
    assert [g["lr"] for g in opt.param_groups] == [0.01, 0.0005]
    assert opt.step(lambda: torch.tensor(2.5)) == 2.5
    assert scheduler.get_last_lr() == [0.01, 0.0005]
    assert (opt.lr, opt.momentum, opt.weight_decay, opt.ns_steps) == (0.02, 0.95, 0.0, 5)


@pytest.mark.parametrize(
    ("groups", "kwargs", "message"),
    [
        (lambda w, b: [w, b], {}, r"use_muon=None: every group must say use_muon=True"),
        (lambda w, b: [{"params": [b], "use_muon": True}], {}, r"shape \(6,\); Muon takes 2-D matrices only"),
        (lambda w, b: [{"params": [w], "use_muon": True}], {"momentum": 1.0}, r"momentum=1.0: must be in \[0, 1\)"),
        (lambda w, b: [{"params": [w], "use_muon": True}], {"adjust_lr": "rms"}, r"adjust_lr='rms': allowed"),
        (lambda w, b: [{"params": [w], "use_muon": True, "ns_steps": -1}], {}, r"ns_steps=-1"),
        (lambda w, b: [{"params": [b], "use_muon": False}], {"adamw_betas": (0.9, 1.0)}, r"betas=\(0.9, 1.0\)"),
        (lambda w, b: [{"params": [b], "use_muon": False}], {"adamw_eps": 0.0}, r"eps=0.0: must be > 0"),
    ],
)
def test_invalid_groups_and_hyper_parameters_are_named(groups, kwargs, message):
    w, b = torch.zeros(6, 6, requires_grad=True), torch.zeros(6, requires_grad=True)
    with pytest.raises(ValueError, match=message):
        Muon(groups(w, b), **kwargs)
