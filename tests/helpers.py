"""What several test modules share that is not a fixture: where things are, loading a script as a
module, launching ``torchrun`` jobs, the trainer's test inputs and the test-set sources. Fixtures
live in ``conftest.py``."""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from types import ModuleType

from fileio import write_jsonl

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DIR = Path(os.environ.get("CLAMP3_SHARED_DIR", REPO_ROOT.parent / "shared")).resolve()
OFFICIAL = SHARED_DIR / "fixtures" / "official"
TINY_WEIGHTS = OFFICIAL / "model" / "tiny_clamp3.pth"
TINY_MODEL_CONFIG = OFFICIAL / "model" / "tiny_model_config.json"


def load_script(path: str | os.PathLike, name: str | None = None) -> ModuleType:
    """A script (which is not importable by name: ``clamp3_eval.py`` exists twice) as a module.

    ``path`` is relative to the repository root unless absolute; ``name`` defaults to the path's
    folder and stem, so the two ``clamp3_eval.py`` never share a module name."""
    path = Path(path)
    path = path if path.is_absolute() else REPO_ROOT / path
    if name is None:
        relative = path.resolve().relative_to(REPO_ROOT) if path.resolve().is_relative_to(REPO_ROOT) else path
        name = "script_" + "_".join(relative.with_suffix("").parts)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(script: str | os.PathLike, nproc: int, args: list[str], timeout: float = 240,
             launcher: str = "torch.distributed.run", env: dict[str, str] | None = None,
             ) -> subprocess.CompletedProcess:
    """``torchrun`` (or the seed README's ``python -m torch.distributed.launch --use_env``) with
    ``nproc`` CPU processes, from this interpreter (no path to a ``torchrun`` binary assumed)."""
    extra = ["--use_env"] if launcher == "torch.distributed.launch" else []
    command = [sys.executable, "-m", launcher, f"--nproc_per_node={nproc}", *extra, "--master_addr=127.0.0.1",
               f"--master_port={free_port()}", str(script), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, check=False)


# ----------------------------------------------------------------------------- training
# The trainer's tests (test_train*.py, test_gpu.py): records over the fixture files, the trainer's
# command line, what a run leaves, and a LoRA model of the tiny base. Heavy imports stay inside.

TRAINER_SCRIPT = REPO_ROOT / "code" / "train_clamp3_lora.py"


