"""Tiny CoCas for decoding tests: open_clip's `coca-tiny` with non-uniform outputs.

A fresh open_clip CoCa has a zero output projection (uniform predictions), which would make every decoding
test trivial; these draw the projection from N(0, 1) and perturb every weight by 0.05 N(0, 1).
"""

import torch

from rs_lightning.tasks.captioning.model import load_coca


def perturbed_coca(seed: int, dtype: torch.dtype = torch.float32):
    """coca-tiny in eval mode and `dtype`, seeded by `seed`, with non-uniform next-token distributions."""
    torch.manual_seed(seed)
    model = load_coca("coca-tiny").eval().to(dtype)
    with torch.no_grad():
        model.text_decoder.text_projection.normal_(0.0, 1.0)
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model
