"""The text side of a training run: where a batch's text features come from, and whether any of
them train."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from fileio import repo_path
from modeling import CLaMP3Model, masked_mean

from training import distributed
from training.data import TrainingRecord
from training.precision import Precision
from training.text import LiveText, TextSource
from training.text_cache import TextFeatureCache, fingerprint


class TextSide:
    """Where a batch's text features come from: the memory-mapped cache (text tower frozen and
    ``TEXT_VARIANTS`` > 0), the frozen tower run every step, or the tower training with the rest.
    With ``TRAIN_TEXT_PROJ`` (full mode, frozen tower) the cache holds the tower's pooled outputs
    and the projection, which trains, is applied every step."""

    def __init__(self, cfg: dict[str, Any], core: CLaMP3Model, text_frozen: bool, records: Sequence[TrainingRecord],
                 valid: Sequence[TrainingRecord], log: Callable[[str], None], *, tokenizer: Any, precision: Precision,
                 dist: distributed.DistContext, progress: bool):
        self.core = core
        self.device = dist.device
        self.precision = precision
        self.frozen = text_frozen
        self.project_each_step = cfg["TRAIN_MODE"] == "full" and text_frozen and bool(cfg["TRAIN_TEXT_PROJ"])
        self.live = LiveText(tokenizer, int(cfg["MAX_TEXT_LENGTH"]))
        self.train_cache: TextFeatureCache | None = None
        self.valid_cache: TextFeatureCache | None = None
        if not (text_frozen and int(cfg["TEXT_VARIANTS"]) > 0):
            log("text features: the text tower runs every step" + ("" if text_frozen else " (and trains)"))
            return
        core.text_model.eval()
        # The features depend on the weights, on how they are computed (autocast dtype) and on
        # whether they are projected.
        towers = (core.text_model,) if self.project_each_step else (core.text_model, core.text_proj)
        stage = "pooled" if self.project_each_step else "projected"
        text_fingerprint = hashlib.blake2b(f"{fingerprint(*towers)}-{precision.name}-{stage}".encode(),
                                           digest_size=16).hexdigest()

        @torch.no_grad()
        def encode(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            with precision.autocast():
                return self._frozen_features(ids.to(dist.device), mask.to(dist.device)).float().cpu()

        common = dict(tokenizer=tokenizer, encode=encode, text_fingerprint=text_fingerprint,
                      max_text_length=int(cfg["MAX_TEXT_LENGTH"]), seed=int(cfg["SEED"]), rank=dist.rank,
                      world_size=dist.world_size, barrier=distributed.barrier if dist.enabled else None,
                      progress=progress and dist.is_main)
        root = repo_path(cfg["TEXT_CACHE_DIR"])
        self.train_cache = TextFeatureCache.build(root, records, variants=int(cfg["TEXT_VARIANTS"]), train=True,
                                                  text_dropout=bool(cfg["TEXT_DROPOUT"]), **common)
        self.valid_cache = TextFeatureCache.build(root, valid, variants=1, train=False, **common)
        log(f"text features: cached ({stage}) in {self.train_cache.folder} ({cfg['TEXT_VARIANTS']} variants per "
            f"record; {self.train_cache.computed + self.valid_cache.computed} computed on rank 0's share now)")

    def _frozen_features(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """What the frozen part of the text side computes: the pooled tower output when the
        projection trains, the projected feature otherwise."""
        if self.project_each_step:
            return masked_mean(self.core.hidden_states("text", ids, mask).float(), mask)
        return self.core.features("text", ids, mask)

    def for_dataset(self, train: bool) -> TextSource:
        cache = self.train_cache if train else self.valid_cache
        return cache if cache is not None else self.live

    def batch_side(self, core: CLaMP3Model, batch: dict[str, Any], train: bool):
        """Text features of the batch (a tensor, no gradient) or, when part of the text side trains,
        the closure that computes them with gradient (GradCache calls it per micro-batch)."""
        cache = self.train_cache if train else self.valid_cache
        if self.project_each_step:
            if cache is not None:
                batch["text_pooled"] = cache.features(batch["text_rows"]).to(self.device)
            else:
                with torch.no_grad(), self.precision.autocast():
                    batch["text_pooled"] = self._frozen_features(batch["text_ids"], batch["text_mask"]).float()

            def project(micro: dict[str, Any]) -> torch.Tensor:
                return core.text_proj(micro["text_pooled"])

            if not train:
                with torch.no_grad():
                    return project(batch)
            return project
        if cache is not None:
            return cache.features(batch["text_rows"]).to(self.device)

        def encode_text(micro: dict[str, Any]) -> torch.Tensor:
            with self.precision.autocast():
                return core.features("text", micro["text_ids"], micro["text_mask"])

        if self.frozen or not train:
            with torch.no_grad():
                return encode_text(batch).float()
        return encode_text
