"""The FLARE21 VGG-13-BN U-Net with multi-stage deep supervision (Conze et al., 2021).

One private implementation, :class:`_FlareUNet`, serves three public builders:

- :func:`build_training_network`: returns final and four auxiliary logits in training mode;
- :func:`build_deploy_network`: the same graph without the four training-only heads,
  loaded from a trained network's weights;
- :func:`fold_input_channels`: a deploy network whose first convolution takes one channel
  instead of the same slice replicated three times.

All of them take a :class:`NetworkConfig`, whose defaults are the paper's.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flareseg.errors import FlareSegError
from flareseg.labels import NUM_CLASSES
from flareseg.shapes import SIZE_MULTIPLE

#: Parameters of the paper's network, and what the paper printed (see README).
PAPER_PARAMETERS_REPORTED = 30_146_777


@dataclass(frozen=True)
class NetworkConfig:
    """Shape of the network; the defaults are the paper's."""

    base_width: int = 64
    in_channels: int = 3
    num_classes: int = NUM_CLASSES
    #: Channels of each deep-supervision map before concatenation (paper: 16).
    ds_channels: int = 16

    def __post_init__(self) -> None:
        for name in ("base_width", "in_channels", "num_classes", "ds_channels"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise FlareSegError(f"NetworkConfig.{name} must be a positive integer, got {value!r}")
        if self.num_classes < 2:
            raise FlareSegError(f"NetworkConfig.num_classes must be at least 2, got {self.num_classes}")

    @property
    def widths(self) -> tuple[int, int, int, int, int]:
        """Channels of the five encoder stages (VGG-13: 64, 128, 256, 512, 512)."""
        w = self.base_width
        return (w, 2 * w, 4 * w, 8 * w, 8 * w)

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NetworkConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise FlareSegError(f"unknown network config keys {unknown}; expected a subset of {sorted(known)}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def _conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class _Block(nn.Sequential):
    """[conv 3x3 -> BN -> ReLU] x 2, as in VGG-13-BN."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(*_conv_bn_relu(cin, cout), *_conv_bn_relu(cout, cout))


class _FlareUNet(nn.Module):
    def __init__(self, config: NetworkConfig, *, aux_heads: bool) -> None:
        super().__init__()
        self.config = config
        w1, w2, w3, w4, w5 = config.widths
        c, k = config.num_classes, config.ds_channels
        self.encoder = nn.ModuleList(
            [_Block(config.in_channels, w1), _Block(w1, w2), _Block(w2, w3), _Block(w3, w4), _Block(w4, w5)]
        )
        # Decoder, deepest first: up-sampling, then a block over [up, skip].
        self.up = nn.ModuleList(
            [nn.ConvTranspose2d(cin, cout, 2, stride=2) for cin, cout in ((w5, w4), (w4, w3), (w3, w2), (w2, w1))]
        )
        self.decoder = nn.ModuleList([_Block(2 * w, w) for w in (w4, w3, w2, w1)])
        # Deep supervision: each decoder level -> k maps, up-sampled to the input size.
        self.ds = nn.ModuleList([nn.Sequential(*_conv_bn_relu(w, k)) for w in (w4, w3, w2, w1)])
        self.aux = nn.ModuleList([nn.Conv2d(k, c, 3, padding=1) for _ in range(4)]) if aux_heads else None
        self.head = nn.Sequential(*_conv_bn_relu(4 * k, 4 * k), nn.Conv2d(4 * k, c, 3, padding=1))

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, list[Tensor]]:
        if x.dim() != 4 or x.shape[1] != self.config.in_channels:
            raise FlareSegError(f"network input must be (N, {self.config.in_channels}, H, W), got {tuple(x.shape)}")
        size = (int(x.shape[2]), int(x.shape[3]))
        if size[0] % SIZE_MULTIPLE or size[1] % SIZE_MULTIPLE:
            raise FlareSegError(f"slice size {size[0]}x{size[1]} is not a multiple of {SIZE_MULTIPLE}")
        skips = []
        for i, block in enumerate(self.encoder):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        skips.pop()  # the centre block's output is not a skip
        maps = []
        for up, block, ds in zip(self.up, self.decoder, self.ds, strict=True):
            x = block(torch.cat([up(x), skips.pop()], dim=1))
            m = ds(x)
            if m.shape[-2:] != size:
                m = F.interpolate(m, size=size, mode="bilinear", align_corners=False)
            maps.append(m)
        logits = self.head(torch.cat(maps, dim=1))
        if self.aux is None or not self.training:
            return logits
        # maps run deepest (level 4) to full resolution (level 1); aux is returned level 1 first.
        aux = [head(m) for head, m in zip(self.aux, maps, strict=True)]
        return logits, aux[::-1]


class FlareUNet(_FlareUNet):
    """The training network: in training mode returns ``(logits, [aux1, aux2, aux3, aux4])``.

    Auxiliary logits are at input resolution; level 1 is the full-resolution (64-channel)
    decoder level, level 4 the deepest (512-channel). In eval mode returns logits only.
    """

    def __init__(self, config: NetworkConfig | None = None) -> None:
        super().__init__(config or NetworkConfig(), aux_heads=True)


class DeployUNet(_FlareUNet):
    """The inference graph: no auxiliary heads, always returns the final logits."""

    def __init__(self, config: NetworkConfig | None = None) -> None:
        super().__init__(config or NetworkConfig(), aux_heads=False)


_Net = TypeVar("_Net", FlareUNet, DeployUNet)
#: The first convolution's weight: the one that folding the input channels changes.
_FIRST_CONV = "encoder.0.0.weight"


def _from_state(cls: type[_Net], config: NetworkConfig, state: Mapping[str, Tensor]) -> _Net:
    """``cls(config)`` made of ``state``'s own tensors: no copy, and no initialisation first.

    A strict load replaces every parameter and buffer, so random initialisation would be
    wasted: 0.1-0.2 s per network of the paper's 20.7 M parameters, and loading a checkpoint
    for inference used to build three (training, deploy, folded). ``RuntimeError`` when
    ``state`` does not fit ``config``.
    """
    with torch.device("meta"):  # shapes only: no storage, no initialisation
        model = cls(config)
    model.load_state_dict(state, strict=True, assign=True)
    return model


def build_training_network(
    config: NetworkConfig | None = None, *, state: Mapping[str, Tensor] | None = None
) -> FlareUNet:
    """The paper's network with its four training-only supervision heads.

    Randomly initialised, or made of ``state``'s tensors (a checkpoint's ``state_dict``, which
    the network then owns: they are not copied). ``RuntimeError`` when they do not fit.
    """
    config = config or NetworkConfig()
    return FlareUNet(config) if state is None else _from_state(FlareUNet, config, state)


def build_deploy_network(trained: FlareUNet | DeployUNet, *, fold_input: bool = False, copy: bool = True) -> DeployUNet:
    """A deploy graph with a trained network's weights (auxiliary heads dropped), in eval mode.

    With ``fold_input`` the result takes one channel (see :func:`fold_input_channels`).
    ``copy=False`` shares the trained network's tensors instead of copying them, for a caller
    that drops the trained network (a checkpoint loaded for inference).
    """
    state = {k: v.clone() if copy else v for k, v in trained.state_dict().items() if not k.startswith("aux.")}
    config = trained.config
    if fold_input:
        config, state = _folded(config, state)
    return _from_state(DeployUNet, config, state).eval()


def fold_input_channels(model: FlareUNet | DeployUNet) -> DeployUNet:
    """A 1-channel deploy network equal to ``model`` fed one slice replicated on every channel.

    A convolution of a channel replicated n times equals one channel through the sum of
    the n weight slices, so the input needs n times less memory traffic.
    """
    return build_deploy_network(model, fold_input=True)


def _folded(config: NetworkConfig, state: dict[str, Tensor]) -> tuple[NetworkConfig, dict[str, Tensor]]:
    if config.in_channels == 1:
        raise FlareSegError("the network already takes one input channel: nothing to fold")
    return dataclasses.replace(config, in_channels=1), {
        **state,
        _FIRST_CONV: state[_FIRST_CONV].sum(dim=1, keepdim=True),
    }


def non_finite_weights(model: nn.Module) -> dict[str, int]:
    """Weight (and BatchNorm statistic) tensors holding NaN or infinity -> how many such values each holds."""
    with torch.no_grad():
        counts = {
            name: int(t.numel() - torch.isfinite(t).sum())
            for name, t in model.state_dict().items()
            if t.is_floating_point()
        }
    return {name: n for name, n in counts.items() if n}


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters (BatchNorm running statistics are buffers, not counted)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
