"""Library weights for a model reference, and the surgery that fits a library model to a dataset.

- torchvision:NAME -> the model's DEFAULT weights from the torch hub cache (downloaded once when absent);
- timm:NAME -> timm.create_model(..., pretrained=True) (Hugging Face hub cache);
- built-in vgg16 / vgg16_bn -> seed 000 Table 1 "conv layers initialised from ImageNet": torchvision's 13
  ImageNet conv layers (and BN layers for _bn) copied in order into kdtune's VGG; its FC layers stay fresh.

Fitting a library model to a dataset: the classifier head (the last nn.Linear, or a final 1x1 Conv2d as in
squeezenet) is replaced by a fresh one with num_classes outputs, and the first Conv2d is replaced by one with
the dataset's number of input channels when that is not 3 (pretrained RGB kernels are averaged and repeated
over the channels, so 1-channel data gets the luminance filter).

No weights are fetched at import time; every failure is a one-line `ConfigError` that says what to do.
"""
from __future__ import annotations

import glob
import os
from urllib.parse import urlparse

import torch
from torch import nn

from kdtune.errors import ConfigError

# torchvision builders whose defaults do not suit distillation: auxiliary heads make the training-mode output a
# tuple, and transform_input assumes 3 RGB channels.
_AUX_HEAD_MODELS = ("googlenet", "inception_v3")
PRETRAINED_BUILTINS = ("vgg16", "vgg16_bn")


def one_line(exc: BaseException, limit: int = 300) -> str:
    """'Type: message' on one line, shortened: for error messages that quote an exception."""
    text = " ".join(str(exc).split())
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# ---------------------------------------------------------------------------------------------------- surgery


def set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    """Replace the submodule at a dotted path ('classifier.3') by `module`, on its parent."""
    parent_path, _, leaf = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, leaf, module)


