"""The loggers by the names config files give them (`logger.<name>._target_:
finetune.loggers.TensorBoardLogger`, in conf/logger/ and in every run's saved config): a
stable address for what lives in finetune/show/loggers.py."""

from finetune.show.loggers import MLflowLogger, TensorBoardLogger, WandbLogger

__all__ = ["MLflowLogger", "TensorBoardLogger", "WandbLogger"]
