"""Constants a user edits. Names follow the official CLaMP 3 ``code/config.py`` where they exist.

Every script also takes ``--config FILE`` (a ``.py`` file of assignments or a ``.json`` object) and
``--KEY=value`` overrides of any name below; see ``runconfig.py``. Relative paths are resolved
against the repository root, so a script behaves the same from any working directory.
"""

# ---------------------------------------------------------------- M3 symbolic encoder
PATCH_SIZE = 64  # character slots per patch, special tokens included
PATCH_LENGTH = 512  # patches per sequence (= BERT max_position_embeddings)
PATCH_NUM_LAYERS = 12
TOKEN_NUM_LAYERS = 3  # M3 character decoder (pretraining only)
M3_HIDDEN_SIZE = 768

# ---------------------------------------------------------------- CLaMP 3
CLAMP3_HIDDEN_SIZE = 768  # shared embedding size: output of every projection
TEXT_MODEL_NAME = "FacebookAI/xlm-roberta-base"  # tokenizer: a local folder or the HF cache
MAX_TEXT_LENGTH = 128
AUDIO_HIDDEN_SIZE = 768
AUDIO_NUM_LAYERS = 12
MAX_AUDIO_LENGTH = 128  # MERT frames of 5 s
LOGIT_SCALE = 1  # fixed, not learned (no logit_scale key in the official state dict)

# Official C2 weights ("optimal for symbolic"), downloaded by the user; see README.
CLAMP3_WEIGHTS_PATH = (
    "code/weights_clamp3_c2_h_size_768_t_model_FacebookAI_xlm-roberta-base_t_length_128"
    "_a_size_768_a_layers_12_a_length_128_s_size_768_s_layers_12_p_size_64_p_length_512.pth"
)
# JSON model config (keys symbolic/audio/text/projection_size) overriding the sizes above;
# empty = the official sizes derived from the constants above.
MODEL_CONFIG = ""

# ---------------------------------------------------------------- audio (MERT features from audio files)
# The MERT model that turns audio into the features CLaMP 3's audio tower reads: a local folder
# (config.json + weights, relative to the repository root) or a Hugging Face id found in the local
# cache; never downloaded unless HF_HUB_OFFLINE=0 is set explicitly. README, "Audio".
MERT_MODEL_PATH = "m-a-p/MERT-v1-95M"
MERT_DTYPE = "float32"  # float32 (matches the official features) | bfloat16 (autocast, faster on a GPU)
MERT_WINDOWS_PER_BATCH = 4  # 5 s windows of equal length run together (bench: README, "Audio")

# ---------------------------------------------------------------- feature extraction
# "sdpa" (fused attention, faster) or "eager" (the official arithmetic); both match the official
# features within 1e-5 in float32.
ATTN_IMPLEMENTATION = "sdpa"
EXTRACT_DEVICE = "auto"  # auto | cpu | cuda | cuda:N
EXTRACT_DTYPE = "float32"  # float32 | bfloat16 | float16 (autocast; float32 matches official)
EXTRACT_TOKENS_PER_BATCH = 8192  # patches (or tokens) per forward pass, padding included
EXTRACT_MAX_PADDING = 0.1  # a batch takes no segment it would pad by more than this fraction
EXTRACT_FILES_PER_CHUNK = 256  # files read and batched together

# ---------------------------------------------------------------- training (code/train_clamp3_lora.py)
# "lora": the base checkpoint frozen, PEFT LoRA on the symbolic encoder, one adapter per format.
# "full": the official symbolic stage (symbolic encoder + projection, and the text tower unless
# FREEZE_TEXT), saved as an official-format checkpoint.
TRAIN_MODE = "lora"
FREEZE_TEXT = True  # full mode only; lora mode never trains the text tower
# Full mode with FREEZE_TEXT: still train text_proj (a new base's projection is random). Cached text
# features then hold the frozen tower's pooled outputs, projected every step.
TRAIN_TEXT_PROJ = False
# "clamp3": the official loss (unnormalised projected features, fixed LOGIT_SCALE).
# "normalized": L2-normalised features with a learnable temperature (init 1/0.07, clamped at 100).
LOSS = "clamp3"

