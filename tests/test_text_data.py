"""Text prompts, sources (the paper's filters on tiny hub-schema tables), and the PromptDataModule."""

import json

import pytest
import torch

from rs_lightning.tasks.text import datasets as ds
from rs_lightning.tasks.text.data import LeftPadCollator, PromptDataModule
from rs_lightning.tasks.text.model_loading import build_tiny_tokenizer
from rs_lightning.tasks.text.prompts import (
    alpaca_prompt,
    build_query,
    format_prompt,
    reference_prefix,
    sample_prefix_length,
    split_alpaca,
)

REF = "The side effects were terrible: nausea and dizziness."


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory, tok):
    path = tmp_path_factory.mktemp("tiny_tok")
    tok.save_pretrained(path)
    return str(path)


# ---- prompts -------------------------------------------------------------------------------------------------

def test_alpaca_template_exact():
    assert alpaca_prompt("Generate a one-sentence summary of this post.", "Stocks fell.") == (
        "### Instruction: Generate a one-sentence summary of this post. ### Input: Stocks fell. ### Response: ")
    assert alpaca_prompt("Generate a movie review.") == "### Instruction: Generate a movie review. ### Response: "
    assert split_alpaca("### Instruction: S. ### Input: Stocks fell. ### Response: Stocks dropped.") == (
        "Stocks fell.", "Stocks dropped.")
    assert split_alpaca("### Instruction: S. ### Response: Fine") == ("", "Fine")


def test_chat_template_exact(tok):
    assert format_prompt("Summarise.", "Stocks fell.", template="chat", tokenizer=tok) == (
        "<|im_start|>user\nSummarise.\n\nStocks fell.<|im_end|>\n<|im_start|>assistant\n")
    with pytest.raises(ValueError, match="needs a tokenizer"):
        format_prompt("x", template="chat")
    with pytest.raises(ValueError, match="unknown template"):
        format_prompt("x", template="vicuna")
    bare = build_tiny_tokenizer()
    bare.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        format_prompt("x", template="chat", tokenizer=bare)


def test_prefix_length_draw():
    draws = [sample_prefix_length(f"id{i}", 0) for i in range(500)]
    assert set(draws) == set(range(2, 8))  # inclusive [2, 7]
    assert draws == [sample_prefix_length(f"id{i}", 0) for i in range(500)]  # per-example, order-free
    assert draws != [sample_prefix_length(f"id{i}", 1) for i in range(500)]
    assert sample_prefix_length("id0", 0, (0, 0)) == 0
    assert sample_prefix_length("id0", 0, (3, 3)) == 3
    with pytest.raises(ValueError):
        sample_prefix_length("id0", 0, (5, 2))


def test_reference_prefix_and_query_exact(tok):
    assert [reference_prefix(REF, tok, n) for n in (0, 1, 2, 3)] == ["", "The", "The side", "The side effects"]
    assert reference_prefix("", tok, 4) == ""
    assert reference_prefix("é", tok, 1) == ""  # a cut inside a 2-byte character drops the partial character
    ex = {"id": "a1", "instruction": "Generate a movie review.", "reference": REF}
    assert sample_prefix_length("a1", 0) == 3
    assert build_query(ex, tokenizer=tok, seed=0) == (
        "### Instruction: Generate a movie review. ### Response: The side effects", "The side effects")
    assert build_query(ex, tokenizer=tok, seed=0, template="chat") == (
        "<|im_start|>user\nGenerate a movie review.<|im_end|>\n<|im_start|>assistant\nThe side effects",
        "The side effects")
    assert build_query(ex, prefix_tokens=(0, 0)) == ("### Instruction: Generate a movie review. ### Response: ", "")
    # The prefix is cut from prefix_source when given (news: "." replaced by ",").
    ex2 = {**ex, "prefix_source": "The side. effects"}
    assert build_query(ex2, tokenizer=tok, seed=0, prefix_tokens=(3, 3))[1] == "The side."


# ---- sources ----------------------------------------------------------------------------------------------------

def _news_row(i, text, pred="A summary. More."):
    return {"id": i, "text": text, "prediction": [{"text": pred, "score": 1.0}]}


def test_news_summary_filters(tmp_path):
    body = "WASHINGTON (Reuters) - " + "x" * 120
    hub_test = [_news_row("b", body), _news_row("a", body + "\nline two"), _news_row("b", body + " dup"),
                _news_row("c", "short"), _news_row("d", "y" * 1500), _news_row("e", "no marker " + "z" * 120)]
    out = ds.news_summary("train", rows=hub_test)
    assert [e["id"] for e in out] == ["a", "b"]  # length filter, dedupe (first kept), sorted by id, marker required
    assert out[0]["input"] == "x" * 120 + " line two" and out[1]["input"] == "x" * 120
    assert out[0]["reference"] == "A summary. More." and out[0]["prefix_source"] == "A summary, More,"
    assert out[0]["instruction"] == "Generate a one-sentence summary of this post."
    # train <-> test swapped: our "train" reads the hub's "test" split.
    files = {}
    for name, rows in (("test", hub_test), ("train", [_news_row("z", body)])):
        files[name] = tmp_path / f"{name}.jsonl"
        files[name].write_text("\n".join(json.dumps(r) for r in rows))
    assert [e["id"] for e in ds.news_summary("train", data_files=files)] == ["a", "b"]
    assert [e["id"] for e in ds.news_summary("test", data_files=files)] == ["z"]


