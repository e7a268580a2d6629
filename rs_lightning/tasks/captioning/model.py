"""The captioner: an open_clip CoCa, its tokenizer and image transforms, tiny offline configs, weight files.

- `load_coca(model, pretrained)`: any open_clip CoCa config ("coca_ViT-L-14", ...) with a `pretrained` tag
  (needs the hub) or a local checkpoint file; "coca-tiny" is a small random CoCa registered here for tests
  and the offline default (no pretrained CoCa or CLIP weights can be obtained offline).
- `image_transforms(model, pretrained)`: open_clip's preprocess for that model, built WITHOUT the model so the
  DataModule can prepare images on its own.
- `CaptionTokenizer`: open_clip's BPE tokenizer with the ids decoding needs (SOT, EOT, pad) and a clean decode.
- `vocab_from_references`: the token ids of a caption corpus, to restrict the output softmax to them (the
  paper's captioner used a vocabulary of training words; on a CPU it also makes the 49408-way softmax cheap).
- `load_weights` / `save_weights`: the model's full state dict (parameters and buffers) as safetensors; the
  keys are open_clip's, so `open_clip.create_model(name, pretrained="model.safetensors")` loads an expert too.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

TINY_COCA = "coca-tiny"
TINY_CLIP = "clip-tiny"

# 64 px images, 8 px patches, 2+2+2 layers of width 64: about 6.8M parameters, of which 6.3M are the BPE
# token embedding and the output projection (vocabulary 49408 kept, so open_clip's tokenizer works as is).
TINY_CONFIGS: dict[str, dict] = {
    TINY_COCA: {
        "embed_dim": 64,
        "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32,
                       "attentional_pool": True, "attn_pooler_queries": 16, "attn_pooler_heads": 2,
                       "output_tokens": True},
        "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2,
                     "embed_cls": True, "output_tokens": True},
        "multimodal_cfg": {"context_length": 24, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2,
                           "attn_pooler_heads": 2},
        "custom_text": True,
    },
    TINY_CLIP: {
        "embed_dim": 64,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
    },
}

_registered = False


def register_tiny_configs() -> None:
    """Register the tiny configs with open_clip (idempotent): `open_clip.create_model("coca-tiny")` works after."""
    global _registered
    if _registered:
        return
    import open_clip

    folder = Path(tempfile.mkdtemp(prefix="rs_open_clip_configs_"))
    for name, cfg in TINY_CONFIGS.items():
        (folder / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(folder)
    _registered = True


def _is_tag(pretrained: str | None) -> bool:
    return bool(pretrained) and not os.path.isfile(pretrained)


def load_coca(model: str = TINY_COCA, pretrained: str | None = None) -> nn.Module:
    """Build an open_clip CoCa.

    Args:
        model: an open_clip config name containing a text decoder (CoCa), e.g. "coca_ViT-L-14" or "coca-tiny".
        pretrained: None (random init), an open_clip tag such as "mscoco_finetuned_laion2b_s13b_b90k" (downloads
            from the hub: cannot run offline) or a local checkpoint file (.safetensors, .pt, .bin).

    Returns:
        The CoCa module in train mode, float32, on CPU.
    """
    import open_clip

    register_tiny_configs()
    # A local `pretrained` file goes through open_clip's own reader (it converts open_clip's checkpoint
    # layouts); weights_only=True is pinned here so it never runs pickled code whatever open_clip's default.
    coca = open_clip.create_model(model, pretrained=pretrained, weights_only=True)
    if not hasattr(coca, "text_decoder"):
        raise ValueError(f"open_clip model {model!r} is not a CoCa (no text decoder): captioning needs one")
    if not pretrained:
        # open_clip's MultimodalTransformer creates text_projection with torch.empty and never initialises it
        # (its init_parameters is not called): zeros in a fresh process, whatever the allocator recycles after
        # other work (NaN seen after a SmolLM2 PPO run in the same process). Zero it: uniform predictions at the
        # start, and what every measured run here started from.
        with torch.no_grad():
            coca.text_decoder.text_projection.zero_()
    coca.train()
    return coca


def image_transforms(model: str = TINY_COCA, pretrained: str | None = None, aug_cfg: dict | None = None):
    """open_clip's (train, eval) image transforms for `model`, without building the model.

    The preprocessing config is merged as `open_clip.create_model` does: defaults, the model's image size and
    its `preprocess_cfg`, then the pretrained tag's mean/std/interpolation.

    Returns:
        `(train_transform, eval_transform)`: PIL image -> `[3, S, S]` float tensor.
    """
    import open_clip
    from open_clip.transform import PreprocessCfg, image_transform_v2, merge_preprocess_dict

    register_tiny_configs()
    cfg = open_clip.get_model_config(model)
    if cfg is None:
        raise ValueError(f"unknown open_clip model config {model!r}")
    pp = merge_preprocess_dict(PreprocessCfg(), {"size": cfg["vision_cfg"]["image_size"]})
    pp = merge_preprocess_dict(pp, cfg.get("preprocess_cfg", {}))
    if _is_tag(pretrained):
        pp = merge_preprocess_dict(pp, open_clip.get_pretrained_cfg(model, pretrained) or {})
    pp_cfg = PreprocessCfg(**pp)
    return image_transform_v2(pp_cfg, is_train=True, aug_cfg=aug_cfg), image_transform_v2(pp_cfg, is_train=False)


class CaptionTokenizer:
    """open_clip's tokenizer for a model, plus the special ids decoding needs.

    Args:
        model: the open_clip config name (its text context length bounds caption length).
    """

    def __init__(self, model: str = TINY_COCA) -> None:
        import open_clip

        register_tiny_configs()
        self.tokenizer = open_clip.get_tokenizer(model)
        self.context_length = int(self.tokenizer.context_length)
        self.sot_id = int(getattr(self.tokenizer, "sot_token_id", 49406))
        self.eot_id = int(getattr(self.tokenizer, "eot_token_id", 49407))
        self.pad_id = 0  # CoCa's pad id: its caption loss ignores it and its text tower masks it

    def encode(self, captions: Sequence[str]) -> Tensor:
        """`[N, context_length]` ids: SOT, tokens, EOT, then pad; too long captions are cut (EOT kept last)."""
        return self.tokenizer(list(captions))

    def decode(self, ids: Tensor | Sequence[int]) -> str:
        """Text of one generated sequence (SOT/EOT/pad dropped, stops at the first EOT)."""
        out = []
        for token in (ids.tolist() if isinstance(ids, Tensor) else ids):
            if token == self.eot_id:
                break
            if token not in (self.sot_id, self.pad_id):
                out.append(int(token))
        return " ".join(self.tokenizer.decode(out).split())

    def decode_batch(self, ids: Tensor) -> list[str]:
        """Texts of `[N, T]` generated ids."""
        return [self.decode(row) for row in ids]


def vocab_from_references(tokenizer: CaptionTokenizer, references: Iterable[Sequence[str]]) -> Tensor:
    """Sorted unique token ids of every reference caption, plus EOT (SOT and pad are never generated).

    Returns:
        `[V']` int64.
    """
    ids = {tokenizer.eot_id}
    for refs in references:
        tokens = tokenizer.encode(list(refs))
        ids.update(int(t) for t in tokens.unique().tolist())
    ids.discard(tokenizer.sot_id)
    ids.discard(tokenizer.pad_id)
    return torch.tensor(sorted(ids), dtype=torch.long)


def save_weights(model: nn.Module, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """Write the full state dict (all parameters and persistent buffers) as one safetensors file, atomically."""
    from safetensors.torch import save

    from rs_lightning.soup.atomic import atomic_file

    path = Path(path)
    # clone(): safetensors refuses tensors that share storage; contiguous CPU copies are safe to write.
    state = {k: v.detach().to("cpu").clone().contiguous() for k, v in model.state_dict().items()}
    with atomic_file(path, "wb") as f:
        f.write(save(state, metadata=metadata or {}))
    return path


def load_weights(model: nn.Module, path: str | os.PathLike) -> None:
    """Load a full state dict into `model` STRICTLY (every key, shape and dtype must match).

    Args:
        path: a .safetensors file of the model's state dict, a Lightning .ckpt of a `CaptioningModule`
            (its "model." keys), or a torch .pt/.bin state dict.

    Raises:
        SoupError (a ValueError): a file that cannot be read safely; it is read by the soup engine's reader
            (`rs_lightning.soup.io.open_source`), which never runs pickled code (`torch.load(weights_only=True)`
            with inert stand-ins for Lightning's hyper-parameters), so a malicious checkpoint cannot execute.
        ValueError: a key whose shape or dtype differs from the model's.
    """
    from rs_lightning.soup.io import open_source

    path = str(path)
    with open_source(path) as source:
        state = {k: source[k] for k in source}
    if any(k.startswith("model.") for k in state):
        state = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    own = model.state_dict()
    for key, value in state.items():
        if key in own and (own[key].shape != value.shape or own[key].dtype != value.dtype):
            raise ValueError(f"{path}: {key} is {tuple(value.shape)} {value.dtype}, the model has "
                             f"{tuple(own[key].shape)} {own[key].dtype}")
    model.load_state_dict(state, strict=True)
