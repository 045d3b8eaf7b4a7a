"""The pre-flight of an evaluation: every input an evaluation needs, checked in minutes, not after hours.

A check is a name and a function returning ``(ok, message)``; a failed check's message says what
to do (the command to run, the config key to set). Checks that need an earlier one (a forward pass
needs the weights) fail with "not run" when it failed, so every line of a run can be read alone.
"""

from __future__ import annotations

import gc
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import formats
import lora
import numpy as np
from features import FeatureExtractor, load_text_tokenizer
from modeling import CheckpointMismatchError, CLaMP3Model, ModelConfig, load_clamp3, resolve_device

from evaluation import testsets

CheckFunction = Callable[[], tuple[bool, str]]
TEST_DATA_FIX = "run: python prepare_test_data.py (or set TEST_DATA_DIR to a prepared test set)"


@dataclass
class Check:
    name: str
    run: CheckFunction


@dataclass
class CheckResult:
    name: str
    ok: bool
    message: str

    def line(self) -> str:
        return f"{'PASS' if self.ok else 'FAIL'}  {self.name}: {self.message}"


def run_checks(checks: Sequence[Check], echo: Callable[[str], None] | None = print) -> list[CheckResult]:
    """Run every check in order (an exception is that check's failure), echoing one line each."""
    results = []
    for check in checks:
        try:
            ok, message = check.run()
        except Exception as exc:  # noqa: BLE001 - one broken check must not hide the others
            ok, message = False, f"{type(exc).__name__}: {exc}"
        result = CheckResult(check.name, bool(ok), message)
        results.append(result)
        if echo is not None:
            echo(result.line())
    return results


@dataclass
class PreflightSettings:
    cfg: dict[str, Any]
    weights: Path
    model_config_path: Path | None
    test_data_dir: Path
    formats: tuple[str, ...] = formats.FORMATS
    skip_adapters: bool = False
    adapter_dirs: dict[str, Path] = field(default_factory=dict)  # format -> folder; default LORA_*_ADAPTER_DIR

    def adapter_dir(self, fmt: str) -> Path:
        return self.adapter_dirs.get(fmt) or lora.adapter_dir(self.cfg, fmt)


