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

# ---------------------------------------------------------------- feature extraction
# "sdpa" (fused attention, faster) or "eager" (the official arithmetic); both match the official
# features within 1e-5 in float32.
ATTN_IMPLEMENTATION = "sdpa"
EXTRACT_DEVICE = "auto"  # auto | cpu | cuda | cuda:N
EXTRACT_DTYPE = "float32"  # float32 | bfloat16 | float16 (autocast; float32 matches official)
EXTRACT_TOKENS_PER_BATCH = 8192  # patches (or tokens) per forward pass, padding included
EXTRACT_MAX_PADDING = 0.1  # a batch takes no segment it would pad by more than this fraction
EXTRACT_FILES_PER_CHUNK = 256  # files read and batched together

# ---------------------------------------------------------------- LoRA
LORA_R = 8
LORA_ALPHA = 16
LORA_DROPOUT = 0.1
LORA_TARGET_MODULES = ["query", "key", "value"]  # inside the symbolic encoder only
LORA_NUM_EPOCHS = 10
LORA_BATCH_SIZE = 32
LORA_LEARNING_RATE = 1e-4
LORA_ABC_TRAIN_JSONL = "data/training/clamp3_train_abc.jsonl"
LORA_MTF_TRAIN_JSONL = "data/training/clamp3_train_mtf.jsonl"
LORA_ABC_ADAPTER_DIR = "code/adapters/lora_abc_adapter/"
LORA_MTF_ADAPTER_DIR = "code/adapters/lora_mtf_adapter/"
LORA_LOG_DIR = "code/logs/lora_training/"

# ---------------------------------------------------------------- general
SEED = 42
