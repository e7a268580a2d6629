"""Caption data: the synthetic set is deterministic and varied; COCO (Karpathy format) loads from a tiny fixture."""

import json

import pytest
import torch
from PIL import Image

from rs_lightning.rewards import caption
from rs_lightning.tasks.captioning import synthetic
from rs_lightning.tasks.captioning.coco import KarpathyCOCO, load_karpathy
from rs_lightning.tasks.captioning.data import CaptionDataModule


def test_synthetic_is_deterministic_and_splits_differ():
    a = synthetic.SyntheticCaptions(20, "train", seed=3)
    b = synthetic.SyntheticCaptions(20, "train", seed=3)
    assert a.references == b.references
    assert list(a[5]["image"].getdata()) == list(b[5]["image"].getdata())
    assert a.references != synthetic.SyntheticCaptions(20, "test", seed=3).references
    assert a.references != synthetic.SyntheticCaptions(20, "train", seed=4).references


def test_synthetic_captions_describe_the_scene():
    ds = synthetic.SyntheticCaptions(60, "train", seed=0)
    n_shapes = {len(s.shapes) for s in ds.scenes}
    assert n_shapes == {1, 2}
    for scene, refs in zip(ds.scenes, ds.references):
        assert len(refs) == 5 and len(set(refs)) == 5
        for ref in refs:  # every reference names every shape's colour
            assert all(shape.color in ref for shape in scene.shapes)
        if len(scene.shapes) == 2:
            positions = {s.position for s in scene.shapes}
            assert positions in ({"left", "right"}, {"top", "bottom"})  # opposite sides: no overlap


def test_synthetic_pixels_match_the_scene():
    scene = synthetic.Scene((synthetic.Shape("square", "red", "large", "left", (0.0, 0.0)),), "white")
    image = synthetic.render(scene, 64)
    assert image.getpixel((16, 32)) == synthetic.COLORS["red"]
    assert image.getpixel((48, 32)) == synthetic.BACKGROUNDS["white"]


def test_synthetic_references_make_metrics_disagree():
    """Scored against the other 4 references, the reference that BLEU-1 prefers is not always ROUGE-L's or
    CIDEr-D's: the metrics reward different captions, which is what the experts need."""
    ds = synthetic.SyntheticCaptions(40, "train", seed=0)
    cider = caption.CiderD(ds.references)
    disagree = {"rouge_l": 0, "cider_d": 0}
    for refs in ds.references:
        others = [[r for r in refs if r != c] for c in refs]
        best = {m: max(range(5), key=lambda i, m=m: caption.score(m, [refs[i]], [others[i]])[0])
                for m in ("bleu1", "rouge_l")}
        best["cider_d"] = max(range(5), key=lambda i: cider.score([refs[i]], [others[i]])[0])
        for m in disagree:
            disagree[m] += best[m] != best["bleu1"]
    assert disagree["rouge_l"] >= 5 and disagree["cider_d"] >= 5


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory):
    """A tiny COCO in the Karpathy format: JPEGs in train2014/ and val2014/ (one grayscale) and dataset_coco.json."""
    root = tmp_path_factory.mktemp("coco")
    images = []
    splits = ["train", "restval", "val", "val", "test", "train"]
    for i, split in enumerate(splits):
        folder = "val2014" if split in ("val", "test", "restval") else "train2014"
        name = f"COCO_{folder}_{i:012d}.jpg"
        (root / folder).mkdir(exist_ok=True)
        mode = "L" if i == 1 else "RGB"
        Image.new(mode, (40 + 8 * i, 32), 90 if mode == "L" else (30 * i, 100, 200)).save(root / folder / name)
        images.append({"filepath": folder, "filename": name, "split": split, "cocoid": 1000 + i, "imgid": i,
                       "sentences": [{"raw": f"A photo number {i}.", "tokens": ["a", "photo"]},
                                     {"raw": f"Picture {i} of a thing", "tokens": ["picture"]}]})
    (root / "dataset_coco.json").write_text(json.dumps({"images": images, "dataset": "coco"}))
    return root


def test_karpathy_splits(coco_root):
    train = load_karpathy(coco_root / "dataset_coco.json", "train")
    assert [e["id"] for e in train] == ["1000", "1001", "1005"]  # train + restval, file order
    assert [e["id"] for e in load_karpathy(coco_root / "dataset_coco.json", "val")] == ["1002", "1003"]
    assert load_karpathy(coco_root / "dataset_coco.json", "val", limit=1)[0]["references"] == [
        "A photo number 2.", "Picture 2 of a thing"]
    with pytest.raises(ValueError, match="split"):
        load_karpathy(coco_root / "dataset_coco.json", "restval")


def test_coco_grayscale_is_converted_not_blanked(coco_root):
    ds = KarpathyCOCO(coco_root, "train")
    item = ds[1]  # the grayscale JPEG
    assert item["image"].mode == "RGB" and item["image"].getpixel((3, 3))[0] > 60  # not a blank canvas
    assert item["id"] == "1001"


def test_datamodule_batches(coco_root):
    for dm in (CaptionDataModule(source="coco", root=str(coco_root), batch_size=2, eval_batch_size=2),
               CaptionDataModule(num_train=6, num_val=2, num_test=3, batch_size=4)):
        dm.setup("fit")
        batch = next(iter(dm.train_dataloader()))
        assert batch["images"].shape[1:] == (3, 64, 64) and batch["images"].dtype == torch.float32
        assert len(batch["references"]) == len(batch["ids"]) == batch["images"].shape[0]
        assert all(isinstance(r, list) and r for r in batch["references"])
        assert len(dm.train_references()) == len(dm.dataset("train"))
    with pytest.raises(ValueError, match="root"):
        CaptionDataModule(source="coco")
