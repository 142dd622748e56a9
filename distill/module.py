"""The distillation student as a LightningModule: causal-LM SFT whose loss counts response tokens only."""

from __future__ import annotations

import torch

from switchkit.trainer.base import TrainableModule


class DistillModule(TrainableModule):
    """Fine-tune a causal LM (full or peft LoRA) on switch-generation responses.

    Batches carry ``labels`` that are ``-100`` on prompt and padding tokens, so the transformers loss
    (shifted next-token cross-entropy) counts response tokens only.
    """

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over the response tokens of the batch."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """One micro-batch of response-only SFT."""
        loss = self(**batch)
        self.log("train_loss", loss, prog_bar=True, batch_size=len(batch["input_ids"]))
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """Response-only loss on held-out pairs."""
        self.log("val_loss", self(**batch), prog_bar=True, batch_size=len(batch["input_ids"]))