LORA_R = 8
LORA_ALPHA = 16
LORA_DROPOUT = 0.1
LORA_TARGET_MODULES = ["query", "key", "value"]  # inside the symbolic encoder only
LORA_USE_RSLORA = False  # PEFT use_rslora: scale alpha / sqrt(r) instead of alpha / r
LORA_USE_DORA = False  # PEFT use_dora: weight-decomposed LoRA
# PEFT init_lora_weights: "default" (B = 0, so a fresh adapter is the base) or "gaussian". Inits
# that rewrite the base weights (pissa, olora, ...) are refused: adapters load onto stock weights.
LORA_INIT_WEIGHTS = "default"
# Modules trained in full and saved with the adapter (PEFT modules_to_save), per format; e.g.
# ["patch_embedding", "symbolic_proj"] for a format the base never saw.
LORA_ABC_MODULES_TO_SAVE = []
LORA_MTF_MODULES_TO_SAVE = []

LORA_NUM_EPOCHS = 10
LORA_BATCH_SIZE = 32  # pieces per rank per step; the global batch is this x world size
LORA_LEARNING_RATE = 1e-4
LORA_WEIGHT_DECAY = 0.01
LORA_WARMUP_STEPS = 100  # linear warmup, then cosine decay to LORA_MIN_LR_RATIO x the peak
LORA_MIN_LR_RATIO = 0.0
LORA_MAX_GRAD_NORM = 1.0  # gradient clipping (0 = off)
LORA_MAX_STEPS = 0  # stop after this many optimizer steps (0 = no limit), for short runs
LORA_PATIENCE = 3  # epochs without a better validation MRR before stopping (0 = never stop early)
LORA_KEEP_CHECKPOINTS = 3  # resumable checkpoints kept in the run folder
LORA_CHECKPOINT_STEPS = 0  # also checkpoint every this many steps inside an epoch (0 = epoch ends only)
# GradCache: split each batch into micro-batches of this many pieces (0 = off). Same gradient as
# the full batch, memory of one micro-batch; replaces gradient accumulation, which would shrink
# the pool of negatives.
GRAD_CACHE_MICRO_BATCH = 0
GRADIENT_CHECKPOINTING = False
# The symbolic encoder's own dropout (hidden and attention, 0.1 in the official model) while
# training, as the official training has it. False keeps it off (LoRA's own LORA_DROPOUT stays):
# attention then runs in PyTorch's fused kernel on CPU too, several times faster and smaller
# (bench/README.md); GPUs have fused kernels with dropout, so there it costs little either way.
SYMBOLIC_DROPOUT = True
TRAIN_DEVICE = "auto"  # auto | cpu | cuda (torchrun: cuda:(LOCAL_RANK % visible GPUs))
TRAIN_PRECISION = "auto"  # auto (GPU: bf16, fp16 + GradScaler without native bf16; CPU: fp32) | bf16 | fp16 | fp32
NUM_WORKERS = 2  # DataLoader workers per rank
# Every this many optimizer steps, one line in the run's log (<run>/ABC_training.log): epoch, step,
# loss, learning rate, samples/s and data-loading time since the previous line (0 = epoch lines only).
TRAIN_LOG_EVERY_STEPS = 50
DIST_TIMEOUT_MINUTES = 30  # a lost rank ends the job after this long instead of hanging it

LORA_ABC_TRAIN_JSONL = "data/training/clamp3_train_abc.jsonl"
LORA_ABC_VALID_JSONL = "data/training/clamp3_valid_abc.jsonl"  # "" or missing: VALID_FRACTION held out
LORA_MTF_TRAIN_JSONL = "data/training/clamp3_train_mtf.jsonl"
LORA_MTF_VALID_JSONL = "data/training/clamp3_valid_mtf.jsonl"
VALID_FRACTION = 0.01  # held out by piece hash when there is no validation file
LORA_ABC_ADAPTER_DIR = "code/adapters/lora_abc_adapter/"
LORA_MTF_ADAPTER_DIR = "code/adapters/lora_mtf_adapter/"
LORA_LOG_DIR = "code/logs/lora_training/"  # the run folder: logs, history, config, checkpoints
FULL_WEIGHTS_PATH = "code/weights_clamp3_symbolic_full_{format}.pth"  # full mode's best checkpoint

