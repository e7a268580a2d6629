"""Rewards for rewarded-soups fine-tuning and evaluation.

Kept import-free on purpose: `import rs_lightning.rewards` must not pull in torch, torchmetrics or
pycocoevalcap. Import the submodule you need, e.g. `from rs_lightning.rewards import caption`
(`caption.score`, `caption.CiderD`, `caption.evaluate_corpus`, `caption.MeteorScorer`). The reward contract
shared by text and caption rewards is `base.RewardMetric`; `registry.build_reward` builds any of them by name.
"""
