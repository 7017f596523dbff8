"""finetune: config-driven fine-tuning of pretrained torchvision backbones.

Heavy modules (torch, torchvision) load on first use, so `python train.py --help` is quick.
"""

from importlib import import_module

_EXPORTS = {"Net": "finetune.model.net", "run": "finetune.run", "ConfigError": "finetune.errors",
            "load_model": "finetune.use.load", "LoadedModel": "finetune.use.loaded_model"}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'finetune' has no attribute {name!r}")