def find_head(model: nn.Module) -> tuple[str, nn.Module]:
    """The classifier head: the last nn.Linear, or when there is none the last Conv2d (squeezenet)."""
    linears = [(p, m) for p, m in model.named_modules() if isinstance(m, nn.Linear)]
    if linears:
        return linears[-1]
    convs = [(p, m) for p, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if convs:
        return convs[-1]
    raise ConfigError(f"{type(model).__name__} has no nn.Linear or nn.Conv2d layer to use as its classifier head")


def replace_head(model: nn.Module, num_classes: int) -> str:
    """A fresh head with num_classes outputs in place of the last Linear (or final Conv2d); returns its path."""
    path, old = find_head(model)
    if isinstance(old, nn.Linear):
        if old.out_features != num_classes:
            set_module(model, path, nn.Linear(old.in_features, num_classes, bias=old.bias is not None))
    elif old.out_channels != num_classes:
        set_module(model, path, nn.Conv2d(
            old.in_channels, num_classes, old.kernel_size, stride=old.stride, padding=old.padding,
            dilation=old.dilation, groups=1, bias=old.bias is not None, padding_mode=old.padding_mode))
    return path


def average_rgb_kernels(weight: torch.Tensor, channels: int) -> torch.Tensor:
    """(out, 3, k, k) RGB kernels -> (out, channels, k, k): their mean over RGB, repeated over the channels."""
    return weight.mean(dim=1, keepdim=True).repeat(1, channels, 1, 1)


def adapt_input_channels(model: nn.Module, channels: int, pretrained: bool) -> str | None:
    """Give the first Conv2d `channels` inputs when it has another number; returns its path (None: unchanged)."""
    first = next(((p, m) for p, m in model.named_modules() if isinstance(m, nn.Conv2d)), None)
    if first is None or first[1].in_channels == channels:
        return None
    path, old = first
    new = nn.Conv2d(
        channels, old.out_channels, old.kernel_size, stride=old.stride, padding=old.padding,
        dilation=old.dilation, groups=old.groups, bias=old.bias is not None, padding_mode=old.padding_mode)
    if pretrained:
        with torch.no_grad():
            new.weight.copy_(average_rgb_kernels(old.weight, channels))
            if old.bias is not None:
                new.bias.copy_(old.bias)
    set_module(model, path, new)
    return path


def torchvision_kwargs(name: str, channels: int) -> dict:
    """Builder arguments: no auxiliary heads (a tuple output in training mode); no RGB input transform for C != 3."""
    kwargs: dict = {}
    if name in _AUX_HEAD_MODELS:
        kwargs.update(aux_logits=False, init_weights=True)
        if channels != 3:
            kwargs["transform_input"] = False
    return kwargs


# --------------------------------------------------------------------------------------------- torch hub files


def torch_hub_checkpoints() -> str:
    """The torch hub cache folder for weight files ($TORCH_HOME/hub/checkpoints)."""
    return os.path.join(torch.hub.get_dir(), "checkpoints")


def torch_hub_file(url: str, what: str) -> str:
    """The cached file for `url`, downloaded when absent. No partial file (or new empty folder) stays behind."""
    folder = torch_hub_checkpoints()
    filename = os.path.basename(urlparse(url).path)
    path = os.path.join(folder, filename)
    if os.path.isfile(path):
        return path
    created = []
    parent = folder
    while parent and not os.path.exists(parent):
        created.append(parent)
        parent = os.path.dirname(parent)
    try:
        os.makedirs(folder, exist_ok=True)
        match = torch.hub.HASH_REGEX.search(filename)
        torch.hub.download_url_to_file(url, path, hash_prefix=match.group(1) if match else None, progress=False)
    except BaseException as exc:
        for leftover in [path, *glob.glob(glob.escape(path) + ".*.partial")]:
            if os.path.exists(leftover):
                os.remove(leftover)
        for made in created:  # deepest first
            try:
                os.rmdir(made)
            except OSError:
                break
        if not isinstance(exc, Exception):
            raise
        raise ConfigError(
            f"{what}: pretrained weights {filename} could not be downloaded ({one_line(exc)}); put that file into "
            f"{folder} (torch hub cache, $TORCH_HOME) and run again"
        ) from exc
    return path


def _torchvision_weights(name: str, what: str):
    import torchvision

    try:
        return torchvision.models.get_model_weights(name).DEFAULT
    except Exception as exc:
        raise ConfigError(f"{what}: torchvision has no pretrained weights for {name} ({one_line(exc)})") from exc


def _load_failed(what: str, path: str, exc: Exception) -> ConfigError:
    return ConfigError(
        f"{what}: pretrained weights {os.path.basename(path)} in {os.path.dirname(path)} could not be loaded "
        f"({one_line(exc)}); delete that file (it may be truncated) and run again"
    )


def torchvision_pretrained(name: str, num_classes: int, input_shape: tuple[int, ...], what: str) -> nn.Module:
    """torchvision NAME with its DEFAULT weights, a fresh num_classes head and the dataset's input channels."""
    import torchvision

    weights = _torchvision_weights(name, what)
    path = torch_hub_file(weights.url, what)
    channels = int(input_shape[0])
    try:  # finds the file in the torch hub cache: no download
        model = torchvision.models.get_model(name, weights=weights, **torchvision_kwargs(name, channels))
    except Exception as exc:
        raise _load_failed(what, path, exc) from exc
    replace_head(model, num_classes)
    adapt_input_channels(model, channels, pretrained=True)
    return model


# ------------------------------------------------------------------------------------------------------- timm


def import_timm(spec: str):
    try:
        import timm
    except ImportError as exc:
        raise ConfigError(f"{spec} needs the timm package: pip install 'kdtune[timm]'") from exc
    return timm


def _timm_hub_id(timm, name: str) -> str:
    cfg = None
    try:
        get_cfg = getattr(timm, "get_pretrained_cfg", None) or timm.models.get_pretrained_cfg
        cfg = get_cfg(name)
    except Exception:
        pass
    if cfg is None:
        try:
            cfg = timm.create_model(name, pretrained=False).pretrained_cfg
        except Exception:
            cfg = None
    hub_id = (cfg.get("hf_hub_id") if isinstance(cfg, dict) else getattr(cfg, "hf_hub_id", None)) if cfg else None
    return hub_id or f"timm/{name}"


def _hf_hub_cache() -> str:
    try:
        from huggingface_hub import constants

        return constants.HF_HUB_CACHE
    except Exception:
        home = os.environ.get("HF_HOME", os.path.join(os.path.expanduser("~"), ".cache", "huggingface"))
        return os.environ.get("HF_HUB_CACHE", os.path.join(home, "hub"))


def timm_pretrained(name: str, num_classes: int, input_shape: tuple[int, ...], what: str) -> nn.Module:
    """timm.create_model(NAME, pretrained=True) with num_classes and in_chans (timm adapts the input conv)."""
    timm = import_timm(f"timm:{name}")
    try:
        return timm.create_model(name, pretrained=True, num_classes=num_classes, in_chans=int(input_shape[0]))
    except Exception as exc:
        raise ConfigError(
            f"{what}: pretrained weights from the Hugging Face hub ({_timm_hub_id(timm, name)}) could not be loaded "
            f"({one_line(exc)}); with internet they download once; offline, put them into the Hugging Face cache "
            f"{_hf_hub_cache()} ($HF_HOME / $HF_HUB_CACHE) and run again"
        ) from exc


# ------------------------------------------------------------------------------------- built-in VGG-16 (seed 000)


def vgg_conv_state_from_torchvision(
    state_dict: dict[str, torch.Tensor], batch_norm: bool, in_channels: int = 3
) -> dict[str, torch.Tensor]:
    """torchvision vgg16 / vgg16_bn tensors -> kdtune VGG-16 names, for its 13 conv (and 13 BN) layers.

    torchvision keeps the layers in `features.<index>`; kdtune in `block<stage>.<index>` (conv, [BN], ReLU per
    conv). Layers are matched in order; the classifier (25088 -> 4096 ...) is left out: kdtune's FC layers are
    sized for 32x32 inputs and stay freshly initialised. For in_channels != 3 the first conv's RGB kernels are
    averaged and repeated over the channels.
    """
    from kdtune.models.vgg import VGG16_STAGES

    def layer_indices(suffix: str, test) -> list[int]:
        found = []
        for key, value in state_dict.items():
            parts = key.split(".")
            if len(parts) == 3 and parts[0] == "features" and parts[2] == suffix and test(value):
                found.append(int(parts[1]))
        return sorted(found)

    convs = layer_indices("weight", lambda v: v.dim() == 4)
    bns = layer_indices("running_mean", lambda v: True)
    targets = [(stage, position) for stage, widths in enumerate(VGG16_STAGES, start=1) for position in range(len(widths))]
    if len(convs) != len(targets) or len(bns) != (len(targets) if batch_norm else 0):
        raise ConfigError(
            f"VGG-16 weights: expected {len(targets)} conv layers{' and as many BatchNorm layers' if batch_norm else ''}"
            f" in features.*, found {len(convs)} conv and {len(bns)} BatchNorm layers; "
            f"use torchvision vgg16{'_bn' if batch_norm else ''} weights"
        )
    step = 3 if batch_norm else 2  # conv, [BN], ReLU
    mapped: dict[str, torch.Tensor] = {}
    bn_keys = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    for number, ((stage, position), conv) in enumerate(zip(targets, convs)):
        index = position * step
        for key in ("weight", "bias"):
            source = f"features.{conv}.{key}"
            if source in state_dict:
                mapped[f"block{stage}.{index}.{key}"] = state_dict[source]
        if batch_norm:
            bn = bns[number]
            for key in bn_keys:
                source = f"features.{bn}.{key}"
                if source in state_dict:
                    mapped[f"block{stage}.{index + 1}.{key}"] = state_dict[source]
    if in_channels != 3:
        mapped["block1.0.weight"] = average_rgb_kernels(mapped["block1.0.weight"], in_channels)
    return mapped


def builtin_pretrained(name: str, num_classes: int, input_shape: tuple[int, ...], what: str) -> nn.Module:
    """Built-in vgg16 / vgg16_bn: ImageNet conv (and BN) layers from torchvision, fresh FC layers."""
    if name not in PRETRAINED_BUILTINS:
        raise ConfigError(
            f"{what}: built-in model {name} has no pretrained weights; those that do: {', '.join(PRETRAINED_BUILTINS)}; "
            f"or use torchvision:NAME / timm:NAME"
        )
    from kdtune.models.zoo import build_model

    batch_norm = name.endswith("_bn")
    path = torch_hub_file(_torchvision_weights(name, what).url, what)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        mapped = vgg_conv_state_from_torchvision(state, batch_norm, in_channels=int(input_shape[0]))
    except ConfigError:
        raise
    except Exception as exc:
        raise _load_failed(what, path, exc) from exc
    model = build_model(name, num_classes, tuple(input_shape))
    try:
        missing, unexpected = model.load_state_dict(mapped, strict=False)
    except RuntimeError as exc:
        raise ConfigError(f"{what}: ImageNet conv weights do not fit kdtune's {name} ({one_line(exc)})") from exc
    left_fresh = [k for k in missing if not k.startswith(("fc", "classifier"))]
    if unexpected or left_fresh:
        raise ConfigError(f"{what}: ImageNet conv weights do not fit kdtune's {name}: missing {left_fresh}, unexpected {unexpected}")
    return model
