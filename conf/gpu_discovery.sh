#!/usr/bin/env bash
# Spark GPU discovery script: prints {"name": "gpu", "addresses": [...]} for the GPUs nvidia-smi sees.
# LLMFEAT_FAKE_GPUS=N reports N addresses without a GPU (used by the local standalone-cluster test).
if [ -n "${LLMFEAT_FAKE_GPUS:-}" ]; then
  addrs=$(seq -s '","' 0 $((LLMFEAT_FAKE_GPUS - 1)))
else
  addrs=$(nvidia-smi --query-gpu=index --format=csv,noheader 2>/dev/null | paste -sd, - | sed 's/,/","/g')
fi
if [ -z "$addrs" ]; then echo '{"name": "gpu", "addresses": []}'; else echo "{\"name\": \"gpu\", \"addresses\": [\"$addrs\"]}"; fi