class Preflight:
    """The checks of one evaluation set-up and the state they share (model, tokenizer, test records)."""

    def __init__(self, settings: PreflightSettings):
        self.settings = settings
        self.cfg = settings.cfg
        self.model_config: ModelConfig | None = None
        self.model: CLaMP3Model | None = None
        self.tokenizer: Any = None
        self.records: dict[str, list[dict]] = {}
        self.base_features: dict[str, np.ndarray] = {}
        self._base_fingerprint: str | None = None

    def checks(self) -> list[Check]:
        formats = self.settings.formats
        # The tokenizer and the weights first (each fails in seconds), then the test data (every file read).
        checks = [Check("model config", self.check_model_config), Check("text tokenizer", self.check_tokenizer),
                  Check("base weights", self.check_weights)]
        checks += [Check(f"test data {fmt}", self._bind(self.check_test_data, fmt)) for fmt in formats]
        checks += [Check(f"forward symbolic {fmt} (base)", self._bind(self.check_symbolic_forward, fmt))
                   for fmt in formats]
        checks.append(Check("forward text (base)", self.check_text_forward))
        if not self.settings.skip_adapters:
            checks += [Check(f"adapter {fmt}", self._bind(self.check_adapter, fmt)) for fmt in formats]
        return checks

    @staticmethod
    def _bind(method: Callable[[str], tuple[bool, str]], fmt: str) -> CheckFunction:
        return lambda: method(fmt)

    # ------------------------------------------------------------------ inputs

    def check_model_config(self) -> tuple[bool, str]:
        try:
            self.model_config = ModelConfig.resolve(self.cfg, self.settings.model_config_path)
        except (FileNotFoundError, ValueError) as exc:
            hint = "" if "--model_config" in str(exc) else \
                ". Fix: pass --model_config FILE (or set MODEL_CONFIG) with the sizes of the weights"
            return False, f"{exc}{hint}"
        where = self.settings.model_config_path or "official sizes from config.py"
        sizes = f"symbolic {self.model_config.symbolic['hidden_size']}, text {self.model_config.text['hidden_size']}"
        return True, f"{where} ({sizes}, projection {self.model_config.projection_size})"

    def check_tokenizer(self) -> tuple[bool, str]:
        name = self.cfg["TEXT_MODEL_NAME"]
        try:
            self.tokenizer = load_text_tokenizer(name)
        except RuntimeError as exc:
            return False, str(exc)
        return True, f"{name} ({len(self.tokenizer)} tokens)"

    def check_test_data(self, fmt: str) -> tuple[bool, str]:
        test_dir = self.settings.test_data_dir
        try:
            records = testsets.read_test_set(test_dir, fmt)
        except (testsets.TestSetError, ValueError) as exc:
            return False, f"{exc}. Fix: {TEST_DATA_FIX}"
        if not records:
            return False, f"{test_dir / testsets.TEST_FILES[fmt]} holds no records. Fix: {TEST_DATA_FIX}"
        problems = [p for r in records if (p := testsets.record_problem(r, test_dir)) is not None]
        ids = [r.get("id") for r in records]
        if len(set(ids)) != len(ids):
            problems.append(f"{len(ids) - len(set(ids))} duplicate ids")
        if problems:
            shown = "; ".join(problems[:3]) + (f"; ... {len(problems) - 3} more" if len(problems) > 3 else "")
            return False, f"{len(problems)} of {len(records)} records unusable ({shown}). Fix: {TEST_DATA_FIX}"
        self.records[fmt] = records
        return True, f"{len(records)} records in {test_dir / testsets.TEST_FILES[fmt]}, every file patchifies"

    def check_weights(self) -> tuple[bool, str]:
        if self.model_config is None:
            return False, "not run: the model config failed (see above)"
        weights = self.settings.weights
        try:
            self.model = load_clamp3(self.model_config, weights, device=self._device(),
                                     attn_implementation=self.cfg["ATTN_IMPLEMENTATION"])
        except FileNotFoundError as exc:
            return False, f"{exc} (or set CLAMP3_WEIGHTS_PATH)"
        except CheckpointMismatchError as exc:
            return False, f"{exc}\n  Fix: pass --model_config FILE matching {weights}, or the right --weights"
        return True, f"{weights} loaded strictly on {self._device()}"

    def _device(self):
        return resolve_device(self.cfg["EXTRACT_DEVICE"])

    def _extractor(self, model: CLaMP3Model) -> FeatureExtractor:
        return FeatureExtractor.from_config(model, self.cfg, tokenizer=self.tokenizer, device=self._device())

    # ------------------------------------------------------------------ forward passes

    def _symbolic_feature(self, model: CLaMP3Model, fmt: str) -> tuple[np.ndarray, str]:
        record = self.records[fmt][0]
        path = testsets.music_path(record, self.settings.test_data_dir)
        extractor = self._extractor(model)
        inputs = extractor.symbolic_input(path.read_text(encoding="utf-8"))
        return extractor.extract("symbolic", [inputs])[0], f"{record['id']} ({len(inputs)} patches)"

    def _feature_problem(self, feature: np.ndarray) -> str | None:
        expected = (1, self.model_config.projection_size)
        if feature.shape != expected:
            return f"feature of shape {feature.shape}, expected {expected}"
        if not np.isfinite(feature).all():
            return "feature holds NaN or inf"
        return None

    def _needs(self, fmt: str | None = None) -> str | None:
        if self.model is None:
            return "not run: the base weights did not load (see above)"
        if fmt is not None and fmt not in self.records:
            return f"not run: the {fmt} test data failed (see above)"
        return None

    def check_symbolic_forward(self, fmt: str) -> tuple[bool, str]:
        if (missing := self._needs(fmt)) is not None:
            return False, missing
        feature, what = self._symbolic_feature(self.model, fmt)
        if (problem := self._feature_problem(feature)) is not None:
            return False, f"{what}: {problem}"
        self.base_features[fmt] = feature
        return True, f"{what} -> {feature.shape}"

    def check_text_forward(self) -> tuple[bool, str]:
        if (missing := self._needs()) is not None:
            return False, missing
        if self.tokenizer is None:
            return False, "not run: the text tokenizer did not load (see above)"
        if not self.records:
            return False, f"not run: no test data loaded (see above). Fix: {TEST_DATA_FIX}"
        record = next(iter(self.records.values()))[0]
        extractor = self._extractor(self.model)
        ids = extractor.text_input(testsets.first_text(record))
        vocab = int(self.model_config.text["vocab_size"])
        if int(ids.max()) >= vocab:
            return False, (f"token id {int(ids.max())} is beyond the text tower's {vocab} embeddings: "
                           "TEXT_MODEL_NAME is not the tokenizer of these weights; set --TEXT_MODEL_NAME")
        feature = extractor.extract("text", [ids])[0]
        if (problem := self._feature_problem(feature)) is not None:
            return False, problem
        return True, f"text of {record['id']} ({len(ids)} tokens) -> {feature.shape}"

    # ------------------------------------------------------------------ adapters

    def _fingerprint_problem(self, folder: Path) -> str | None:
        """A trained adapter records the base it was trained on; on another base it means nothing."""
        selection_path = folder / "selection.json"
        if not selection_path.is_file():
            return None
        selection = json.loads(selection_path.read_text(encoding="utf-8"))
        expected = selection.get("base_fingerprint")
        if not expected:
            return None
        if self._base_fingerprint is None:
            from fileio import file_sha256

            self._base_fingerprint = file_sha256(self.settings.weights)
        if self._base_fingerprint != expected:
            return (f"trained on another base checkpoint ({selection.get('base_weights')}); pass that as "
                    f"--weights, or retrain the adapter on {self.settings.weights}")
        return None

    def check_adapter(self, fmt: str) -> tuple[bool, str]:
        folder = self.settings.adapter_dir(fmt)
        fix = (f"train it: python code/train_clamp3_lora.py --format {fmt}, set LORA_{fmt.upper()}_ADAPTER_DIR "
               "to a trained adapter, or pass --skip_adapters to evaluate the base alone")
        if not (folder / "adapter_config.json").is_file():
            return False, f"no adapter in {folder} (no adapter_config.json). Fix: {fix}"
        if (missing := self._needs(fmt)) is not None:
            return False, missing
        if (problem := self._fingerprint_problem(folder)) is not None:
            return False, f"{folder}: {problem}"
        adapted = None
        try:
            adapted = lora.with_adapter(self.model, folder)
            feature, what = self._symbolic_feature(adapted, fmt)
        except Exception as exc:  # noqa: BLE001 - PEFT raises many kinds; the fix is the same
            return False, f"{folder} does not load onto the base: {type(exc).__name__}: {exc}. Fix: {fix}"
        finally:
            del adapted
            gc.collect()
        if (problem := self._feature_problem(feature)) is not None:
            return False, f"{what}: {problem}"
        message = f"{folder} loaded; {what} -> {feature.shape}"
        if fmt in self.base_features:
            delta = float(np.abs(feature - self.base_features[fmt]).max())
            message += f", max |adapter - base| = {delta:.3g}"
            if delta == 0.0:
                message += " (identical to the base: an untrained adapter?)"
        return True, message
