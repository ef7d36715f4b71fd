"""Fine-tuning: a run's config (config.py), the Trainer adapted to PEFT models (trainer.py), one language run
(run.py), one vision run (vision.py)."""

from .config import BUILTIN_DEFAULTS, TrainConfig, resolve_config
from .run import fine_tune, load_tokenizer
from .trainer import PeftTrainer, TrainingDiverged, complete_checkpoints
from .vision import VisionTrainConfig, fine_tune_vision

__all__ = ["BUILTIN_DEFAULTS", "TrainConfig", "resolve_config", "fine_tune", "load_tokenizer", "PeftTrainer",
           "TrainingDiverged", "complete_checkpoints", "VisionTrainConfig", "fine_tune_vision"]
