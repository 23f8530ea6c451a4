"""How much a memory-lean forward would save: peak activation bytes of one slice batch, on the CPU (issue 10).

Issue 10 asks for the CUDA defaults to fit 1,000 MB of GPU memory above idle with at
least 80 % of the best batch's throughput. On the H200 the CUDA context alone took
618 MB and batch 1 took 973 MB, about 210 MB more per extra slice in fp16. Before
writing a leaner forward for the GPU, this measures on the CPU what one would save:

- ``standard``: the deploy network as flareseg runs it (``DeployUNet``, input folded to
  one channel);
- ``lean``: the same arithmetic with each BatchNorm folded into its convolution, each
  decoder concatenation replaced by two convolutions summed (``conv(cat(u, s)) =
  conv_u(u) + conv_s(s)``), the head's first convolution accumulated over the four
  deep-supervision maps instead of over their concatenation, and every tensor dropped as
  soon as it is used.

Peak bytes are the largest sum of live tensor storages that the forward's operations
create (a ``TorchDispatchMode`` tracks each output storage until it is freed), in fp32 at
512 x 512, batch 1. Outputs are compared with the standard forward (largest difference,
argmax agreement). Random weights with non-trivial BatchNorm statistics.

Run: python benchmarks/activation_memory.py
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from flareseg.network import DeployUNet, NetworkConfig, fold_input_channels

MB = 2**20


class PeakLiveBytes(TorchDispatchMode):
    """The peak of live bytes over the storages that operations create inside the mode."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self._sizes: dict[int, int] = {}

    def _free(self, key: int) -> None:
        self.live -= self._sizes.pop(key, 0)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, Tensor):
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self._sizes:
                    self._sizes[key] = storage.nbytes()
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._free, key)
        return out


def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    return conv.weight * scale.reshape(-1, 1, 1, 1), (bias - bn.running_mean) * scale + bn.bias


class LeanForward:
    """The deploy network's arithmetic, rearranged to hold fewer full-resolution tensors at once."""

    def __init__(self, net: DeployUNet) -> None:
        def block(b: nn.Module) -> list[tuple[Tensor, Tensor]]:
            return [_fold(b[0], b[1]), _fold(b[3], b[4])]

        self.encoder = [block(b) for b in net.encoder]
        self.up = [(u.weight, u.bias) for u in net.up]
        self.decoder = [block(b) for b in net.decoder]
        self.ds = [_fold(d[0], d[1]) for d in net.ds]
        self.head1, self.head2 = _fold(net.head[0], net.head[1]), (net.head[3].weight, net.head[3].bias)
        self.k = net.config.ds_channels

    @staticmethod
    def _conv_relu(x: Tensor, wb: tuple[Tensor, Tensor]) -> Tensor:
        return F.relu_(F.conv2d(x, wb[0], wb[1], padding=1))

    def __call__(self, x: Tensor) -> Tensor:
        size = x.shape[-2:]
        skips = []
        for i, (c1, c2) in enumerate(self.encoder):
            x = self._conv_relu(self._conv_relu(F.max_pool2d(x, 2) if i else x, c1), c2)
            skips.append(x)
        skips.pop()
        head: Tensor | None = None
        w1, b1 = self.head1
        for level, ((uw, ub), (c1, c2), ds) in enumerate(zip(self.up, self.decoder, self.ds, strict=True)):
            u = F.conv_transpose2d(x, uw, ub, stride=2)
            del x
            cut = u.shape[1]
            y = F.conv2d(u, c1[0][:, :cut], c1[1], padding=1)
            del u
            s = skips.pop()
            y += F.conv2d(s, c1[0][:, cut:], None, padding=1)
            del s
            x = self._conv_relu(F.relu_(y), c2)
            del y
            m = self._conv_relu(x, ds)
            if m.shape[-2:] != size:
                m = F.interpolate(m, size=size, mode="bilinear", align_corners=False)
            part = F.conv2d(m, w1[:, level * self.k : (level + 1) * self.k], None, padding=1)
            del m
            head = part if head is None else head.add_(part)
            del part
        del x
        assert head is not None
        head += b1.reshape(1, -1, 1, 1)
        return F.conv2d(F.relu_(head), self.head2[0], self.head2[1], padding=1)


def main() -> int:
    torch.manual_seed(0)
    net = fold_input_channels(DeployUNet(NetworkConfig()).eval())
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    lean = LeanForward(net)
    x = torch.randn(1, 1, 512, 512)
    print("| forward | peak live activations, fp32, batch 1 | as fp16 | largest difference | argmax agreement |")
    print("|---|---|---|---|---|")
    with torch.inference_mode():
        reference = net(x)
        for name, forward in (("standard", net), ("lean", lean)):
            mode = PeakLiveBytes()
            with mode:
                out = forward(x)
            diff = float((out - reference).abs().max())
            agree = float((out.argmax(1) == reference.argmax(1)).float().mean())
            print(f"| {name} | {mode.peak / MB:.0f} MB | {mode.peak / 2 / MB:.0f} MB | {diff:.1e} | {agree:.4%} |")
    # Any order of the same arithmetic holds the four encoder skips at once (at the bottom of the U).
    w, side = net.config.widths, x.shape[-1]
    skips = sum(c * (side >> i) ** 2 * 4 for i, c in enumerate(w[:4]))
    print(f"\nthe four encoder skips alone, live together in any order of this arithmetic: {skips / MB:.0f} MB fp32")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
