"""`GRPODataset`: one item per stored row, each a prompt with a group of G scored responses.

Store keys, all with the same number of rows N (writers pad prompts to a fixed P and responses to a
fixed R before storing):

| key            | row shape | dtype          | meaning                                              |
|----------------|-----------|----------------|------------------------------------------------------|
| prompts        | (P,)      | integer        | prompt token ids                                     |
| prompt_masks   | (P,)      | bool (0/1)     | optional: real prompt tokens (absent: all real)      |
| responses      | (G, R)    | integer        | the G sampled responses' token ids                   |
| masks          | (G, R)    | bool (0/1)     | real response tokens (the tokens the loss covers)     |
| rewards        | (G,)      | float          | one scalar reward per response                       |

Items (batched by `collate` to a leading batch dimension B):
`{"prompt_ids": (P,) int64, "prompt_mask": (P,) bool, "response_ids": (G, R) int64,
"response_mask": (G, R) bool, "rewards": (G,) float32}`.

Items are rows, not windows: `window_size` is the longest sequence the model sees, and a store whose
P + R exceeds it is rejected at load; `stride` has no meaning and must be left at its default.
"""

from __future__ import annotations

import torch

from astrai.dataset.dataset import BaseDataset, DatasetFactory
from astrai.dataset.store import Store


@DatasetFactory.register("grpo")
class GRPODataset(BaseDataset):
    """Offline GRPO data: prompts, G responses each, their masks and rewards."""

    required_keys = ("prompts", "responses", "masks", "rewards")
    token_keys = ("prompts", "responses")

    def __init__(self, window_size: int, stride: int | None = None) -> None:
        super().__init__(window_size, stride)
        if self.stride != window_size:
            raise ValueError(f"GRPODataset.stride={stride!r}: GRPO items are whole rows; leave stride unset")

    def _check(self, store: Store, where: str) -> None:
        prompt, response = store.row_shape("prompts"), store.row_shape("responses")
        shapes = {key: store.row_shape(key) for key in (*self.required_keys, "prompt_masks") if key in store.keys}
        if len(prompt) != 1 or len(response) != 2:
            raise ValueError(f"{where}: GRPO rows need prompts (P,) and responses (G, R), got {shapes}")
        if (
            shapes["masks"] != response
            or shapes["rewards"] != response[:1]
            or shapes.get("prompt_masks", prompt) != prompt
        ):
            raise ValueError(f"{where}: GRPO row shapes disagree: {shapes}")
        if prompt[0] + response[1] > self.window_size:
            raise ValueError(
                f"{where}: prompt ({prompt[0]}) + response ({response[1]}) tokens exceed window_size={self.window_size}"
            )

    def __len__(self) -> int:
        return len(self._store)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for GRPODataset of length {n}")
        row = index % n
        store = self._store
        keys = [*self.required_keys, *(["prompt_masks"] if "prompt_masks" in store.keys else [])]
        rows = {key: value[0] for key, value in store.fetch(row, row + 1, keys).items()}
        prompt_ids = rows["prompts"].long()
        prompt_mask = (
            rows["prompt_masks"].bool() if "prompt_masks" in rows else torch.ones_like(prompt_ids, dtype=torch.bool)
        )
        return {
            "prompt_ids": prompt_ids,
            "prompt_mask": prompt_mask,
            "response_ids": rows["responses"].long(),
            "response_mask": rows["masks"].bool(),
            "rewards": rows["rewards"].float(),
        }
