# The embedded default, stage 2: LoRA adapters on the demo base (python -m demo runs this).
# ABC: Ryan's + Aird's tunes the base never saw. MTF: MIDI renderings, a format the base never saw,
# so the patch embedding and the projection train in full beside the adapter.
TRAIN_MODE = "lora"
LOSS = "normalized"
MODEL_CONFIG = "data/demo/model_config.json"
TEXT_MODEL_NAME = "data/demo/text_tower"
MAX_TEXT_LENGTH = 64
CLAMP3_WEIGHTS_PATH = "data/demo/base_abc.pth"
LORA_R = 8
LORA_ALPHA = 16
LORA_DROPOUT = 0.05
LORA_MTF_MODULES_TO_SAVE = ["patch_embedding", "symbolic_proj"]
LORA_ABC_TRAIN_JSONL = "data/demo/corpus/adapt_train_abc.jsonl"
LORA_ABC_VALID_JSONL = "data/demo/corpus/adapt_valid_abc.jsonl"
LORA_MTF_TRAIN_JSONL = "data/demo/corpus/adapt_train_mtf.jsonl"
LORA_MTF_VALID_JSONL = "data/demo/corpus/adapt_valid_mtf.jsonl"
LORA_ABC_ADAPTER_DIR = "data/demo/adapters/lora_abc_adapter/"
LORA_MTF_ADAPTER_DIR = "data/demo/adapters/lora_mtf_adapter/"
LORA_LOG_DIR = "data/demo/runs/adapters/"
TEXT_CACHE_DIR = "data/demo/cache/text_features/"
TEXT_VARIANTS = 2
LORA_BATCH_SIZE = 32
LORA_LEARNING_RATE = 1e-3
LORA_WARMUP_STEPS = 10
LORA_NUM_EPOCHS = 5
LORA_PATIENCE = 0
SYMBOLIC_DROPOUT = False
NUM_WORKERS = 1
