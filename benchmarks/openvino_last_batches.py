"""RSS of the OpenVINO runner over a folder's different last batches: full-width network, 256 x 256, batch 8.

Each case of a folder ends in its own short batch (its slice count modulo the batch size); this runs a full batch,
then each short size in turn, as such a folder would, and prints the process's RSS and the sizes held compiled.
Usage: python benchmarks/openvino_last_batches.py   (results: benchmarks/openvino_rss.md)
"""

import tempfile
from pathlib import Path

import torch

from flareseg.checkpoint import ModelInfo, save_checkpoint
from flareseg.export import ExportOptions, export_onnx
from flareseg.network import NetworkConfig, build_training_network
from flareseg.preprocess import NormalizationStats
from flareseg.runtime.runners import OpenVINORunner


def rss_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
    return float("nan")  # not Linux


d = Path(tempfile.mkdtemp())
torch.manual_seed(0)
net = build_training_network(NetworkConfig()).eval()
ck = save_checkpoint(
    d / "full.pt", net, ModelInfo(net.config, NormalizationStats(-350.0, 480.0), slice_size=(256, 256))
)
[fp32] = export_onnx(ck, d / "out", ExportOptions(verify_slices=1, batch_profile=(1, 8, 8)))
x = torch.randn(8, 1, 256, 256)
with OpenVINORunner(fp32.path, threads=2) as r:
    r.infer(x)
    print("batch 8", round(rss_mb()), flush=True)
    for n in range(1, 8):
        r.infer(x[:n])
        r.infer(x)
        print(f"last batch {n}: RSS {round(rss_mb())} MB, compiled {sorted(r._compiled)}", flush=True)
