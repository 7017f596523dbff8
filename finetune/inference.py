"""Moved: `finetune.inference` was split into finetune/use/ (docs/development.md, the
changelog). This module keeps the old import path working for one release, with a
DeprecationWarning: `finetune.load_model` and `finetune.LoadedModel` are the lasting names."""

import warnings

from finetune.use.evaluate import run_inference
from finetune.use.load import load_model
from finetune.use.loaded_model import LoadedModel

warnings.warn("finetune.inference is deprecated and goes in the next release: import "
              "load_model and LoadedModel from finetune (finetune.load_model), or the modules "
              "of finetune/use/", DeprecationWarning, stacklevel=2)

__all__ = ["LoadedModel", "load_model", "run_inference"]
