"""Fine-tuning: a run's config (config.py), the Trainer adapted to PEFT models (trainer.py), one run (run.py)."""

from .config import BUILTIN_DEFAULTS, TrainConfig, resolve_config
from .run import fine_tune, load_tokenizer
from .trainer import PeftTrainer, TrainingDiverged, complete_checkpoints

__all__ = ["BUILTIN_DEFAULTS", "TrainConfig", "resolve_config", "fine_tune", "load_tokenizer", "PeftTrainer",
           "TrainingDiverged", "complete_checkpoints"]
