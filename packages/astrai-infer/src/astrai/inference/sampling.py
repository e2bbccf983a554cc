"""Token sampling, vectorised over a batch whose rows each carry their own request parameters.

Each strategy maps logits (B, V) to logits (B, V) with filtered entries set to `filter_value`; parameters are a
scalar for every row or a (B,) tensor, one value per row. `SamplingPipeline.for_tasks` builds the usual chain

    logit bias -> penalties -> temperature -> top-k -> top-p

(the order vLLM uses; top-p therefore sees the temperature-scaled, top-k-filtered distribution) and keeps only
the stages some row needs. A row with temperature <= 1e-5 is greedy: temperature keeps only its argmax, so the
draw is deterministic for that row whatever the other rows do.

Drawing uses the exponential race (equivalent to the Gumbel-max trick): token = argmax(p_i / E_i) with
E_i ~ Exp(1) i.i.d. is a sample from p. A seeded request draws its row's noise from its own
`torch.Generator`, so its tokens depend only on its seed and its logits, not on which rows share the batch.
(Logits themselves can differ in the last bits between batch shapes; that is the limit of the guarantee.)
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from astrai.inference.task import Task

GREEDY_TEMPERATURE = 1e-5  # at or below this a row samples greedily (argmax)

Param = float | torch.Tensor  # one value for every row, or a (B,) tensor


def _column(value: Param, logits: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`value` as a (B, 1) tensor on the logits' device, broadcastable against (B, V)."""
    column = torch.as_tensor(value, dtype=dtype or logits.dtype, device=logits.device)
    return column.expand(logits.shape[0]).unsqueeze(1)


def _check_scalar(name: str, value: Param, low: float, high: float) -> None:
    if not isinstance(value, torch.Tensor) and not low <= value <= high:
        raise ValueError(f"{name}={value!r}: must be in [{low}, {high}]")


class BaseSamplingStrategy(abc.ABC):
    """Maps logits (B, V) to logits (B, V); never modifies its input."""

    @abc.abstractmethod
    def apply(self, logits: torch.Tensor, filter_value: float = -float("inf")) -> torch.Tensor: ...


class TemperatureStrategy(BaseSamplingStrategy):
    """Divide each row by its temperature; a row at temperature <= 1e-5 keeps only its argmax (greedy)."""

    def __init__(self, temperature: Param = 1.0):
        _check_scalar("temperature", temperature, 0.0, float("inf"))
        self.temperature = temperature

    def apply(self, logits: torch.Tensor, filter_value: float = -float("inf")) -> torch.Tensor:
        t = _column(self.temperature, logits)  # (B, 1)
        greedy = t <= GREEDY_TEMPERATURE
        scaled = logits / torch.where(greedy, torch.ones_like(t), t)
        best = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, logits.argmax(-1, keepdim=True), True)
        return scaled.masked_fill(greedy & ~best, filter_value)


class TopKStrategy(BaseSamplingStrategy):
    """Keep each row's `top_k` largest logits (ties with the k-th survive); 0 (or >= V) keeps all."""

    def __init__(self, top_k: int | torch.Tensor = 0):
        _check_scalar("top_k", top_k, 0, float("inf"))
        self.top_k = top_k

    def apply(self, logits: torch.Tensor, filter_value: float = -float("inf")) -> torch.Tensor:
        vocab = logits.shape[-1]
        k = _column(self.top_k, logits, torch.int64)  # (B, 1)
        k = torch.where((k <= 0) | (k > vocab), vocab, k)
        top = logits.topk(int(k.max()), dim=-1).values  # (B, max_k), descending
        threshold = top.gather(1, k - 1)  # (B, 1): each row's k-th largest logit
        return logits.masked_fill(logits < threshold, filter_value)


