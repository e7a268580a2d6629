"""CoCa's decoder one token at a time: the last position's hidden state from per-layer caches.

Decoding a caption of T tokens by re-running `decoding.decoder_hidden` on the whole prefix at every step costs
O(T^2) token passes through both of CoCa's causal stacks (the unimodal text tower and the multimodal decoder).
Both are causal, so the states of earlier positions never change once computed: this module keeps, per
self-attention layer, the layer-normed inputs of the earlier positions (what that layer's keys and values are
projected from) and pushes only the new token through the layers, as transformers' key/value caches do
(github.com/huggingface/transformers, `Cache` in src/transformers/cache_utils.py). The arithmetic is the same
as the full forward pass, regrouped, so hidden states agree with `decoder_hidden(...)[:, -1]` to float rounding
(tests/test_captioning_incremental.py checks it against the full pass in float64).

Exactness with open_clip 3.3's text tower (open_clip/transformer.py, `TextTransformer._embeds`): with an
appended CLS embedding (CoCa), keys equal to the pad id are masked for every query, and in the legacy mode
(`correct_cls_mask=False`, the default) the mask is shifted by one position (key j is masked when token j-1 is
pad). The cache reproduces both. A text tower without a causal mask cannot be decoded incrementally:
`supports_incremental` says so and the caller falls back to the full pass.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def supports_incremental(model: nn.Module) -> bool:
    """Whether `model` (an open_clip CoCa) has the causal, batch-first, pre-norm blocks this cache assumes."""
    text, dec = getattr(model, "text", None), getattr(model, "text_decoder", None)
    if text is None or dec is None or getattr(text, "attn_mask", None) is None:
        return False
    if not (text.transformer.batch_first and dec.batch_first):
        return False
    blocks = [*text.transformer.resblocks, *dec.resblocks]
    return all(hasattr(b, "ln_1") and hasattr(b, "attention") and not hasattr(b, "ln_1_kv") for b in blocks)


class IncrementalDecoder:
    """The decoder's final-layer-normed hidden state of the newest position, fed one token per `step`.

    Args:
        model: an open_clip CoCa (`supports_incremental(model)` must hold).
        image_embs: `[N, Q, D]` image tokens the decoder cross-attends to, one row per sequence.
    """

    def __init__(self, model: nn.Module, image_embs: Tensor):
        if not supports_incremental(model):
            raise ValueError("this CoCa's text stacks are not causal pre-norm blocks: decode with the full pass")
        self.text, self.dec, self.image_embs = model.text, model.text_decoder, image_embs
        self.text_cache: list[Tensor | None] = [None] * len(self.text.transformer.resblocks)
        self.dec_cache: list[Tensor | None] = [None] * len(self.dec.resblocks)
        self.key_valid: Tensor | None = None  # [N, t] text-tower keys that open_clip's pad mask keeps
        self.last_valid: Tensor | None = None  # [N] whether the newest token is not pad (legacy shifted mask)
        self.position = 0

    def select(self, index: Tensor) -> None:
        """Keep rows `index` of every cache (beam search reorders its beams)."""
        self.text_cache = [c[index] for c in self.text_cache]
        self.dec_cache = [c[index] for c in self.dec_cache]
        self.image_embs = self.image_embs[index]
        if self.key_valid is not None:
            self.key_valid, self.last_valid = self.key_valid[index], self.last_valid[index]

    def _key_mask(self, token: Tensor, dtype: torch.dtype) -> Tensor | None:
        """open_clip's additive pad mask for the new query over keys 0..t (`[N*heads, 1, t+1]`), or None."""
        text = self.text
        if text.cls_emb is None:
            return None  # a causal tower without CLS applies no pad mask (use_pad_mask is bidirectional-only)
        token_valid = token != text.pad_id
        if getattr(text, "correct_cls_mask", False):
            new = token_valid
        else:  # legacy: key j is kept when token j-1 is not pad; key 0 always
            new = torch.ones_like(token_valid) if self.last_valid is None else self.last_valid
        self.last_valid = token_valid
        self.key_valid = new[:, None] if self.key_valid is None else torch.cat([self.key_valid, new[:, None]], 1)
        if bool(self.key_valid.all()):
            return None
        additive = torch.zeros(self.key_valid.shape, dtype=dtype, device=token.device)
        additive.masked_fill_(~self.key_valid, float("-inf"))
        return additive[:, None, :].repeat_interleave(text.heads, 0)

    @staticmethod
    def _self_block(block: nn.Module, x: Tensor, cache: Tensor | None, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """One pre-norm residual block for the new position `x` `[N, 1, W]`; returns (output, grown cache)."""
        h = block.ln_1(x)
        cache = h if cache is None else torch.cat([cache, h], dim=1)
        x = x + block.ls_1(block.attention(q_x=h, k_x=cache, v_x=cache, attn_mask=mask))
        x = x + block.ls_2(block.mlp(block.ln_2(x)))
        return x, cache

    def step(self, token: Tensor) -> Tensor:
        """Feed `token` `[N]` (ids; SOT first) at the next position; returns its `[N, W]` decoder hidden state."""
        text, t = self.text, self.position
        if t >= text.positional_embedding.shape[0] - (text.cls_emb is not None):
            raise ValueError(f"position {t} is beyond the text tower's context length")
        cast = text.transformer.get_cast_dtype()
        x = text.token_embedding(token[:, None]).to(cast) + text.positional_embedding[t].to(cast)
        mask = self._key_mask(token, x.dtype)
        for i, block in enumerate(text.transformer.resblocks):
            x, self.text_cache[i] = self._self_block(block, x, self.text_cache[i], mask)
        if text.cls_emb is None:
            x = text.ln_final(x)  # without CLS open_clip normalises the token outputs; with CLS it does not
        for i, (block, cross) in enumerate(zip(self.dec.resblocks, self.dec.cross_attn)):
            x, self.dec_cache[i] = self._self_block(block, x, self.dec_cache[i], None)
            x = cross(x, k_x=self.image_embs, v_x=self.image_embs)
        self.position += 1
        return self.dec.ln_final(x)[:, 0]
