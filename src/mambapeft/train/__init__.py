"""Fine-tuning: the shared run config (config.py), task kinds (tasks.py; language.py, vision.py, sequence.py), the
one run pipeline (run.py), the run folder's protection (run_folder.py) and the Trainer adapted to PEFT models
(trainer.py)."""

from . import language, vision  # noqa: F401  (registers the task kinds)
from .config import RunConfig
from .language import BUILTIN_DEFAULTS, TrainConfig, load_tokenizer, resolve_config
from .run import fine_tune, fine_tune_vision
from .sequence import SequenceTrainConfig  # registered after language and vision (the order of --task's choices)
from .tasks import TASKS, get_task, kind_of
from .trainer import PeftTrainer, TrainingDiverged, complete_checkpoints
from .vision import VisionTrainConfig, resolve_vision_config

__all__ = ["BUILTIN_DEFAULTS", "RunConfig", "TrainConfig", "VisionTrainConfig", "SequenceTrainConfig", "TASKS",
           "get_task", "kind_of", "resolve_config", "resolve_vision_config", "fine_tune", "fine_tune_vision",
           "load_tokenizer", "PeftTrainer", "TrainingDiverged", "complete_checkpoints"]
