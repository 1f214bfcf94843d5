"""The paper-style heatmap: rows = sites in config order, columns = layers, colour = mean JS; beside it, for
each head site (patchmap.heads), rows = heads, columns = layers."""

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


def save_figure(fig, png, pdf):
    """PNG and PDF, without creation dates, so that the same numbers give the same bytes."""
    for path, fmt, metadata in ((png, "png", {"Software": None}), (pdf, "pdf", {"CreationDate": None})):
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=fmt, dpi=200, metadata=metadata)
    plt.close(fig)


def draw_head_heatmap(ax, ds, head_site):
    """One head site's mean JS: rows = heads, columns = layers."""
    values = ds["head_js_mean"].sel(head_site=head_site).transpose("head", "layer").values
    layers, heads = ds["layer"].values, ds["head"].values
    image = ax.imshow(values, cmap="Blues", aspect="auto", interpolation="nearest", vmin=0.0)
    for axis, ticks, labels in ((ax.set_xticks, layers, layers), (ax.set_yticks, heads, heads)):
        step = max(1, int(np.ceil(len(ticks) / 16)))
        axis(range(0, len(ticks), step), [str(t) for t in labels[::step]])
    ax.set_xlabel("Layer")
    ax.set_ylabel("Head")
    ax.set_title(str(head_site))
    ax.tick_params(length=0)
    return image


def save_heatmap(ds, png, pdf, vmin=None, vmax=None, title=None):
    """The site x layer heatmap, and beside it a head x layer heatmap of each head site (each panel on its
    own colour scale)."""
    head_sites = list(ds["head_site"].values) if "head_site" in ds.dims else []
    if head_sites:
        save_with_heads(ds, head_sites, png, pdf, title)
        return
    n_layers, n_sites = ds.sizes["layer"], ds.sizes["site"]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.32 * n_layers + 2.2), 0.45 * n_sites + 1.3))
    image = draw_heatmap(ax, ds, vmin, vmax, title)
    fig.colorbar(image, ax=ax, label="Avg JS Divergence", fraction=0.05, pad=0.02)
    fig.tight_layout()
    save_figure(fig, png, pdf)


def save_with_heads(ds, head_sites, png, pdf, title=None):
    n_layers = ds.sizes["layer"]
    panels = [None] * ("site" in ds.dims) + head_sites  # None: the site x layer heatmap
    width = max(4.0, 0.32 * n_layers + 2.2)
    fig, axes = plt.subplots(1, len(panels), squeeze=False, layout="constrained",
                             figsize=(width * len(panels), max(2.4, 0.22 * ds.sizes["head"] + 1.3)))
    for ax, panel in zip(axes[0], panels):
        image = draw_heatmap(ax, ds, title="Sites") if panel is None else draw_head_heatmap(ax, ds, panel)
        fig.colorbar(image, ax=ax, label="Avg JS Divergence", fraction=0.05, pad=0.02)
    if title:
        fig.suptitle(title)
    save_figure(fig, png, pdf)


def save_lines(ds, png, pdf, title=None):
    """Mean JS per layer for each site, with its bootstrap 95% band."""
    fig, ax = plt.subplots(figsize=(max(4.5, 0.22 * ds.sizes["layer"] + 3.0), 3.2))
    layers = ds["layer"].values
    for site in ds["site"].values:
        row = ds.sel(site=site)
        (line,) = ax.plot(layers, row["js_mean"].values, marker="o", markersize=3, label=str(site))
        ax.fill_between(layers, row["js_ci_low"].values, row["js_ci_high"].values, color=line.get_color(), alpha=0.2)
    ax.set_xlabel("Layer")
    ax.set_ylabel("Avg JS Divergence")
    ax.set_ylim(bottom=0)
    ax.legend(frameon=False)
    ax.set_title(title or "")
    fig.tight_layout()
    save_figure(fig, png, pdf)


def save_grid(datasets, titles, png, pdf, columns=2):
    """Several runs' heatmaps in a grid with one shared colour scale."""
    vmax = max(float(ds["js_mean"].max()) for ds in datasets) or 1.0
    rows = -(-len(datasets) // columns)
    widest = max(ds.sizes["layer"] for ds in datasets)
    tallest = max(ds.sizes["site"] for ds in datasets)
    fig, axes = plt.subplots(rows, columns, squeeze=False, layout="constrained",
                             figsize=(columns * max(4.5, 0.22 * widest + 2.0), rows * (0.45 * tallest + 1.6)))
    for ax, ds, title in zip(axes.flat, datasets, titles):
        image = draw_heatmap(ax, ds, 0.0, vmax, title)
    for ax in list(axes.flat)[len(datasets):]:
        ax.axis("off")
    fig.colorbar(image, ax=axes, label="Avg JS Divergence", fraction=0.04, pad=0.02, shrink=0.8)
    save_figure(fig, png, pdf)
