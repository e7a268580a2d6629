#!/usr/bin/env bash
# The paper's captioning experiment (Fig. 4): SCST experts of a COCO-finetuned CoCa on BLEU-1 and ROUGE-L,
# full-weight soups over 11 lambdas (beam 5, every metric), and MORL at mu = 0.5.
#
# Needs: COCO 2014 images and Karpathy's dataset_coco.json under $COCO (train2014/, val2014/), the open_clip
# weights coca_ViT-L-14 "mscoco_finetuned_laion2b_s13b_b90k" (downloaded from the hub on first use), Java for
# METEOR, and GPUs: the paper spent ~1500 V100-hours on all its captioning runs; one SCST run here is 6 epochs
# over 113k images at batch 18 x 2: plan on roughly a day on one A100. Add --trainer.devices=N for DDP.
set -euo pipefail
COCO=${COCO:?set COCO to the folder holding train2014/, val2014/ and dataset_coco.json}
OUT=runs/captioning/coco   # where the coco_* configs export: experts/<reward>.safetensors, morl/
for cfg in coco_scst_bleu1 coco_scst_rouge_l coco_scst_morl_bleu1_rouge_l; do
  rs fit --config configs/captioning/$cfg.yaml --data.init_args.root "$COCO" "$@"
done
cat > "$OUT/front.yaml" <<YAML
front:
  experts: [{path: $OUT/experts/bleu1.safetensors, name: bleu1}, {path: $OUT/experts/rouge_l.safetensors, name: rouge_l}]
  morl: [{path: $OUT/morl/bleu1_rouge_l_mu0.5.safetensors, mu: [0.5, 0.5], name: morl_0.5}]
  grid: {kind: sweep, points: 11}
  out_dir: $OUT/front
  summary: {rewards: [bleu1, rouge_l]}
YAML
rs front --config configs/captioning/coco_scst_bleu1.yaml --config "$OUT/front.yaml" --data.init_args.root "$COCO"
echo "front: $OUT/front/front.png, $OUT/front/summary.json"
