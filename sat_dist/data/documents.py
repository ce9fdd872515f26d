"""Document boundaries inside packed samples (Megatron-LM's --reset-position-ids,
--reset-attention-mask and --eod-mask-loss, as in its get_ltor_masks_and_position_ids).

A packed sample joins documents with EOD (the tokenizer's EOS, sat_dist.data.packing). For
the input ids of a micro-batch, [b, s]:
- The EOD token belongs to the document it ends; the token after it starts a new document.
  A row's documents are numbered 0, 1, ... from its first token (its first one is usually
  the tail of a document cut by the packing).
- reset_position_ids: positions restart at 0 at the first token of every document.
- reset_attention_mask: a token attends only to earlier tokens of its own document, i.e. a
  token after an EOD sees nothing up to and including that EOD.
- eod_mask_loss: no loss where the INPUT token is EOD (the label there is the next
  document's first token, which the previous document cannot predict); the micro-batch
  loss is then sum(loss * mask) / sum(mask).
An EOD at the last position only ends its document: the new one starts in the next sample.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class DocumentInputs:
    """What the model and the loss need for one micro-batch; None where the flag is off."""

    position_ids: Optional[torch.Tensor] = None
    """[b, s] int64: each token's position within its document (None: 0..s-1 per row)."""
    segment_ids: Optional[torch.Tensor] = None
    """[b, s] int64: each token's document index within its row (None: one causal sequence)."""
    loss_mask: Optional[torch.Tensor] = None
    """[b, s] float32: 0 where the input token is EOD, else 1 (None: every token counts)."""

    def model_inputs(self) -> dict:
        """Keyword arguments of LlamaModel.forward (and Engine.__call__)."""
        return {"position_ids": self.position_ids, "segment_ids": self.segment_ids}

    def mean_loss(self, per_token: torch.Tensor) -> torch.Tensor:
        """Scalar micro-batch loss from the per-token loss [b, s]."""
        if self.loss_mask is None:
            return per_token.mean()
        mask = self.loss_mask.to(per_token.dtype)
        # clamp: a micro-batch of EODs only would otherwise give 0/0 = NaN and skip the step
        return (per_token * mask).sum() / mask.sum().clamp(min=1.0)


def document_inputs(ids: torch.Tensor, eod_id: int, *, reset_position_ids: bool = False,
                    reset_attention_mask: bool = False, eod_mask_loss: bool = False) -> DocumentInputs:
    """Positions, document indices and loss mask of input ids [b, s] (module docstring).
    Runs on ids' device without a host synchronisation."""
    if ids.dim() != 2:
        raise ValueError(f"document_inputs: ids must be [batch, seq], got shape {tuple(ids.shape)}")
    is_eod = ids == eod_id  # [b, s]
    # A token starts a document when the token before it is EOD; the row's first token
    # always does (it is position 0 without a reset too).
    starts = torch.zeros_like(is_eod)
    starts[:, 1:] = is_eod[:, :-1]
    position_ids = segment_ids = loss_mask = None
    if reset_position_ids:
        idx = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)  # [b, s]
        first = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values  # [b, s]
        position_ids = idx - first
    if reset_attention_mask:
        segment_ids = starts.long().cumsum(dim=1)  # [b, s]
    if eod_mask_loss:
        loss_mask = (~is_eod).float()
    return DocumentInputs(position_ids, segment_ids, loss_mask)


__all__ = ["DocumentInputs", "document_inputs"]