class TopPStrategy(BaseSamplingStrategy):
    """Nucleus: keep the most likely tokens until their mass reaches `top_p` (the top token always stays).

    A token is kept iff the probability of the tokens ranked above it is below `top_p` (as in HF
    transformers and vLLM); a row with `top_p >= 1` is left unchanged.
    """

    def __init__(self, top_p: Param = 1.0):
        _check_scalar("top_p", top_p, 0.0, 1.0)
        self.top_p = top_p

    def apply(self, logits: torch.Tensor, filter_value: float = -float("inf")) -> torch.Tensor:
        p = _column(self.top_p, logits, torch.float32)  # (B, 1)
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.float().softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # (B, V): probability ranked strictly above each token
        drop_sorted = (mass_before >= p) & (p < 1)
        drop_sorted[:, 0] = False
        drop = torch.zeros_like(drop_sorted).scatter_(1, order, drop_sorted)
        return logits.masked_fill(drop, filter_value)


class PenaltyStrategy(BaseSamplingStrategy):
    """Repetition (HF), then frequency and presence (OpenAI) penalties, per row.

    With `c[j]` the count of token j among the row's generated ids:
    - repetition `r`: every token seen in the prompt or the output has its logit divided by r if positive,
      multiplied by r otherwise (`RepetitionPenaltyLogitsProcessor`);
    - `logit[j] -= frequency * c[j] + presence * (c[j] > 0)` (OpenAI's definition, generated tokens only).
    """

    def __init__(
        self,
        output_ids: Sequence[Sequence[int]],
        prompt_ids: Sequence[Sequence[int]] | None = None,
        presence: Param = 0.0,
        frequency: Param = 0.0,
        repetition: Param = 1.0,
    ):
        self.presence = presence
        self.frequency = frequency
        self.repetition = repetition
        self._output = _flat_index(output_ids)
        self._prompt = None if prompt_ids is None else _flat_index(prompt_ids)

    def apply(self, logits: torch.Tensor, filter_value: float = -float("inf")) -> torch.Tensor:
        counts = _scatter_count(self._output, logits, "output_ids")  # (B, V)
        generated = counts > 0
        if self._prompt is not None:
            seen = generated | (_scatter_count(self._prompt, logits, "prompt_ids") > 0)
            r = _column(self.repetition, logits)
            logits = torch.where(seen, torch.where(logits > 0, logits / r, logits * r), logits)
        frequency = _column(self.frequency, logits)
        presence = _column(self.presence, logits)
        return logits - frequency * counts - presence * generated.to(logits.dtype)


class LogitBiasStrategy(BaseSamplingStrategy):
    """Add each row's `{token_id: bias}` to its logits (OpenAI `logit_bias`)."""

    def __init__(self, biases: Sequence[Mapping[int, float]]):
        rows = [r for r, bias in enumerate(biases) for _ in bias]
        ids = [t for bias in biases for t in bias]
        self._index = (torch.tensor(rows, dtype=torch.int64), torch.tensor(ids, dtype=torch.int64))
        self._values = torch.tensor([b for bias in biases for b in bias.values()], dtype=torch.float32)
        self._max_id = max(ids, default=-1)

    def apply(self, logits: torch.Tensor, filter_value: float = -float("inf")) -> torch.Tensor:
        if self._max_id >= logits.shape[-1]:
            raise ValueError(f"logit_bias token id {self._max_id}: outside the vocabulary of {logits.shape[-1]}")
        index = tuple(i.to(logits.device) for i in self._index)
        return logits.index_put(index, self._values.to(logits), accumulate=True)