def make_records(root: Path, fmt: str, valid: int = 8, paired: bool = False) -> Path:
    """Training and validation records over the real fixture files of ``fmt`` (32 ABC, 30 MTF),
    each with its own words as text (the test tokenizer knows w0 ... w199). ``paired``: record i
    of each format gets ``pair_id`` ``p<i>`` unless i % 4 == 3 (those, and ABC 30 and 31, have no
    partner); the two records of a pair have the same text."""
    import json
    import shutil

    folders = ["int_abc", "int_abc_from_abc_inputs"] if fmt == "abc" else ["mtf"]
    files = sorted(p for folder in folders for p in (OFFICIAL / "outputs" / folder).glob(f"*.{fmt}"))
    music = root / "music"
    music.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, path in enumerate(files):
        shutil.copy(path, music / path.name)
        rows.append({"id": f"{fmt}{i}", "filepaths": [f"music/{path.name}"],
                     "title": f"w{i} w{(i * 7) % 50 + 50}", "genres": [f"w{100 + i % 5}"],
                     "description": " ".join(f"w{(i * 13 + j) % 200}" for j in range(6)),
                     **({"pair_id": f"p{i}"} if paired and i % 4 != 3 else {})})
    (root / f"valid_{fmt}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:valid]), encoding="utf-8")
    jsonl = root / f"train_{fmt}.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows[valid:]), encoding="utf-8")
    return jsonl


def no_dropout_model_config(path: Path) -> Path:
    """The tiny model's configuration with every tower's dropout off, written to ``path``."""
    import json

    data = json.loads(TINY_MODEL_CONFIG.read_text())
    for tower in ("symbolic", "text", "audio"):
        data[tower].update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    path.write_text(json.dumps(data))
    return path


def options(tmp_path: Path, tokenizer: Path, fmt: str = "abc", **overrides) -> list[str]:
    """The trainer's arguments for a short run of ``fmt`` on ``make_records(tmp_path, fmt)``, its run
    folder, adapter and text cache under ``tmp_path``; ``overrides`` are config keys."""
    import json

    settings = {
        f"LORA_{fmt.upper()}_TRAIN_JSONL": str(tmp_path / f"train_{fmt}.jsonl"),
        f"LORA_{fmt.upper()}_VALID_JSONL": str(tmp_path / f"valid_{fmt}.jsonl"), "TEXT_MODEL_NAME": str(tokenizer),
        "LORA_LOG_DIR": str(tmp_path / "run"), f"LORA_{fmt.upper()}_ADAPTER_DIR": str(tmp_path / f"adapter_{fmt}"),
        "LORA_BATCH_SIZE": 4, "LORA_NUM_EPOCHS": 2, "LORA_LEARNING_RATE": 5e-3, "LORA_WARMUP_STEPS": 0,
        "LORA_R": 4, "NUM_WORKERS": 0, "TEXT_CACHE_DIR": str(tmp_path / "text_cache"), "LORA_PATIENCE": 0,
        # The CPU in float32, whatever the machine has: "auto" would train on a GPU in bf16, where
        # the bitwise comparisons (resume, ranks, workers) cannot hold, and 2-rank jobs would ask
        # for cuda:1. The GPU runs are tests/test_gpu.py's.
        "TRAIN_DEVICE": "cpu",
        **overrides}
    args = ["--format", fmt, "--weights", str(TINY_WEIGHTS), "--model_config", str(TINY_MODEL_CONFIG), "--quiet"]
    return args + [f"--{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in settings.items()]


def joint_options(tmp_path: Path, tokenizer: Path, **overrides) -> list[str]:
    """The trainer's arguments for a short joint run (``--format both``, ``ALIGN_WEIGHT`` 1 unless
    overridden) on ``make_records(tmp_path, fmt, paired=True)`` of both formats."""

    paths = {f"LORA_{fmt.upper()}_{key}": str(tmp_path / name) for fmt in ("abc", "mtf")
             for key, name in (("TRAIN_JSONL", f"train_{fmt}.jsonl"), ("VALID_JSONL", f"valid_{fmt}.jsonl"),
                               ("ADAPTER_DIR", f"adapter_{fmt}"))}
    args = options(tmp_path, tokenizer, "abc", **{"ALIGN_WEIGHT": 1.0, **paths, **overrides})
    args[args.index("--format") + 1] = "both"
    return args


def history(tmp_path: Path, fmt: str = "abc") -> list[dict]:
    """The run's per-epoch history (``<run>/ABC_history.json``)."""
    import json

    return json.loads((tmp_path / "run" / f"{fmt.upper()}_history.json").read_text())


def adapter_weights(folder: Path) -> dict:
    """The tensors of a saved adapter, by name."""
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def train_job(nproc: int, args: list[str], timeout: float = 240, launcher: str = "torch.distributed.run",
              ) -> subprocess.CompletedProcess:
    """The trainer under ``torchrun`` with ``nproc`` CPU processes."""
    return torchrun(TRAINER_SCRIPT, nproc, args, timeout=timeout, launcher=launcher)


def lora_core(dropout: float) -> tuple:
    """``(PEFT model, its CLaMP3Model)``: the tiny base with a gaussian-initialised LoRA adapter of
    LoRA dropout ``dropout``, the same initialisation every time."""
    import lora
    import runconfig
    import torch
    from modeling import ModelConfig, load_clamp3

    torch.manual_seed(0)
    model = lora.add_adapter(load_clamp3(ModelConfig.from_json(TINY_MODEL_CONFIG), TINY_WEIGHTS,
                                         attn_implementation="sdpa"),
                             runconfig.build_config(overrides={"LORA_INIT_WEIGHTS": "gaussian",
                                                               "LORA_DROPOUT": dropout}), "abc")
    return model, model.get_base_model()


def music_batch(lengths: list[int], seed: int = 0) -> dict:
    """Random patches of the given lengths, padded to the longest, with their mask."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    longest = max(lengths)
    mask = (torch.arange(longest)[None, :] < torch.tensor(lengths)[:, None]).long()
    return {"patches": torch.randint(0, 128, (len(lengths), longest, 64), generator=generator),
            "patch_mask": mask}


def saved_bytes(fn, model) -> tuple:
    """``fn()`` and the bytes of the distinct storages autograd keeps for its backward, the
    model's parameters (kept anyway) left out."""
    import torch

    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = fn()
    return out, sum(storages.values())


def trainer_and_plain_path(batch: dict, dropout: float, symbolic_dropout: bool,
                           check_patched=None, after=None) -> list[tuple]:
    """``(features, LoRA gradients, bytes kept for backward, RNG state)`` of the trainer's music encoder
    and then of the model's own forward, each on a fresh LoRA model from the same seed.
    ``check_patched(core)`` runs before the trainer's pass, ``after(core)`` after each pass."""
    import functools

    import torch
    from training.model_setup import music_encoder, set_train_mode

    results = []
    for patched in (True, False):
        model, core = lora_core(dropout=dropout)
        set_train_mode(core, text_frozen=True, symbolic_dropout=symbolic_dropout)
        if patched:
            if check_patched is not None:
                check_patched(core)
            encode = functools.partial(music_encoder(core, torch.device("cpu"), "fp32"), batch)
        else:
            encode = functools.partial(core.features, "symbolic", batch["patches"], batch["patch_mask"])
        torch.manual_seed(7)
        features, kept = saved_bytes(encode, model)
        features.pow(2).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((features.detach(), grads, kept, torch.get_rng_state()))
        if after is not None:
            after(core)
    return results


# ------------------------------------------------------------------- test-set sources (testsets, preflight)

ABC_FIXTURES = OFFICIAL / "outputs" / "int_abc_from_abc_inputs"
MTF_FIXTURES = OFFICIAL / "outputs" / "mtf"
ABC_FILES = ["airdsAirs_book3_X0401_n0_v1", "josquin_adieuMesAmours_X1_n0_v1", "josquin_milleRegrets_X2_n1_v1",
             "miscFolk_americanfifeopus_X19_n15", "nottingham-dataset_reelsa-c_X81_n1_v1",
             "oneills1850_0351-0400_X352_n1_v1"]
MTF_FILES = ["m21test_test01", "m21test_test20", "m21test_test16", "m21write_demos_drum_sample"]


def make_sources(root: Path) -> dict[str, Path]:
    """A tiny WikiMT-X output, a tiny MidiCaps test split and a training JSONL that shares exactly one
    id (wm01), one title (wm02) and one file's bytes (lmd/b/1) with them. wm04 has no text and wm05
    an empty music file."""
    wikimt = root / "wikimt"
    (wikimt / "abc").mkdir(parents=True)
    records = []
    for number, name in enumerate(ABC_FILES):
        pid = f"wm{number:02d}"
        data = b"" if pid == "wm05" else (ABC_FIXTURES / f"{name}.abc").read_bytes()
        (wikimt / "abc" / f"{pid}.abc").write_bytes(data)
        record = {"id": pid, "filepaths": [f"abc/{pid}.abc"], "normalisation": "direct", "title": f"Tune {number}",
                  "artists": ["Someone"]}
        if pid != "wm04":
            record.update(background=f"background {number}", description=f"description {number}")
        if pid == "wm00":
            record["scene"] = "a scene"
        records.append(record)
    write_jsonl(wikimt / "wikimt.jsonl", records)

    # MidiCaps' filepaths are relative to the JSONL's folder, and its ids hold slashes.
    midicaps = root / "training" / "midicaps_test_mtf.jsonl"
    (root / "mtf").mkdir()
    rows = []
    for number, name in enumerate(MTF_FILES):
        shutil.copyfile(MTF_FIXTURES / f"{name}.mtf", root / "mtf" / f"{name}.mtf")
        rows.append({"id": f"lmd/{'ab'[number % 2]}/{number}", "filepaths": [f"../mtf/{name}.mtf"],
                     "caption": f"caption {number}", "genre": ["pop"]})
    write_jsonl(midicaps, rows)

    train_dir = root / "train"
    train_dir.mkdir()
    shutil.copyfile(MTF_FIXTURES / f"{MTF_FILES[1]}.mtf", train_dir / "renamed.mtf")  # lmd/b/1's bytes
    shutil.copyfile(MTF_FIXTURES / "m21test_test06.mtf", train_dir / "other.mtf")
    training = train_dir / "clamp3_train.jsonl"
    write_jsonl(training, [
        {"id": "wm01", "filepaths": ["other.mtf"], "title": "Unrelated"},
        {"id": "QmX", "filepaths": ["renamed.mtf"], "title": "Something else"},
        {"id": "QmY", "filepaths": ["missing.abc"], "song_name": ["  TÚNE 2!! "]},
    ])
    return {"wikimt": wikimt, "midicaps": midicaps, "training": training, "root": root}
