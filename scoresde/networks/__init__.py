"""Score networks obeying the model contract ``model(x, t, y=None) -> eps``.

- :class:`UNet`: DDPM++-style U-Net for images ``(B, C, H, W)``.
- :class:`MLP`: residual MLP for vectors ``(B, D)``.
- :class:`ClassifierFreeGuidance`: ``eps_u + w (eps_c - eps_u)`` in one batched call.

``PRESETS`` names standard sizes; :func:`build_model` turns a preset and the data shape into a
network, and :func:`model_from_config` rebuilds any network from its ``.config`` (plain data, as
saved in checkpoints).
"""

from __future__ import annotations

import math
from typing import Any, Callable

from torch import nn

from .embeddings import EMBEDDINGS, GaussianFourierEmbedding, SinusoidalEmbedding
from .guidance import ClassifierFreeGuidance
from .mlp import MLP
from .unet import UNet, unet_resolutions

#: architecture name (the ``"arch"`` key of every ``.config``) -> class
ARCHS: dict[str, Callable[..., nn.Module]] = {"unet": UNet, "mlp": MLP}

#: Standard sizes. U-Net presets get ``in_channels`` / ``image_size`` from the data shape, and their
#: ``attn_resolutions`` keep only the resolutions the image size reaches (an explicit override is
#: checked strictly). Parameter counts are for 1x8x8 (digits) or 3x32x32 (cifar10) inputs.
PRESETS: dict[str, dict[str, Any]] = {
    # for CPU unit tests: ~0.2M parameters
    "tiny": {"arch": "unet", "base_channels": 16, "channel_mult": (1, 2), "num_res_blocks": 1,
             "attn_resolutions": (4, 16), "dropout": 0.0},
    # a small general-purpose U-Net (MNIST 28x28: levels 28, 14, 7): ~6M parameters
    "small": {"arch": "unet", "base_channels": 64, "channel_mult": (1, 2, 2), "num_res_blocks": 2,
              "attn_resolutions": (16, 14, 8, 7), "dropout": 0.1},
    # 8x8 digits in a few CPU minutes (~0.18M parameters). At a fixed CPU budget the number of
    # optimisation steps limits quality, not width: with 150 CPU-seconds (1 thread, batch 128,
    # VP SDE, DDIM-50, EMA weights), 16 channels made 732 steps and reached FD 38 / IS 6.5,
    # 24 channels (0.4M) 415 steps and FD 78 / IS 5.0, 32 channels (0.7M) 247 steps and
    # FD 106 / IS 4.5 (real digits: FD 11 +- 4, IS 9.2).
    "digits": {"arch": "unet", "base_channels": 16, "channel_mult": (1, 2), "num_res_blocks": 1,
               "attn_resolutions": (4,), "dropout": 0.0},
    # DDPM++ (VP, continuous) CIFAR-10 of Song et al. 2021: 128 channels, mult (1,2,2,2), 4 blocks, attention at 16
    "cifar10": {"arch": "unet", "base_channels": 128, "channel_mult": (1, 2, 2, 2), "num_res_blocks": 4,
                "attn_resolutions": (16,), "dropout": 0.1},
    # vectors: 2-D toys, tabular data
    "mlp": {"arch": "mlp", "hidden": 256, "depth": 4, "dropout": 0.0},
}


def build_model(preset: str, *, data_shape: tuple, num_classes: int | None = None, **overrides: Any) -> nn.Module:
    """Build the network of ``preset`` for per-sample shape ``data_shape``; ``overrides`` replace preset fields.

    ``data_shape`` is ``(C, H, W)`` with ``H == W`` for U-Net presets and ``(D,)`` (or any shape,
    flattened) for ``"mlp"``. Raises ``ValueError`` naming the problem for an unknown preset, an
    unknown override, a data shape the architecture cannot take, or an image size the U-Net cannot
    halve ``len(channel_mult) - 1`` times.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; expected one of {sorted(PRESETS)}")
    spec = dict(PRESETS[preset])
    arch = spec.pop("arch")
    overrides = dict(overrides)
    overrides.pop("arch", None)
    data_shape = tuple(int(s) for s in data_shape)
    if arch == "unet":
        if len(data_shape) != 3 or data_shape[1] != data_shape[2]:
            raise ValueError(
                f"preset {preset!r} is a U-Net and needs square image data_shape (C, H, H); got {data_shape}"
            )
        spec.update(in_channels=data_shape[0], image_size=data_shape[1])
        mult = overrides.get("channel_mult", spec["channel_mult"])
        size = overrides.get("image_size", spec["image_size"])
        if "attn_resolutions" not in overrides:
            reached = unet_resolutions(size, mult)  # also raises if the size cannot be halved enough
            spec["attn_resolutions"] = tuple(r for r in spec["attn_resolutions"] if r in reached)
    else:
        if not data_shape:
            raise ValueError("data_shape must not be empty")
        spec["dim"] = int(math.prod(data_shape))
    spec["num_classes"] = num_classes
    allowed = set(spec) | {"embedding"}
    unknown = sorted(set(overrides) - allowed)
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for preset {preset!r} ({arch}); allowed: {sorted(allowed)}")
    spec.update(overrides)
    return ARCHS[arch](**spec)


def model_from_config(config: dict) -> nn.Module:
    """Rebuild a network from its ``.config`` dict (``{"arch": "unet" | "mlp", **constructor args}``)."""
    config = dict(config)
    arch = config.pop("arch", None)
    if arch not in ARCHS:
        raise ValueError(f"model config needs 'arch' in {sorted(ARCHS)}; got {arch!r}")
    try:
        return ARCHS[arch](**config)
    except TypeError as err:  # unexpected keys
        raise ValueError(f"invalid {arch} model config: {err}") from None


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


__all__ = [
    "ARCHS",
    "PRESETS",
    "EMBEDDINGS",
    "UNet",
    "MLP",
    "ClassifierFreeGuidance",
    "SinusoidalEmbedding",
    "GaussianFourierEmbedding",
    "build_model",
    "model_from_config",
    "count_parameters",
]
