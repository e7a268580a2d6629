"""`PromptDataModule`: the prompts a text policy is trained and evaluated on, as left-padded batches.

Splits (deterministic given `seed`):
- test: the FIRST `num_test` examples of the source's evaluation split, in source order (the paper's fixed
  evaluation prompts: the first 200);
- val: `num_val` examples held out of the source's train split by a seeded permutation (a validation set for
  picking the soup weights, disjoint from test and train);
- train: the next `num_train` examples of that permutation (all of them when None).
A local file without "{split}" in its path is a single pool: test is its first `num_test` rows, train and val
come from the rest.

Each query is the template (`prompts.py`) plus a reference prefix of n tokens, n drawn per example from
`prefix_tokens`. Queries longer than `max_prompt_tokens` are dropped (the paper drops Stack Exchange queries of
512 tokens or more) before the split sizes are counted.

A batch is a dict: `input_ids` and `attention_mask` (B, T), padded on the LEFT so generation continues every
row at the same column, and lists of B strings so rewards can work on text: `prompts` (the query text, i.e. the
decoded `input_ids`), `prefixes` (the reference part of the query, the start of the response a reward should
score), `references`, `instructions`, `inputs` (e.g. the article to summarise), `ids` and `labels` (None when
the source has none).
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, Dataset

from rs_lightning.data.resumable import EpochShuffleSampler, ResumableDataLoader, ResumableTrainOrder
from rs_lightning.tasks.text.datasets import SOURCES, load_examples
from rs_lightning.tasks.text.model_loading import OFFLINE_DEFAULT_MODEL, load_tokenizer, resolve_model_path
from rs_lightning.tasks.text.prompts import TEMPLATES, build_query, check_prefix_range

_TEXT_FIELDS = {"prompts": "prompt", "prefixes": "prefix", "references": "reference",
                "instructions": "instruction", "inputs": "input", "ids": "id", "labels": "label"}


class PromptDataset(Dataset):
    """A list of tokenized prompt items (dicts with "input_ids" plus the text fields)."""

    def __init__(self, items: list[dict]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[index]


@dataclass
class LeftPadCollator:
    """Collate prompt items into a left-padded batch (a class, not a closure, so worker processes can pickle it).

    Args:
        pad_token_id: id written in the padded positions; the mask, not this id, tells padding apart (SmolLM2
            has pad = eos).
    """

    pad_token_id: int

    def __call__(self, items: list[dict]) -> dict[str, Any]:
        length = max(len(item["input_ids"]) for item in items)
        input_ids = torch.full((len(items), length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(items), length), dtype=torch.long)
        for row, item in enumerate(items):
            n = len(item["input_ids"])
            if n:
                input_ids[row, length - n:] = torch.as_tensor(item["input_ids"], dtype=torch.long)
                attention_mask[row, length - n:] = 1
        batch: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
        for key, field in _TEXT_FIELDS.items():
            batch[key] = [item.get(field) for item in items]
        return batch


class PromptDataModule(ResumableTrainOrder, LightningDataModule):
    """Prompts of one text source, templated, prefixed with the human reference start, tokenized, left padded.

    Args:
        source: news_summary | reddit_tldr | stack_exchange | imdb | hh_rlhf | drug_reviews, or a local
            JSONL/JSON/CSV/TSV path with columns instruction, reference (optional input, id); a "{split}" in the
            path is replaced by "train" / "test".
        tokenizer: the policy's model id or folder, or "smollm2-135m-instruct" (only the tokenizer is loaded).
        template: "alpaca" (the paper's) or "chat" (the tokenizer's chat template).
        prefix_tokens: inclusive range of the reference-prefix length in tokens; (0, 0) disables it.
        max_prompt_tokens: queries with more tokens are dropped.
        num_train: training prompts (None: all that remain after val).
        num_val: validation prompts held out of the train split.
        num_test: the first prompts of the evaluation split (the paper: 200).
        batch_size: training batch size.
        eval_batch_size: validation/test/predict batch size.
        seed: seeds the val/train permutation, the prefix lengths and the training shuffle.
        num_workers: DataLoader workers (tokenization is done up front, so 0 is usually best).
        source_kwargs: extra keyword arguments for the source function (e.g. {"data_files": ...} for a local
            copy of a hub dataset, {"max_words": 100} for drug_reviews).
        cache_dir: where the offline default model is converted (see `model_loading.default_cache_dir`).
    """

    def __init__(
        self,
        source: str = "drug_reviews",
        tokenizer: str = OFFLINE_DEFAULT_MODEL,
        template: str = "alpaca",
        prefix_tokens: tuple[int, int] = (2, 7),
        max_prompt_tokens: int = 512,
        num_train: int | None = None,
        num_val: int = 32,
        num_test: int = 200,
        batch_size: int = 16,
        eval_batch_size: int = 32,
        seed: int = 0,
        num_workers: int = 0,
        source_kwargs: dict[str, Any] | None = None,
        cache_dir: str | None = None,
    ):
        super().__init__()
        if template not in TEMPLATES:
            raise ValueError(f"unknown template {template!r}; expected one of {TEMPLATES}")
        for name, value in (("num_val", num_val), ("num_test", num_test), ("num_train", num_train or 0)):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        self.save_hyperparameters()
        self.source = source
        self.tokenizer_name = tokenizer
        self.template = template
        self.prefix_tokens = check_prefix_range(prefix_tokens)
        self.max_prompt_tokens = max_prompt_tokens
        self.num_train, self.num_val, self.num_test = num_train, num_val, num_test
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.seed = seed
        self.num_workers = num_workers
        self.source_kwargs = dict(source_kwargs or {})
        self.cache_dir = cache_dir
        self._tokenizer = None
        self.train_set: PromptDataset | None = None
        self.val_set: PromptDataset | None = None
        self.test_set: PromptDataset | None = None

    @property
    def tokenizer(self):
        """The policy's tokenizer, left padded, loaded on first use."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.tokenizer_name, cache_dir=self.cache_dir)
        return self._tokenizer

    def prepare_data(self) -> None:
        # Runs on one process per node: convert the offline default once, before every rank loads it.
        resolve_model_path(self.tokenizer_name, self.cache_dir)

    def _encode(self, example: dict) -> dict | None:
        """Template + prefix + token ids for one example; None when the query is too long."""
        tok = self.tokenizer
        query, prefix = build_query(example, template=self.template, tokenizer=tok,
                                    prefix_tokens=self.prefix_tokens, seed=self.seed)
        # The chat template already writes its special tokens; Alpaca gets the tokenizer's own (e.g. LLaMA's BOS).
        ids = tok(query, add_special_tokens=self.template == "alpaca")["input_ids"]
        if tok.eos_token_id is not None and ids and ids[-1] == tok.eos_token_id and not query.endswith(tok.eos_token):
            ids = ids[:-1]  # tokenizers with add_eos_token (the paper's LLaMA) append EOS: the query must stay open
        if len(ids) > self.max_prompt_tokens:
            return None
        return {"id": str(example["id"]), "prompt": query, "prefix": prefix, "reference": example["reference"],
                "instruction": example["instruction"], "input": example.get("input", "") or "",
                "label": example.get("label"), "input_ids": ids}

    def _take(self, examples: Iterable[dict], n: int | None, counter: list[int]) -> list[dict]:
        """Encode examples in order until `n` fit (all when None); counter[0] counts the dropped ones."""
        out: list[dict] = []
        iterator: Iterator[dict] = iter(examples)
        while n is None or len(out) < n:
            example = next(iterator, None)
            if example is None:
                break
            item = self._encode(example)
            if item is None:
                counter[0] += 1
            else:
                out.append(item)
        return out

    def _pools(self) -> tuple[list[dict], list[dict]]:
        """(train pool, evaluation pool) of raw examples."""
        single = self.source not in SOURCES and "{split}" not in self.source and Path(self.source).is_file()
        if single:
            pool = load_examples(self.source, "train", **self.source_kwargs)
            return pool[self.num_test:], pool[:self.num_test]
        return (load_examples(self.source, "train", **self.source_kwargs),
                load_examples(self.source, "test", **self.source_kwargs))

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        train_pool, eval_pool = self._pools()
        dropped = [0]
        test = self._take(eval_pool, self.num_test, dropped)
        order = list(range(len(train_pool)))
        random.Random(self.seed).shuffle(order)
        shuffled = (train_pool[i] for i in order)
        val = self._take(shuffled, self.num_val, dropped)
        train = self._take(shuffled, self.num_train, dropped)
        for name, items, wanted in (("test", test, self.num_test), ("val", val, self.num_val),
                                    ("train", train, self.num_train)):
            if wanted is not None and len(items) < wanted:
                rank_zero_warn(f"{self.source}: only {len(items)} {name} prompts available, {wanted} requested")
        if dropped[0]:
            rank_zero_info(f"{self.source}: dropped {dropped[0]} prompts longer than {self.max_prompt_tokens} tokens")
        self.train_set, self.val_set, self.test_set = PromptDataset(train), PromptDataset(val), PromptDataset(test)

    def example_views(self, split: str, indices: list[int]) -> list[dict[str, Any]]:
        """What a person sees of items `indices` of a split (`rs serve`): the prompt (and reference, if any)."""
        dataset = {"train": self.train_set, "val": self.val_set, "test": self.test_set}[split]
        if dataset is None:
            raise RuntimeError("call setup() before asking for examples")
        views = []
        for i in indices:
            item = dataset[i]
            view = {"prompt": item.get("prompt")}
            if item.get("reference"):
                view["references"] = [item["reference"]]
            views.append(view)
        return views

    def _loader(self, dataset: PromptDataset | None, batch_size: int, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError("call setup() before asking for a dataloader")
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator,
                          collate_fn=LeftPadCollator(self.tokenizer.pad_token_id), num_workers=self.num_workers)

    def train_dataloader(self) -> DataLoader:
        if self.train_set is None:
            raise RuntimeError("call setup() before asking for a dataloader")
        # The order of epoch e is a function of (seed, e) alone, so a run resumed from a checkpoint sees the same
        # prompts in the same order as an uninterrupted one (a seeded DataLoader generator would restart from
        # its seed after a resume). Lightning calls set_epoch; under DDP it wraps this sampler per rank.
        sampler = EpochShuffleSampler(len(self.train_set), self.seed)
        return ResumableDataLoader(self.train_set, batch_size=self.batch_size, sampler=sampler,
                                   generator=torch.Generator().manual_seed(self.seed),  # workers' seeds only
                                   collate_fn=LeftPadCollator(self.tokenizer.pad_token_id),
                                   num_workers=self.num_workers,
                                   resume_source=self)  # a mid-epoch restart drops the batches trained on

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, self.eval_batch_size, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, self.eval_batch_size, shuffle=False)
