"""The switcher as a LightningModule: restricted-logit classification over the n model-id tokens.

The backbone is any causal LM (full fine-tuning or a peft LoRA wrapper). A forward pass runs the
decoder only, takes the final hidden state of each prompt and multiplies it by the n rows of the LM
head that belong to the model-id tokens, so the full-vocabulary head is never computed.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassCalibrationError

from switchkit.prompt import PromptFormat

from .base import TrainableModule
from .data import collate


class UtilityRegret(Metric):
    """Mean utility lost by the chosen model: ``max_i u_i - u_chosen``."""

    higher_is_better = False
    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("total", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, utilities: torch.Tensor) -> None:
        """``preds`` are chosen model ids [B]; ``utilities`` are [B, n]."""
        chosen = utilities.gather(1, preds[:, None]).squeeze(1)
        self.total += (utilities.max(dim=1).values - chosen).sum()
        self.count += preds.numel()

    def compute(self) -> torch.Tensor:
        """The mean regret."""
        return self.total / self.count.clamp(min=1)


class SwitcherModule(TrainableModule):
    """Train a causal LM to pick the next writer: cross-entropy over the n model-id logits at the last position."""

    def __init__(self, model, tokenizer, n: int, fmt: PromptFormat, *, lr: float = 2e-4, soft_targets: bool = False,
                 soft_temperature: float = 1.0, max_length: Optional[int] = None):
        super().__init__(model, tokenizer, lr=lr)
        self.n, self.format = n, fmt
        self.vocab = fmt.vocab(tokenizer, n)
        self.soft_targets, self.soft_temperature = soft_targets, soft_temperature
        self.max_length = max_length
        self.register_buffer("id_tokens", torch.tensor(self.vocab.token_ids), persistent=False)
        metrics = {
            "acc": MulticlassAccuracy(num_classes=n, average="micro"),
            "ece": MulticlassCalibrationError(num_classes=n),
            "regret": UtilityRegret(),
        }
        self.val_metrics = MetricCollection(metrics, prefix="val_")
        self.val_class_acc = MulticlassAccuracy(num_classes=n, average=None)

    @property
    def lm(self):
        """The underlying transformers causal LM (unwrapped from peft if needed)."""
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, last_index: torch.Tensor) -> torch.Tensor:
        """Logits [B, n] of the model-id tokens at each sequence's final real position."""
        lm = self.lm
        hidden = lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        final = hidden[torch.arange(hidden.shape[0], device=hidden.device), last_index]
        head = lm.get_output_embeddings()
        logits = final @ head.weight[self.id_tokens].T
        if getattr(head, "bias", None) is not None:
            logits = logits + head.bias[self.id_tokens]
        cap = getattr(lm.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits.float()

    def _loss(self, logits: torch.Tensor, batch: dict) -> torch.Tensor:
        if self.soft_targets:
            return F.cross_entropy(logits, F.softmax(batch["utilities"] / self.soft_temperature, dim=-1))
        return F.cross_entropy(logits, batch["labels"])

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """One micro-batch: restricted-logit cross-entropy (hard labels or soft utility targets)."""
        logits = self(batch["input_ids"], batch["attention_mask"], batch["last_index"])
        loss = self._loss(logits, batch)
        acc = (logits.argmax(-1) == batch["labels"]).float().mean()
        self.log("train_loss", loss, prog_bar=True, batch_size=len(logits))
        self.log("train_acc", acc, prog_bar=True, batch_size=len(logits))
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """Loss, accuracy, per-class accuracy, calibration error and utility regret on held-out records."""
        logits = self(batch["input_ids"], batch["attention_mask"], batch["last_index"])
        probs = logits.softmax(-1)
        self.log("val_loss", self._loss(logits, batch), prog_bar=True, batch_size=len(logits))
        self.val_metrics["acc"].update(probs, batch["labels"])
        self.val_metrics["ece"].update(probs, batch["labels"])
        self.val_metrics["regret"].update(probs.argmax(-1), batch["utilities"])
        self.val_class_acc.update(probs, batch["labels"])

    def on_validation_epoch_end(self) -> None:
        """Log the epoch's validation metrics."""
        self.log_dict(self.val_metrics.compute(), prog_bar=True)
        for i, value in enumerate(self.val_class_acc.compute()):
            self.log(f"val_acc_class_{i}", value)
        self.val_metrics.reset()
        self.val_class_acc.reset()

    @torch.no_grad()
    def decide_probs(self, prompts: Sequence[str], batch_size: int = 8) -> torch.Tensor:
        """Switcher probabilities [B, n] for selector texts (the encoding of training and the engine)."""
        was_training = self.training
        self.eval()
        out = []
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        for start in range(0, len(prompts), batch_size):
            rows = [{"input_ids": self.format.encode(self.tokenizer, self.vocab, p, self.max_length), "label": 0,
                     "utilities": [0.0] * self.n} for p in prompts[start:start + batch_size]]
            batch = {k: v.to(self.device) for k, v in collate(rows, pad_id).items()}
            out.append(self(batch["input_ids"], batch["attention_mask"], batch["last_index"]).softmax(-1).cpu())
        self.train(was_training)
        return torch.cat(out)
