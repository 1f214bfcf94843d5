"""The output head as the fast engine applies it to many runs at once: the final norms, then the output
embedding as one matrix product into a buffer that is reused (a fresh [runs, vocabulary] tensor for every
call would be page-faulted in each time: 0.1 s per 130 MB here). On the CPU, with float32 weights, a
vocabulary whose size is not a multiple of PAD is computed against weights padded with zero rows: matrix
products of such widths (GPT-2's 50,257) ran at two thirds of the rate of padded ones, and the padding's
columns are cut off again."""

import torch

PAD = 64


class OutputHead:
    """float32 logits [R, V] of last-position hidden states [R, H], from `final_norms` (modules on
    `norm_devices`) and the model's output embedding."""

    def __init__(self, model, final_norms: list, norm_devices: list, output_device, softcap=None):
        self.final_norms, self.norm_devices, self.output_device, self.softcap = final_norms, norm_devices, \
            output_device, softcap
        self.embedding = model.get_output_embeddings()
        self.vocab = self.embedding.weight.shape[0]
        self.weight = self.bias = None  # the weights of the one matrix product, where it applies
        self.buffer = None
        plain = type(self.embedding) is torch.nn.Linear and not hasattr(self.embedding, "_hf_hook")
        weight = self.embedding.weight
        if plain and weight.device.type == "cpu" and weight.dtype == torch.float32:
            self.weight, self.bias = padded_weights(self.embedding)

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits [R, V]; where the one matrix product applies, a view of the reused buffer, valid until the
        next call."""
        for module, device in zip(self.final_norms, self.norm_devices):
            hidden = module(hidden.to(device))
        hidden = hidden.to(self.output_device)
        if self.weight is None or hidden.dtype != torch.float32:
            logits = self.embedding(hidden).float()
        else:
            logits = self._product(hidden)
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def _product(self, hidden):
        rows = len(hidden)
        if self.buffer is None or len(self.buffer) < rows:
            self.buffer = hidden.new_empty(rows, self.weight.shape[0])
        out = self.buffer[:rows]
        if self.bias is None:
            torch.matmul(hidden, self.weight.t(), out=out)
        else:
            torch.addmm(self.bias, hidden, self.weight.t(), out=out)
        return out[:, :self.vocab]


def padded_weights(embedding: torch.nn.Linear) -> tuple:
    """(weight [Vp, H], bias [Vp] or None): the output embedding's, with zero rows up to a multiple of PAD;
    made once per weights (kept on the module, and made again if they change)."""
    weight, bias = embedding.weight, embedding.bias
    key = (weight.data_ptr(), weight._version, None if bias is None else (bias.data_ptr(), bias._version))
    cached = getattr(embedding, "_patchmap_padded", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    rows = -(-weight.shape[0] // PAD) * PAD
    padded = weight.new_zeros(rows, weight.shape[1])
    padded[:weight.shape[0]] = weight.detach()
    padded_bias = None
    if bias is not None:
        padded_bias = weight.new_zeros(rows)
        padded_bias[:weight.shape[0]] = bias.detach()
    embedding._patchmap_padded = (key, (padded, padded_bias))
    return padded, padded_bias
