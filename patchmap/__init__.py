"""patchmap: where does a language model decide its answer? Activation patching heatmaps."""

__version__ = "0.1.0"
