"""Windowed datasets over token streams: `SEQDataset` (pre-training), `SFTDataset`, `DPODataset`.

Store keys and item keys (every item tensor has shape `(window_size,)`):

| type | store keys                                   | item                                                     |
|------|----------------------------------------------|----------------------------------------------------------|
| seq  | sequence                                     | input_ids = seq[b:e], target_ids = seq[b+1:e+1] (int64)  |
| sft  | sequence, loss_mask                          | as seq, plus loss_mask = loss_mask[b+1:e+1] (bool)       |
| dpo  | chosen, rejected, chosen_mask, rejected_mask | the four over [b:e]: ids int64, masks bool               |

`target_ids[t]` is the token that follows `input_ids[t]` (already shifted, as the original's datasets
yielded it); an SFT `loss_mask[t]` says whether `target_ids[t]` is trained on. DPO streams are aligned
row by row: window `i` of `chosen` pairs with window `i` of `rejected`.
"""

from __future__ import annotations

import torch

from astrai.dataset.dataset import BaseDataset, DatasetFactory


@DatasetFactory.register("seq")
class SEQDataset(BaseDataset):
    """Next-token prediction over the `sequence` stream."""

    required_keys = ("sequence",)
    token_keys = ("sequence",)
    label_shift = 1

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        begin, end = self._window(index)
        tokens = self._store.fetch(begin, end + 1, "sequence").long()  # (window + 1,)
        return {"input_ids": tokens[:-1], "target_ids": tokens[1:]}


@DatasetFactory.register("sft")
class SFTDataset(BaseDataset):
    """Next-token prediction trained only where `loss_mask` is set (e.g. on assistant turns)."""

    required_keys = ("sequence", "loss_mask")
    token_keys = ("sequence",)
    label_shift = 1

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        begin, end = self._window(index)
        rows = self._store.fetch(begin, end + 1, self.required_keys)
        tokens = rows["sequence"].long()  # (window + 1,)
        return {"input_ids": tokens[:-1], "target_ids": tokens[1:], "loss_mask": rows["loss_mask"][1:].bool()}


@DatasetFactory.register("dpo")
class DPODataset(BaseDataset):
    """Preference pairs: chosen and rejected completions with masks over their completion tokens."""

    required_keys = ("chosen", "rejected", "chosen_mask", "rejected_mask")
    token_keys = ("chosen", "rejected")

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        begin, end = self._window(index)
        rows = self._store.fetch(begin, end, self.required_keys)
        return {
            "chosen": rows["chosen"].long(),
            "rejected": rows["rejected"].long(),
            "chosen_mask": rows["chosen_mask"].bool(),
            "rejected_mask": rows["rejected_mask"].bool(),
        }
