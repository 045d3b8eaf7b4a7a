"""Tiny towers and batches for the training-loss tests, and the worker ``torchrun`` starts for the
multi-process ones: ``dist_loss_worker.py equivalence OUT_DIR`` or ``dist_loss_worker.py fail``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn
from training import distributed
from training.loss import ContrastiveLoss, contrastive_step

PATCH_SIZE = 4
PROJECTION = 16
TEXT_VOCAB = 50
GLOBAL_BATCH = 8


class MusicTower(nn.Module):
    """A two-layer M3 patch encoder (hidden 32) with the official pooling and a projection."""

    def __init__(self, dropout: float):
        super().__init__()
        from modeling import M3PatchEncoder
        from transformers import BertConfig

        bert = BertConfig(vocab_size=1, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                          intermediate_size=64, max_position_embeddings=16, hidden_dropout_prob=dropout,
                          attention_probs_dropout_prob=dropout)
        bert._attn_implementation = "eager"
        self.encoder = M3PatchEncoder(bert, patch_size=PATCH_SIZE)
        self.proj = nn.Linear(32, PROJECTION)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        from modeling import masked_mean

        hidden = self.encoder(batch["patches"], batch["patch_masks"])["last_hidden_state"]
        return self.proj(masked_mean(hidden, batch["patch_masks"]))


class TextTower(nn.Module):
    """Embedding, dropout, masked mean and a projection: a text side small enough to run anywhere."""

    def __init__(self, dropout: float):
        super().__init__()
        self.embedding = nn.Embedding(TEXT_VOCAB, 24)
        self.dropout = nn.Dropout(dropout)
        self.proj = nn.Linear(24, PROJECTION)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        mask = batch["text_masks"].unsqueeze(-1).float()
        hidden = self.dropout(self.embedding(batch["text_ids"]))
        return self.proj((hidden * mask).sum(1) / mask.sum(1))


def build_towers(dropout: float, seed: int = 0) -> tuple[MusicTower, TextTower]:
    torch.manual_seed(seed)
    return MusicTower(dropout).train(), TextTower(dropout).train()


def make_batch(size: int = GLOBAL_BATCH, seed: int = 1) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    patch_lengths = torch.randint(2, 7, (size,), generator=generator)
    text_lengths = torch.randint(1, 6, (size,), generator=generator)
    return {
        "patches": torch.randint(0, 128, (size, 6, PATCH_SIZE), generator=generator),
        "patch_masks": (torch.arange(6)[None, :] < patch_lengths[:, None]).long(),
        "text_ids": torch.randint(0, TEXT_VOCAB, (size, 5), generator=generator),
        "text_masks": (torch.arange(5)[None, :] < text_lengths[:, None]).long(),
        # rows 1 and 6 (on different ranks when split in two) describe the same text
        "text_keys": torch.tensor([10, 11, 12, 13, 14, 15, 11, 17])[:size],
        "music_keys": torch.arange(size),
    }


def local_rows(batch: dict[str, torch.Tensor], rank: int, world_size: int) -> dict[str, torch.Tensor]:
    share = batch_rows(batch) // world_size
    return {key: value[rank * share: (rank + 1) * share] for key, value in batch.items()}


def batch_rows(batch: dict[str, torch.Tensor]) -> int:
    return len(next(iter(batch.values())))


# (name, normalized loss, text trains, micro-batch)
SCENARIOS = [
    ("plain_both_normalized", True, True, 0),
    ("cached_both_normalized", True, True, 2),
    ("cached_music_only", False, False, 3),
]


def run_scenario(batch: dict[str, torch.Tensor], normalized: bool, text_trains: bool, micro_batch: int,
                 ) -> dict[str, Any]:
    """One step on ``batch`` with dropout off; returns the loss and every gradient (after averaging
    over ranks in a multi-process job)."""
    music_tower, text_tower = build_towers(dropout=0.0)
    loss_fn = ContrastiveLoss("normalized" if normalized else "clamp3")
    modules = {"music": music_tower, "text": text_tower, "loss": loss_fn}
    if text_trains:
        text: Any = text_tower
    else:
        with torch.no_grad():
            text = text_tower(batch)
    loss = contrastive_step(batch, music_tower, text, loss_fn, micro_batch=micro_batch,
                            text_keys=batch["text_keys"], music_keys=batch["music_keys"])
    parameters = [p for module in modules.values() for p in module.parameters()]
    distributed.all_reduce_gradients(parameters, bucket_mb=0.01)  # small buckets: several all_reduces
    grads = {f"{side}.{name}": p.grad.clone() for side, module in modules.items()
             for name, p in module.named_parameters() if p.grad is not None}
    return {"loss": loss, "grads": grads}


def equivalence(context: distributed.DistContext, out_dir: Path) -> None:
    batch = local_rows(make_batch(), context.rank, context.world_size)
    results: dict[str, Any] = {name: run_scenario(batch, normalized, text_trains, micro)
                               for name, normalized, text_trains, micro in SCENARIOS}

    # A gradient present on rank 0 only is averaged with zeros; one absent everywhere stays None.
    only_rank0, nowhere = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(2))
    if context.rank == 0:
        only_rank0.grad = torch.ones(3)
    distributed.all_reduce_gradients([only_rank0, nowhere])
    results["only_rank0_grad"] = only_rank0.grad
    results["nowhere_grad"] = nowhere.grad

    results["gathered_unequal"] = distributed.all_gather_tensor(torch.full((context.rank + 1, 2), context.rank))
    results["mean_rank"] = distributed.all_reduce_mean(float(context.rank))
    results["broadcast"] = distributed.broadcast_object({"from": context.rank})
    results["objects"] = distributed.all_gather_object(f"rank {context.rank}")
    torch.save(results, out_dir / f"rank{context.rank}.pt")


def fail(context: distributed.DistContext) -> None:
    if context.rank == 1:
        raise RuntimeError("deliberate failure on one rank")
    distributed.barrier()  # rank 0 waits here for a rank that will never come


def main() -> None:
    torch.set_num_threads(1)
    mode = sys.argv[1]
    if mode == "equivalence":
        out_dir = Path(sys.argv[2])
        distributed.run_distributed(lambda context: equivalence(context, out_dir), "cpu", timeout_minutes=2)
    elif mode == "fail":
        distributed.run_distributed(fail, "cpu", timeout_minutes=2)
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main()
