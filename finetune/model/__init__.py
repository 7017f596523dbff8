"""The model wing: cfg.backbone + cfg.head -> Net(pretrained, add_layers); torchvision and
timm backbones, stage aliases, the freeze pattern language, adapters.

`finetune.model.Net` (the seed's name, which users import) loads net.py on first use, so
importing a light module of this wing (patterns, stages) does not build torchvision."""


def __getattr__(name: str):
    if name == "Net":
        from finetune.model.net import Net

        return Net
    raise AttributeError(f"module 'finetune.model' has no attribute {name!r}")