def test_reddit_tldr_filters():
    def row(pid, post, choice=1):
        return {"info": {"id": pid, "post": post}, "summaries": [{"text": "worse. one"}, {"text": "I lost\nit. ok"}],
                "choice": choice}
    post = "p" * 150
    out = ds.reddit_tldr("train", rows=[row("t2", post), row("t1", post, 0), row("t2", post, 0),
                                         row("t3", "short"), row("t4", "q" * 1200), row("t5", None)])
    assert [e["id"] for e in out] == ["t1", "t2"]
    assert out[0]["reference"] == "worse. one" and out[1]["reference"] == "I lost it. ok"
    assert out[1]["prefix_source"] == "I lost it, ok" and out[1]["input"] == post


def test_stack_exchange_filters():
    rows = [{"qid": q, "question": question, "response_k": f"answer {q}\nmore", "response_j": "other"}
            for q, question in [(5, "How?"), (3, "x" * 300), (1, "Why?"), (5, "How again?"), (2, "When?")]]
    out = ds.stack_exchange("train", rows=rows)
    assert [e["id"] for e in out] == ["1", "2", "5"]  # < 300 chars, deduped by qid (first kept), sorted
    assert out[2]["instruction"] == "How?" and out[2]["reference"] == "answer 5 more" and out[2]["input"] == ""
    # The cap counts filtered rows before the dedupe (first 40k / 1000 in the paper).
    assert [e["id"] for e in ds.stack_exchange("test", rows=rows, max_rows=2)] == ["1", "5"]


def test_imdb_and_hh_rlhf_filters():
    out = ds.imdb("test", rows=[{"text": "short", "label": 0}, {"text": "r" * 201, "label": 1}])
    assert out == [{"id": "test-1", "instruction": "Generate a movie review.", "input": "", "reference": "r" * 201,
                    "label": 1, "source": "imdb"}]
    chosen = "\n\nHuman: What does DNA stand for?\n\nAssistant: DNA stands for deoxyribonucleic acid.\n\nHuman: ok"
    rows = [{"chosen": chosen}, {"chosen": "\n\nHuman: " + "w" * 100 + "\n\nAssistant: x"},
            {"chosen": "\n\nHuman:\n\nAssistant: x"}, {"chosen": None}]
    out = ds.hh_rlhf("train", rows=rows)
    assert [(e["id"], e["instruction"], e["reference"]) for e in out] == [
        ("train-0", "What does DNA stand for?", "DNA stands for deoxyribonucleic acid.")]


def test_local_file(tmp_path):
    jl = tmp_path / "p_train.jsonl"
    jl.write_text('{"instruction": "Say hi.", "reference": "Hi!"}\n{"instruction": "Q", "input": "I", '
                  '"reference": "R", "id": "x7"}\n')
    out = ds.load_examples(str(jl))
    assert [(e["id"], e["input"]) for e in out] == [("p_train-0", ""), ("x7", "I")]
    assert ds.load_examples(str(tmp_path / "p_{split}.jsonl"), "train") == out
    bad = tmp_path / "bad.csv"
    bad.write_text("prompt,reference\nhello,world\n")
    with pytest.raises(ValueError, match=r"bad\.csv: missing column\(s\) \['instruction'\]"):
        ds.local_file(bad)
    with pytest.raises(ValueError, match="unknown source"):
        ds.load_examples("no_such_source")


def test_hub_without_datasets_is_a_clear_error():
    try:
        import datasets  # noqa: F401
    except ModuleNotFoundError:
        with pytest.raises(ModuleNotFoundError, match="pip install datasets"):
            ds.imdb("train")
    else:
        pytest.skip("datasets is installed")


def test_drug_reviews_real_corpus():
    train, test = ds.drug_reviews("train"), ds.drug_reviews("test")
    assert (len(train), len(test)) == (561, 349)
    assert not {e["id"] for e in train} & {e["id"] for e in test}
    for e in train + test:
        assert 15 <= len(e["reference"].split()) <= 150
        assert "&#" not in e["reference"] and not e["reference"].startswith('"')
        assert e["label"] in ("positive", "negative", "neutral")
        assert e["instruction"].startswith("Write a short review of the drug ") and "</span>" not in e["instruction"]
    assert train[0]["instruction"] == "Write a short review of the drug Nubain for Pain."


