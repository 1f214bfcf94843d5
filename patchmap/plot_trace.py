"""A token trace's figure in ROME's layout (Meng et al. 2022, Figure 1): a panel per component, one row per
token (labelled with the token, subject tokens marked with *), one column per layer (a window's centre),
colour = p(answer) after restoring (noise) or patching (swap) that component there."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .plot import save_figure  # noqa: E402

COLOURS = {"resid": "Purples", "mlp": "Greens", "attn": "Reds"}  # ROME's
NAMES = {"resid": "single restored layer", "mlp": "MLP", "attn": "Attn"}
ACTIONS = {"noise": "restoring", "swap": "patching the source's"}
WHAT = {"resid": "state", "mlp": "MLP", "attn": "attention"}


def axis_label(component: str, window: int) -> str:
    """The x axis: ROME's 'single restored layer' or 'center of interval of N restored MLP layers'."""
    if window == 1:
        return "single patched layer"
    return f"centre of {window} patched {'layers' if component == 'resid' else NAMES[component] + ' layers'}"


def save_trace(ds, png, pdf):
    """The trace dataset's figure (patchmap.traces): p(answer) per component, token and layer, each panel
    coloured from the fully corrupted p(answer) up, the unpatched one marked on its colour bar."""
    components = list(ds["component"].values)
    tokens = [f"{text}*" if subject else str(text) for text, subject in zip(ds["token_text"].values,
                                                                             ds["subject"].values)]
    layers = ds["layer"].values
    low, high = float(ds["p_answer_corrupted"]), float(ds["p_answer_unpatched"])
    fig, axes = plt.subplots(1, len(components), squeeze=False, sharey=True, layout="constrained",
                             figsize=(1.2 + 2.9 * len(components), 1.4 + 0.22 * len(tokens)))
    for ax, component in zip(axes[0], components):
        row = ds.sel(component=component)
        values = row["p_target_answer"].values
        image = ax.pcolormesh(values, cmap=COLOURS[component], vmin=min(low, float(values.min())),
                              vmax=max(high, float(values.max())))
        ax.invert_yaxis()
        ax.set_yticks(np.arange(len(tokens)) + 0.5, tokens)
        step = max(1, int(np.ceil(len(layers) / 8)))
        ax.set_xticks(np.arange(0, len(layers), step) + 0.5, [str(l) for l in layers[::step]])
        ax.set_xlabel(axis_label(component, int(row["window"])))
        ax.set_title(f"{ACTIONS[ds.attrs['intervention']]} {WHAT[component]}", fontsize=10)
        ax.tick_params(length=0)
        bar = fig.colorbar(image, ax=ax, fraction=0.06, pad=0.02)
        bar.ax.axhline(high, color="black", linewidth=1)
        bar.set_label(f"p({ds.attrs['answer'].strip()})")
    fig.suptitle(f"{ds.attrs['prompt']} → {ds.attrs['answer'].strip()}   (unpatched p = {high:.2f}, "
                 f"{'corrupted' if ds.attrs['intervention'] == 'noise' else 'source'} p = {low:.2f})", fontsize=10)
    save_figure(fig, png, pdf)
