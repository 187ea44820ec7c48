#!/usr/bin/env bash
# The GPU measurements of README.md ("What is measured"), in stages (each fits a 10-minute slot):
#   bash benchmarks/gpu.sh env        # the card, the versions
#   bash benchmarks/gpu.sh profile    # where the bf16 step's time goes (+ optimised HLO)
#   bash benchmarks/gpu.sh headline   # cifar10_ddpm b128 bf16, ours and diffusers+torch.compile
#   bash benchmarks/gpu.sh levers     # each lever alone (fp32, attention, prng, dispatch, remat..)
#   bash benchmarks/gpu.sh collect    # the lever runs' JSON as one file
# Results go to $OUT (or benchmarks/results). Packages missing on the machine can sit as
# wheels in .whl/ (installed to /tmp/site first).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
OUT=${OUT:-benchmarks/results}
PY=${PY:-python3}
if ls .whl/*.whl >/dev/null 2>&1 && [ ! -d /tmp/site ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
fi
[ -d /tmp/site ] && export PYTHONPATH=/tmp/site
CFG=configs/cifar10_ddpm.py
RUN="$PY benchmarks/run.py --config=$CFG --batch_size=128 --out=$OUT"

for stage in "$@"; do
  echo "=== $stage"
  case $stage in
    env)
      nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,power.limit --format=csv
      $PY -c "import jax, flax, optax, torch, diffusers; print('jax', jax.__version__, 'flax', \
flax.__version__, 'optax', optax.__version__, 'torch', torch.__version__, 'diffusers', \
diffusers.__version__, jax.devices())" 2>&1 | tail -1 ;;
    profile)
      timeout 170 $PY benchmarks/profile_step.py --config=$CFG --batch_size=128 --precision=bf16 \
        --hlo_out="$OUT" 2>&1 | grep -v "^[IW][0-9]" | tail -60 ;;
    headline)
      timeout 420 $RUN --precision=bf16 --full_sample_batch=1024 2>&1 | grep -v "^[IW][0-9]" \
        | tail -25 ;;
    levers)  # each lever alone against the headline's bf16 default, most telling first;
      # each run compiles its own step (~70 s on an H100), so a 10-minute slot holds ~5
      C10="--config=$CFG --batch_size=128 --precision=bf16 --nosample"
      C256="--config=configs/celebahq256_ddpm.py --batch_size=64 --precision=bf16 --nosample"
      LEVERS=(${LEVERS:-"$C10 --precision=fp32 --tag=fp32" "$C10 --prng=rbg --tag=prng_rbg"
        "$C10 --attention=cudnn --tag=attn_cudnn" "$C10 --nofast_group_norm --tag=flax_groupnorm"
        "$C10 --steps_per_dispatch=4 --tag=dispatch4" "$C10 --batch_size=256 --tag=b256"
        "$C10 --nodonate --tag=nodonate" "$C256 --tag=noremat_256" "$C256 --remat --tag=remat_256"})
      for args in "${LEVERS[@]}"; do
        timeout 110 $PY benchmarks/run.py $args --nopeer --train_steps=20 --out=/tmp/levers 2>&1 \
          | grep -E "^RESULT|Error|error:" | tail -3
        bash "$0" collect > /dev/null
      done ;;
    collect)  # the lever runs' JSON, one file
      $PY -c "import glob, json; json.dump([json.load(open(p)) for p in sorted(glob.glob(
'/tmp/levers/*.json'))], open('$OUT/levers.json', 'w'), indent=1)" ;;
  esac
done
