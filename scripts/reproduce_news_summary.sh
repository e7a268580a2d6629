#!/usr/bin/env bash
# The paper's main text experiment (Fig. 1b / 2a): Reuters news summaries, LLaMA-7B + Alpaca-LoRA, PPO on two
# reward models (R1 Tristan/gpt2_reward_summarization, R2 CogComp/bart-faithful-summary-detector), the LoRA soup
# front over 11 lambdas, and MORL at mu = 0.5 (the paper swept mu = 0, 0.1, ..., 1: add runs to compare).
#
# Needs: NVIDIA GPU(s) with >= 40 GB in bf16 (the paper: one RTX A6000 48 GB, ~4000 GPU-hours for all its LLaMA
# runs; one expert here is 2 passes over ~20k prompts at batch 128: plan on the order of a GPU-day per run on an
# A100); the Hugging Face hub (huggyllama/llama-7b, tloen/alpaca-lora-7b, argilla/news-summary and both reward
# models), and `pip install datasets`. Multi-GPU: add --trainer.devices=N --data.batch_size=$((128 / N)).
set -euo pipefail
OUT=${OUT:-runs/text/news_summary}
CFG=configs/text/news_summary.yaml
rs fit --config $CFG --model.reward_weights=[1,0] --trainer.default_root_dir=$OUT/summary "$@"
rs fit --config $CFG --model.reward_weights=[0,1] --trainer.default_root_dir=$OUT/faithful "$@"
rs fit --config $CFG --model.reward_weights=[0.5,0.5] --trainer.default_root_dir=$OUT/morl_0.5 "$@"
cat > "$OUT/front.yaml" <<YAML
front:
  experts: [{path: $OUT/summary/expert, name: summary}, {path: $OUT/faithful/expert, name: faithful}]
  morl: [{path: $OUT/morl_0.5/expert, mu: [0.5, 0.5], name: morl_0.5}]
  grid: {kind: sweep, points: 11}
  out_dir: $OUT/front
YAML
# The sweep re-uses the training config's model and data (evaluation: first 200 prompts, greedy, 32 tokens).
rs front --config $CFG --config "$OUT/front.yaml"
echo "front: $OUT/front/front.png, $OUT/front/summary.json"
