"""COCO captions with the Karpathy split (`dataset_coco.json`), the paper's captioning data.

`dataset_coco.json` (Karpathy & Fei-Fei) lists every COCO 2014 image once:
`{"images": [{"filepath": "val2014", "filename": "COCO_val2014_....jpg", "split": "train|restval|val|test",
"cocoid": 391895, "sentences": [{"raw": "A man ...", "tokens": [...]}, ...]}, ...]}`.
The paper trains on train + restval (113,287 images) and evaluates on val (its code caps it at 5000 images;
the paper says only "Karpathy split"). References are the `raw` sentences: rewards tokenise them their own
way (`rewards.caption_text.tokenize`), evaluation with the PTB tokenizer.

Images are opened with PIL and CONVERTED to RGB: the paper's data loader replaced every non-RGB (grayscale)
COCO image by a blank canvas, an upstream bug not reproduced here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from PIL import Image

SPLITS = {"train": ("train", "restval"), "val": ("val",), "test": ("test",)}


def load_karpathy(annotations: str | os.PathLike, split: str, limit: int | None = None) -> list[dict]:
    """Entries of one split of a Karpathy-format file, in file order.

    Args:
        annotations: path to `dataset_coco.json`.
        split: "train" (train + restval), "val" or "test".
        limit: keep the first `limit` entries (None: all).

    Returns:
        Dicts with `filepath`, `filename`, `id` (cocoid, else imgid, else the file name) and `references`.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    with open(annotations, encoding="utf-8") as f:
        data = json.load(f)
    entries = []
    for image in data["images"]:
        if image.get("split") not in SPLITS[split]:
            continue
        refs = [s["raw"].strip() for s in image.get("sentences", []) if s.get("raw", "").strip()]
        if not refs:
            continue
        entries.append({
            "filepath": image.get("filepath", ""),
            "filename": image["filename"],
            "id": str(image.get("cocoid", image.get("imgid", image["filename"]))),
            "references": refs,
        })
        if limit is not None and len(entries) >= limit:
            break
    return entries


class KarpathyCOCO:
    """One split of COCO (Karpathy): `{"image", "references", "id"}` items with images loaded on access.

    Args:
        root: folder holding `train2014/` and `val2014/` (each entry's `filepath`).
        split: "train" (train + restval), "val" or "test".
        annotations: the Karpathy file (default `<root>/dataset_coco.json`).
        limit: keep the first `limit` images of the split (the paper's evaluation used 5000 val images).
        transform: applied to the RGB PIL image (e.g. open_clip's preprocess).
    """

    def __init__(self, root: str | os.PathLike, split: str = "train", annotations: str | os.PathLike | None = None,
                 limit: int | None = None, transform=None) -> None:
        self.root = Path(root)
        path = Path(annotations) if annotations is not None else self.root / "dataset_coco.json"
        if not path.is_file():
            raise FileNotFoundError(f"Karpathy split file not found: {path} (dataset_coco.json)")
        self.entries = load_karpathy(path, split, limit)
        if not self.entries:
            raise ValueError(f"no {split!r} images in {path}")
        self.references = [e["references"] for e in self.entries]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.entries)

    def image_path(self, index: int) -> Path:
        entry = self.entries[index]
        return self.root / entry["filepath"] / entry["filename"]

    def picture(self, index: int) -> Image.Image:
        """The untransformed RGB image of item `index` (what a person looks at, e.g. in `rs serve`)."""
        with Image.open(self.image_path(index)) as img:
            return img.convert("RGB")

    def __getitem__(self, index: int) -> dict:
        image = self.picture(index)
        if self.transform is not None:
            image = self.transform(image)
        return {"image": image, "references": self.references[index], "id": self.entries[index]["id"]}
