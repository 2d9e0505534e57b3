"""What the int8 copies of batched steps are smoothed with (SmoothQuant, see weights.Int4Linear):
the largest magnitude each input channel of every layer's query-key-value and gate-up products
takes while the model reads a short chat at load, and the factor per channel it gives."""

from __future__ import annotations

from typing import Any

import torch

# What the smoothing is measured on (see input_peaks): a short chat of mixed prose, numbers and
# code, read once by the model at load.
CALIBRATION = [
    {"role": "user", "content": "How is bread made, and how far is 5 km in miles?"},
    {
        "role": "assistant",
        "content": (
            "Flour, water and salt are mixed into a dough and kneaded until it is smooth. Yeast "
            "or a sourdough starter makes it rise: it turns sugars into gas, which the gluten "
            "traps. The loaf is shaped, rests again and bakes in a hot oven until the crust "
            "browns. Five kilometres is about 3.1 miles (multiply by 0.621).\n\n"
            "```python\ndef fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n"
            "        a, b = b, a + b\n    return a\n```"
        ),
    },
]
# SmoothQuant's migration strength: s_j = peak_j ** alpha / max|W[:, j]| ** (1 - alpha).
SMOOTHING_ALPHA = 0.5


def smoothing_factors(peaks: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """SmoothQuant's factor per input channel of `weight`, from the largest magnitude each
    channel of its input took (`peaks`): the input's range and the weights' meet halfway."""
    reach = weight.abs().amax(dim=0).clamp(min=1e-5)
    return peaks.clamp(min=1e-5) ** SMOOTHING_ALPHA / reach ** (1 - SMOOTHING_ALPHA)


def input_peaks(model: Any, ids: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The largest magnitude each input channel of every layer's query-key-value and gate-up
    products takes while `model` (its own forward pass) reads `ids`: [(attention's, MLP's)]."""
    peaks: list[list[torch.Tensor]] = [[] for _ in model.model.layers]
    hooks = []
    for index, layer in enumerate(model.model.layers):
        for module in (layer.self_attn.q_proj, layer.mlp.gate_proj):

            def keep(_, inputs, index=index):
                peaks[index].append(inputs[0].detach().float().abs().flatten(0, -2).amax(dim=0))

            hooks.append(module.register_forward_pre_hook(keep))
    try:
        with torch.inference_mode():
            model(input_ids=torch.tensor([ids]))
    finally:
        for hook in hooks:
            hook.remove()
    return [(attention, mlp) for attention, mlp in peaks]
