#!/usr/bin/env bash
# CPU recipe: SmolLM2-135M-Instruct (shipped GGUF) -> megatron-core -> CPT on real financial text
# with 5% general replay -> per-dataset validation losses. ~20 steps; minutes on 2 cores.
#   examples/smollm2_135m_cpu.sh [more pretrain.py flags, e.g. --train-iters 50]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python}
export HF_HUB_OFFLINE=1
DATA=${SHARED_DATA:-../shared/data}
WORK=runs/smollm2-cpu
GGUF=$($PY -c "from megatron_cpt import assets; print(assets.smollm2_gguf())")
mkdir -p $WORK/shards

tok=(--tokenizer-type HuggingFaceTokenizer --tokenizer-model "$GGUF")
[[ -f $WORK/shards/domain_text_document.idx ]] || $PY tools/preprocess_data.py "${tok[@]}" \
    --input $DATA/domain/annual_reports.jsonl --append-eod --output-prefix $WORK/shards/domain
[[ -f $WORK/shards/sec_text_document.idx ]] || $PY tools/preprocess_data.py "${tok[@]}" \
    --input $DATA/domain/sec_agreements.jsonl --append-eod --output-prefix $WORK/shards/sec
[[ -f $WORK/shards/general_text_document.idx ]] || $PY tools/preprocess_data.py "${tok[@]}" \
    --input $DATA/general/wikitext2.jsonl --append-eod --output-prefix $WORK/shards/general
[[ -f $WORK/base-mcore/latest_checkpointed_iteration.txt ]] || $PY tools/convert_checkpoint.py \
    hf-to-mcore --hf "$GGUF" --out $WORK/base-mcore

exec $PY tools/pretrain.py --config examples/smollm2_135m_cpu.yaml --tokenizer-model "$GGUF" "$@"
