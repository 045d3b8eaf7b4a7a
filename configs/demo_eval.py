# The embedded default, stage 3: held-out evaluation of the demo base against its adapters.
MODEL_CONFIG = "data/demo/model_config.json"
TEXT_MODEL_NAME = "data/demo/text_tower"
MAX_TEXT_LENGTH = 64
CLAMP3_WEIGHTS_PATH = "data/demo/base_abc.pth"
LORA_ABC_ADAPTER_DIR = "data/demo/adapters/lora_abc_adapter/"
LORA_MTF_ADAPTER_DIR = "data/demo/adapters/lora_mtf_adapter/"
LORA_LOG_DIR = "data/demo/runs/adapters/"
LORA_ABC_TRAIN_JSONL = "data/demo/corpus/adapt_train_abc.jsonl"
LORA_ABC_VALID_JSONL = "data/demo/corpus/adapt_valid_abc.jsonl"
LORA_MTF_TRAIN_JSONL = "data/demo/corpus/adapt_train_mtf.jsonl"
LORA_MTF_VALID_JSONL = "data/demo/corpus/adapt_valid_mtf.jsonl"
TEST_DATA_DIR = "data/demo/test/"
RESULTS_DIR = "data/demo/results/"
EVAL_BOOTSTRAP = 1000
