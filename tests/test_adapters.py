"""adapter=lora: LoRA layers (peft) on the backbone; the freeze list decides the rest."""

import pytest
import torch
import torchvision
from omegaconf import OmegaConf

from finetune.errors import ConfigError
from finetune.model.adapters import check_called, is_adapter_parameter, resolve_targets
from finetune.model.stages import resolve_aliases
from finetune.run import build, run
from finetune.show.report import module_summary
from finetune.use.load import load_model

from conftest import FAST, make_config
from test_resume import resumed_run_equals_unbroken
from test_trainer import snapshot, train_epoch

# a 6-block timm ViT (0.3M parameters) at 32x32: 4 patches and the class token
LORA = ("backbone.name=timm/test_vit", "+backbone.kwargs.img_size=32", "adapter=lora")


def adapter(targets=None):
    return OmegaConf.create({"name": "lora", "r": 4, "alpha": 8.0, "dropout": 0.0,
                             "targets": targets})


def on_meta(builder, **kwargs):
    with torch.device("meta"):
        return builder(**kwargs)


def targets_of(backbone, targets=None):
    return resolve_targets(backbone, adapter(targets), resolve_aliases(backbone))


def test_torchvision_vit_defaults_are_its_mlp_linears_and_attention_internals_are_refused():
    vit = on_meta(torchvision.models.vit_b_16)
    chosen = targets_of(vit)
    assert len(chosen) == 24 and all(name.endswith((".mlp.0", ".mlp.3")) for name in chosen)
    # nn.MultiheadAttention reads out_proj.weight without calling out_proj: never adapted
    with pytest.raises(ConfigError, match=r"adapter.targets\[0\]='self_attention' matches no"):
        targets_of(vit, ["self_attention"])


def test_layers_the_forward_pass_never_calls_are_refused():
    swin = on_meta(torchvision.models.swin_t)  # its attention calls F.linear on qkv.weight
    chosen = targets_of(swin, ["attn"])
    with pytest.raises(ConfigError, match="never called by the forward pass"):
        check_called(swin, chosen, 224)
    check_called(swin, targets_of(swin), 224)  # the default, its MLPs, are called


def test_targets_are_patterns_and_a_family_without_defaults_is_named():
    resnet = on_meta(torchvision.models.resnet18)
    assert targets_of(resnet, ["@stage-1"])[0] == "pretrained.layer4.0.conv1"
    with pytest.raises(ConfigError, match="no default LoRA targets for ResNet"):
        targets_of(resnet)
    with pytest.raises(ConfigError, match=r"targets\[1\]='layer9'.*pretrained\.layer"):
        targets_of(resnet, ["layer4", "layer9"])


@pytest.mark.slow
def test_adapters_and_what_the_freeze_list_leaves_train_and_nothing_else_moves():
    setup = build(make_config(*FAST, *LORA, "freeze=[@backbone,'!re:norm']"))
    trainable = {name for name, param in setup.net.named_parameters() if param.requires_grad}
    adapters = {name for name in trainable if is_adapter_parameter(name)}
    assert len(adapters) == 2 * 24  # A and B of qkv, proj, fc1, fc2 in 6 blocks
    assert trainable - adapters == {name for name, _ in setup.net.named_parameters()
                                    if "norm" in name or name.startswith("add_layers.")}
    in_optimizer = {id(param) for group in setup.optimizer.param_groups for param in group["params"]}
    assert in_optimizer == {id(param) for param in setup.net.parameters() if param.requires_grad}
    assert any(row.startswith("pretrained.blocks LoRA") for row in module_summary(setup.rows()))
    assert "LoRA adapters" in setup.cache.reason and not setup.cache.enabled

    before = snapshot(setup.net)
    train_epoch(setup)
    after = setup.net.state_dict()
    for name, param in setup.net.named_parameters():
        assert torch.equal(after[name], before[name]) != param.requires_grad, name


@pytest.mark.slow
def test_a_lora_run_resumes_bit_identically_and_exports_merged_with_its_outputs(tmp_path, monkeypatch):
    overrides = (*FAST, *LORA, "freeze=[@backbone,'!re:norm']", "trainer.max_epochs=2")
    resumed_run_equals_unbroken(make_config(*overrides), tmp_path, monkeypatch)

    best = tmp_path / "stopped" / "checkpoints" / "best.pt"
    saved = torch.load(best, weights_only=True)["model"]
    assert any(name.endswith("lora_B.default.weight") and value.abs().sum() > 0
               for name, value in saved.items())  # the adapters trained
    kept, merged = load_model(str(best), merge_adapters=False), load_model(str(best))
    base_names = {name.replace(".base_layer.", ".") for name in kept.net.state_dict()
                  if not is_adapter_parameter(name)}
    assert set(merged.net.state_dict()) == base_names  # plain layers again
    images = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        expected = kept.net(images)
        torch.testing.assert_close(merged.net(images), expected, atol=1e-5, rtol=0)

    # torch.export: the quickest format to write (the ONNX path adds its translation, tested
    # in test_export.py); the merge and the parity check are the same for every format
    difference = run(make_config(*FAST, "mode=export", "export.format=exported_program",
                                 f"checkpoint={best}"), str(tmp_path / "export"))
    assert 0 <= difference <= 1e-3  # against the unmerged model as trained
    exported = torch.export.load(str(tmp_path / "export" / "model.pt2"))
    assert exported.state_dict and not any("lora" in name for name in exported.state_dict)
    torch.testing.assert_close(exported.module()(images), expected, atol=1e-4, rtol=0)