# ---- data module -------------------------------------------------------------------------------------------------

def _dm(tok_dir, **kw):
    args = dict(source="drug_reviews", tokenizer=tok_dir, num_train=40, num_val=8, num_test=16, batch_size=4,
                eval_batch_size=8, seed=0)
    args.update(kw)
    dm = PromptDataModule(**args)
    dm.setup("fit")
    return dm


def test_left_pad_collator_exact():
    items = [{"input_ids": [5, 6, 7], "prompt": "a", "id": "1", "reference": "r"},
             {"input_ids": [9], "prompt": "b", "id": "2", "reference": "s", "label": "positive"}]
    batch = LeftPadCollator(pad_token_id=2)(items)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [2, 2, 9]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch["prompts"] == ["a", "b"] and batch["ids"] == ["1", "2"] and batch["labels"] == [None, "positive"]


def test_datamodule_sizes_splits_and_determinism(tok_dir):
    dm = _dm(tok_dir)
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (40, 8, 16)
    ids = {name: [it["id"] for it in getattr(dm, f"{name}_set").items] for name in ("train", "val", "test")}
    assert not set(ids["train"]) & set(ids["val"]) and not set(ids["test"]) & (set(ids["train"]) | set(ids["val"]))
    # test = the first prompts of the evaluation split, in order.
    assert ids["test"] == [e["id"] for e in ds.drug_reviews("test")[:16]]
    again = _dm(tok_dir)
    assert [it["prompt"] for it in again.train_set.items] == [it["prompt"] for it in dm.train_set.items]
    other = _dm(tok_dir, seed=1)
    assert [it["id"] for it in other.train_set.items] != ids["train"]
    assert [it["id"] for it in other.test_set.items] == ids["test"]
    b1 = [b["ids"] for b in dm.train_dataloader()]
    assert b1 == [b["ids"] for b in again.train_dataloader()] and len(b1) == 10


def test_datamodule_batches_left_padded_with_prefix(tok_dir, tok):
    dm = _dm(tok_dir)
    batch = next(iter(dm.val_dataloader()))
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape == mask.shape and ids.shape[0] == 8 and ids.dtype == torch.long
    assert (mask[:, -1] == 1).all() and (ids[mask == 0] == tok.pad_token_id).all()
    assert (mask.diff(dim=1) >= 0).all()  # zeros then ones: padding only on the left
    for i in range(8):
        assert tok.decode(ids[i][mask[i].bool()]) == batch["prompts"][i]
        n = sample_prefix_length(batch["ids"][i], 0)
        assert 2 <= n <= 7
        assert batch["prefixes"][i] == reference_prefix(batch["references"][i], tok, n) != ""
        assert batch["prompts"][i] == alpaca_prompt(batch["instructions"][i]) + batch["prefixes"][i]
        assert batch["references"][i].startswith(batch["prefixes"][i])
    assert set(batch["labels"]) <= {"positive", "negative", "neutral"}


def test_datamodule_chat_no_prefix_and_max_tokens(tok_dir):
    dm = _dm(tok_dir, template="chat", prefix_tokens=(0, 0), num_train=4, num_val=0, num_test=4)
    item = dm.test_set.items[0]
    assert item["prompt"] == ("<|im_start|>user\nWrite a short review of the drug Generess Fe for Birth Control."
                              "<|im_end|>\n<|im_start|>assistant\n") and item["prefix"] == ""
    with pytest.warns(UserWarning, match="test prompts available, 1000 requested"):
        short = _dm(tok_dir, max_prompt_tokens=40, num_train=None, num_val=0, num_test=1000)
    assert all(len(it["input_ids"]) <= 40 for it in short.test_set.items + short.train_set.items)
    assert 0 < len(short.test_set) < 349


def test_datamodule_local_single_pool(tmp_path, tok_dir):
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(json.dumps({"instruction": f"Task {i}.", "reference": f"Answer number {i} is here."})
                              for i in range(20)))
    dm = _dm(tok_dir, source=str(path), num_train=None, num_val=3, num_test=5)
    assert [it["id"] for it in dm.test_set.items] == [f"prompts-{i}" for i in range(5)]
    assert (len(dm.val_set), len(dm.train_set)) == (3, 12)


def test_datamodule_typed_init_for_lightning_cli(tok_dir):
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(PromptDataModule, "data")
    cfg = parser.parse_args(["--data.tokenizer", tok_dir, "--data.prefix_tokens", "[0, 0]", "--data.num_test", "5"])
    dm = PromptDataModule(**cfg.data.as_dict())
    assert dm.prefix_tokens == (0, 0) and dm.num_test == 5 and dm.source == "drug_reviews"
