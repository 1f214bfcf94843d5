"""The paper-style heatmap: rows = sites in config order, columns = layers, colour = mean JS."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .storage import atomic_path  # noqa: E402


def draw_heatmap(ax, ds, vmin=None, vmax=None, title=None):
    values = ds["js_mean"].transpose("site", "layer").values
    layers = ds["layer"].values
    image = ax.imshow(values, cmap="Blues", aspect="auto", interpolation="nearest",
                      vmin=0.0 if vmin is None else vmin, vmax=vmax)
    step = max(1, int(np.ceil(len(layers) / 16)))
    ax.set_xticks(range(0, len(layers), step), [str(l) for l in layers[::step]])
    ax.set_yticks(range(len(ds["site"])), list(ds["site"].values))
    ax.set_xlabel("Layer")
    ax.tick_params(length=0)
    if title:
        ax.set_title(title)
    return image


def save_heatmap(ds, png, pdf, vmin=None, vmax=None, title=None):
    n_layers, n_sites = ds.sizes["layer"], ds.sizes["site"]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.32 * n_layers + 2.2), 0.45 * n_sites + 1.3))
    image = draw_heatmap(ax, ds, vmin, vmax, title)
    fig.colorbar(image, ax=ax, label="Avg JS Divergence", fraction=0.05, pad=0.02)
    fig.tight_layout()
    for path, fmt in ((png, "png"), (pdf, "pdf")):
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=fmt, dpi=200, metadata={"Software": None} if fmt == "png" else None)
    plt.close(fig)
