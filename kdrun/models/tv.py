"""Any torchvision classification model by name, with its classifier resized to the dataset.

The model is returned as torchvision builds it, so its taps are torchvision's own module paths
(``layer3``, ``features.6``, ``encoder.layers.encoder_layer_11``, ...).
"""

import difflib
import os

import torch
import torchvision
from torch import nn

from kdrun.errors import ConfigError

# Their builders return (logits, aux logits) in training mode unless told otherwise.
AUX_HEAD_MODELS = frozenset({"googlenet", "inception_v3"})


def torchvision_model(num_classes, input_shape, name: str, weights: str | None = None) -> nn.Module:
    """Build torchvision model ``name``; ``weights`` is None, "DEFAULT" or a name like "IMAGENET1K_V1"."""
    try:
        in_channels, height, width = input_shape
    except (TypeError, ValueError):
        raise ConfigError(
            f"torchvision model {name!r}: input_shape must be (channels, height, width), "
            f"got {input_shape!r}"
        ) from None
    available = torchvision.models.list_models(module=torchvision.models)
    if name not in available:
        close = difflib.get_close_matches(name, available, n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise ConfigError(
            f"unknown torchvision model {name!r}; {hint}"
            f"(torchvision.models.list_models() lists all {len(available)})"
        )
    options = {"aux_logits": False} if name in AUX_HEAD_MODELS else {}
    resolved = _resolve_weights(name, weights)
    try:
        model = torchvision.models.get_model(name, weights=resolved, **options)
    except OSError as err:  # urllib's URLError included: no network, and no cached file
        raise ConfigError(_weights_unavailable(name, resolved, err)) from None

    first_conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if first_conv is not None and first_conv.in_channels != in_channels:
        raise ConfigError(
            f"torchvision model {name!r} expects {first_conv.in_channels} input channels, "
            f"but input_shape is {tuple(input_shape)}"
        )
    image_size = getattr(model, "image_size", None)  # vision transformers take one fixed size
    if image_size is not None and (height, width) != (image_size, image_size):
        raise ConfigError(
            f"torchvision model {name!r} expects {image_size}x{image_size} images, "
            f"but input_shape is {tuple(input_shape)}"
        )
    _resize_classifier(model, name, num_classes)
    return model


def _resolve_weights(name: str, weights: str | None):
    """The weights enum member that ``weights`` names ("DEFAULT", "IMAGENET1K_V1", ...), or None."""
    if weights is None:
        return None
    weights_enum = torchvision.models.get_model_weights(name)
    try:
        return weights_enum.verify(weights)
    except KeyError:
        allowed = ", ".join(["DEFAULT", *(member.name for member in weights_enum)])
        raise ConfigError(
            f"torchvision model {name!r}: unknown weights {weights!r}; allowed: {allowed}"
        ) from None


def _weights_unavailable(name: str, weights, err: OSError) -> str:
    checkpoints = os.path.join(torch.hub.get_dir(), "checkpoints")
    filename = os.path.basename(weights.url)
    reason = " ".join(str(err).split())
    return (
        f"cannot load weights {weights} for torchvision model {name!r}: {filename} is not in "
        f"{checkpoints} and downloading it failed ({reason}); run once with network access, "
        f"or copy {filename} from {weights.url} into {checkpoints}"
    )


def _resize_classifier(model: nn.Module, name: str, num_classes: int) -> None:
    """Replace the last Linear (or squeezenet's final 1x1 Conv2d) when it has another width."""
    heads = [(path, m) for path, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not heads:
        heads = [(path, m) for path, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if not heads:
        raise ConfigError(f"torchvision model {name!r} has no Linear or Conv2d classifier to resize")
    path, head = heads[-1]
    if isinstance(head, nn.Linear):
        if head.out_features != num_classes:
            new_head = nn.Linear(head.in_features, num_classes, bias=head.bias is not None)
            model.set_submodule(path, new_head)
    elif head.out_channels != num_classes:
        if head.kernel_size != (1, 1):
            raise ConfigError(
                f"torchvision model {name!r}: cannot resize its classifier {path!r} "
                f"to {num_classes} classes"
            )
        model.set_submodule(path, nn.Conv2d(head.in_channels, num_classes, kernel_size=1))