# Data pipeline and augmentation (the official ones, each switchable).
TEXT_DROPOUT = True  # official text dropout of the record's fields
RANDOM_FILEPATH = True  # a random choice among a record's files of the format
REMOVE_INSTRUMENT_PROB = 0.9  # official remove_instrument_info probability (0 = off)
RANDOM_TRUNCATION = True  # random head/tail/middle truncation of long pieces in training
LENGTH_BUCKETING = True  # batches of similar lengths, padded to their longest piece
NO_DUPLICATE_NEGATIVES = True  # same text or same music never serve as each other's negatives
# The joint objective (issue 20): ALIGN_WEIGHT > 0 with --format both trains the ABC and MTF adapters
# in one run, each step's loss text<->sheet + text<->MIDI + ALIGN_WEIGHT x sheet<->MIDI over the
# batch's pairs (records of one pair_id in both JSONLs; training/joint.py). 0: one adapter after the
# other, each alone, as before. The joint run selects both adapters by the mean of these validation
# MRRs: "text_abc" (text->sheet), "text_mtf" (text->MIDI), "abc_mtf" (sheet->MIDI).
ALIGN_WEIGHT = 0.0
ALIGN_SELECT_BY = ["text_abc", "text_mtf", "abc_mtf"]
# Cached text features (frozen text tower): this many text-dropout samples per record, embedded
# once and memory-mapped; 0 runs the text tower every step as the official code does.
TEXT_VARIANTS = 8
TEXT_CACHE_DIR = "cache/text_features/"

WANDB_ENABLED = False
WANDB_PROJECT = "clamp3-lora"
WANDB_MODE = "offline"  # offline works with no network; "online" to sync

# ---------------------------------------------------------------- general
SEED = 42

# Not a setting (lower case: only upper-case names are config keys). The keys that steer a training
# run without changing its results: they may differ between a run and its --resume.
run_control_keys = frozenset({
    "NUM_WORKERS", "LORA_LOG_DIR", "LORA_ABC_ADAPTER_DIR", "LORA_MTF_ADAPTER_DIR", "FULL_WEIGHTS_PATH",
    "WANDB_ENABLED", "WANDB_PROJECT", "WANDB_MODE", "TEXT_CACHE_DIR", "DIST_TIMEOUT_MINUTES",
    "LORA_KEEP_CHECKPOINTS", "LORA_CHECKPOINT_STEPS", "TRAIN_LOG_EVERY_STEPS", "EXTRACT_DEVICE", "EXTRACT_DTYPE",
    "EXTRACT_TOKENS_PER_BATCH", "EXTRACT_MAX_PADDING", "EXTRACT_FILES_PER_CHUNK",
    "MERT_MODEL_PATH", "MERT_DTYPE", "MERT_WINDOWS_PER_BATCH", "AUDIO_TEST_JSONL",  # training never reads them
})

# ---------------------------------------------------------------- evaluation
TEST_DATA_DIR = "data/test/"
# An audio test set (JSONL of recordings with the pair_id of their test pieces; evaluation/audio_retrieval.py):
# adds sheet/MIDI <-> audio and text <-> audio rows to evaluate_*.py through MERT_MODEL_PATH. Empty: none.
AUDIO_TEST_JSONL = ""

# ---------------------------------------------------------------- evaluation reports (evaluate_*.py, compare_results.py)
RESULTS_DIR = "results/"  # reports, per-query ranks, summaries and plots/
EVAL_BOOTSTRAP = 1000  # bootstrap resamples and sign flips behind every interval and p-value (seeded by SEED)
EVAL_SIMILARITY_SAMPLE = 20000  # unmatched (text, music) pairs sampled per field for the similarity histograms

# ---------------------------------------------------------------- raw-file tools (clamp3_embd/search/score/eval.py)
RAWFILE_CACHE_DIR = "cache/rawfiles/"  # conversions and features, keyed by content, model and adapter
RAWFILE_DEMO_FALLBACK = True  # no checkpoint at CLAMP3_WEIGHTS_PATH: use the embedded default's models (make demo)
SEARCH_INDEX_DIR = "cache/search_index/"  # one persistent index per searched folder (unless --index DIR)
# A local image-captioning model folder (BLIP-style, loaded by transformers' image-to-text pipeline)
# for image queries; empty = images are searched through a caption you give. Never downloaded.
CAPTION_MODEL = ""
