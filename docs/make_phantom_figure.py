"""Render the phantom's mid-slices for the README: python docs/make_phantom_figure.py"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import ListedColormap

from flareseg.phantom import make_phantom

ph = make_phantom(shape=(256, 256, 96), spacing=(1.5, 1.5, 3.0), seed=0)
hu, lab = ph.image.astype(np.float32), ph.labels
k = int(np.argmax((lab == 4).sum(axis=(0, 1))))  # the slice with most pancreas
k_hi = int(np.argmax((lab == 3).sum(axis=(0, 1))))  # the slice with most spleen
colors = ListedColormap(
    [(0, 0, 0, 0), (0.85, 0.3, 0.2, 0.45), (0.2, 0.8, 0.3, 0.45), (0.2, 0.4, 0.9, 0.45), (0.95, 0.85, 0.1, 0.55)]
)
fig, axes = plt.subplots(1, 3, figsize=(12, 4.3))
window = dict(cmap="gray", vmin=40 - 200, vmax=40 + 200)  # abdominal window, L40 W400
# RAS voxels: show axial slices in radiological convention (patient's right on the left, anterior up).
for ax, kk, title in (
    (axes[0], k_hi, f"axial slice {k_hi} (liver, spleen)"),
    (axes[1], k, f"axial slice {k} (pancreas, kidneys)"),
):
    ax.imshow(hu[::-1, ::-1, kk].T, **window)
    ax.imshow(lab[::-1, ::-1, kk].T, cmap=colors, vmin=0, vmax=4, interpolation="nearest")
    ax.set_title(title)
    ax.axis("off")
cor = hu[::-1, int(np.argmax((lab == 2).sum(axis=(0, 2)))), :].T[::-1]
axes[2].imshow(cor, aspect=3.0 / 1.5, **window)
axes[2].set_title("coronal slice through the kidneys")
axes[2].axis("off")
fig.suptitle(
    "flareseg synthetic phantom, 256x256x96 at 1.5x1.5x3 mm "
    "(labels: liver red, kidneys green, spleen blue, pancreas yellow)",
    fontsize=9,
)
fig.tight_layout()
out = Path(__file__).with_name("phantom.png")
fig.savefig(out, dpi=80)
print(out)
