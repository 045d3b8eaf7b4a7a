# The embedded default, stage 1: a small CLaMP 3-architecture base trained here from scratch on
# the demo corpus's base split (python -m demo runs this; paths are relative to the repository).
# The text tower is multilingual-e5-small (frozen, features cached); its projection trains.
TRAIN_MODE = "full"
FREEZE_TEXT = True
TRAIN_TEXT_PROJ = True
LOSS = "normalized"
MODEL_CONFIG = "data/demo/model_config.json"
TEXT_MODEL_NAME = "data/demo/text_tower"
MAX_TEXT_LENGTH = 64
CLAMP3_WEIGHTS_PATH = "data/demo/init_weights.pth"  # random symbolic side + the e5 text tower
FULL_WEIGHTS_PATH = "data/demo/base_{format}.pth"
LORA_ABC_TRAIN_JSONL = "data/demo/corpus/base_train_abc.jsonl"
LORA_ABC_VALID_JSONL = "data/demo/corpus/base_valid_abc.jsonl"
LORA_LOG_DIR = "data/demo/runs/base/"
TEXT_CACHE_DIR = "data/demo/cache/text_features/"
TEXT_VARIANTS = 2
LORA_BATCH_SIZE = 32
LORA_LEARNING_RATE = 5e-4
LORA_WARMUP_STEPS = 20
LORA_NUM_EPOCHS = 6
LORA_PATIENCE = 0
SYMBOLIC_DROPOUT = False  # fused attention on CPU (bench/README.md)
NUM_WORKERS = 1
