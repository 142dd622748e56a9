"""The distillation student as a LightningModule: causal-LM SFT whose loss counts response tokens only."""

from __future__ import annotations

import lightning as L
import torch


class DistillModule(L.LightningModule):
    """Fine-tune a causal LM (full or peft LoRA) on switch-generation responses.

    Batches carry ``labels`` that are ``-100`` on prompt and padding tokens, so the transformers loss
    (shifted next-token cross-entropy) counts response tokens only.
    """

    def __init__(self, model, tokenizer, *, lr: float = 1e-4):
        super().__init__()
        self.model, self.tokenizer, self.lr = model, tokenizer, lr
        self.strict_loading = False  # checkpoints hold only trainable weights

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

    def configure_optimizers(self):
        """AdamW over the trainable parameters."""
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.lr)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Keep only trainable weights (a LoRA checkpoint does not repeat the frozen backbone)."""
        trainable = {name for name, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