class SamplingPipeline(BaseSamplingStrategy):
    """A chain of strategies, and the draw of one token per row from the result."""

    def __init__(
        self,
        strategies: Sequence[BaseSamplingStrategy],
        generators: Sequence[torch.Generator | None] | None = None,
    ):
        self.strategies = list(strategies)
        self.generators = list(generators) if generators is not None else []

    def apply(self, logits: torch.Tensor, filter_value: float = -float("inf")) -> torch.Tensor:
        for strategy in self.strategies:
            logits = strategy.apply(logits, filter_value)
        return logits

    def sample(self, logits: torch.Tensor, filter_value: float = -float("inf")) -> torch.Tensor:
        """One token id per row, (B,) int64, from the processed logits (computed in float32).

        Row b draws its noise from `generators[b]` when that is set, else from torch's default generator.
        """
        probs = self.apply(logits.float(), filter_value).softmax(dim=-1)  # (B, V)
        noise = torch.empty_like(probs).exponential_()
        for row, generator in enumerate(self.generators):
            if generator is not None:
                noise[row].exponential_(generator=generator)
        # Exp(1) draws can underflow to 0 in float32; a filtered token (p = 0) must never win by 0/0.
        return probs.div_(noise.clamp_(min=torch.finfo(torch.float32).tiny)).argmax(dim=-1)

    @classmethod
    def for_tasks(
        cls, tasks: Sequence[Task], device: torch.device | str | None = None, greedy: bool = False
    ) -> SamplingPipeline:
        """The pipeline for a batch of tasks (row b = `tasks[b]`), holding only the stages some row needs.

        Seeded tasks get their `torch.Generator` on `device` the first time they are sampled. `greedy=True`
        (every row at temperature 0, to be followed by an argmax) keeps only the stages that can change the
        argmax, logit bias and penalties: temperature, top-k and top-p never move a row's top token.
        """
        strategies: list[BaseSamplingStrategy] = []
        if any(t.logit_bias for t in tasks):
            strategies.append(LogitBiasStrategy([t.logit_bias for t in tasks]))
        repetition = any(t.repetition_penalty != 1.0 for t in tasks)
        if repetition or any(t.presence_penalty or t.frequency_penalty for t in tasks):
            strategies.append(
                PenaltyStrategy(
                    [t.output_ids for t in tasks],
                    [t.prompt_ids for t in tasks] if repetition else None,
                    presence=_tensor([t.presence_penalty for t in tasks], device),
                    frequency=_tensor([t.frequency_penalty for t in tasks], device),
                    repetition=_tensor([t.repetition_penalty for t in tasks], device),
                )
            )
        if greedy:
            return cls(strategies)
        if any(t.temperature != 1.0 for t in tasks):
            strategies.append(TemperatureStrategy(_tensor([t.temperature for t in tasks], device)))
        if any(t.top_k > 0 for t in tasks):
            strategies.append(TopKStrategy(torch.tensor([t.top_k for t in tasks], device=device)))
        if any(t.top_p < 1.0 for t in tasks):
            strategies.append(TopPStrategy(_tensor([t.top_p for t in tasks], device)))
        for t in tasks:
            if t.seed is not None and t.generator is None:
                t.generator = torch.Generator(device=device or "cpu").manual_seed(t.seed)
        return cls(strategies, [t.generator if t.seed is not None else None for t in tasks])


def _tensor(values: list[float], device: torch.device | str | None) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device)


def _flat_index(ids: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor, int]:
    # (row index, token id) of every listed token, flattened, plus the largest id (for a range check).
    rows = torch.repeat_interleave(torch.arange(len(ids)), torch.tensor([len(r) for r in ids], dtype=torch.int64))
    tokens = torch.tensor([t for r in ids for t in r], dtype=torch.int64)
    return rows, tokens, int(tokens.max()) if tokens.numel() else -1


def _scatter_count(index: tuple[torch.Tensor, torch.Tensor, int], logits: torch.Tensor, name: str) -> torch.Tensor:
    # (B, V) occurrence counts of each row's tokens, in the logits' dtype.
    rows, tokens, max_id = index
    if max_id >= logits.shape[-1]:
        raise ValueError(f"{name} holds token id {max_id}: outside the vocabulary of {logits.shape[-1]}")
    counts = torch.zeros_like(logits)
    ones = torch.ones(tokens.shape, dtype=logits.dtype, device=logits.device)
    return counts.index_put_((rows.to(logits.device), tokens.to(logits.device)), ones, accumulate=True)
