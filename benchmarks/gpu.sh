#!/usr/bin/env bash
# The GPU measurements of README.md ("What is measured"), in stages (each fits a 10-minute slot):
#   bash benchmarks/gpu.sh env        # the card, the versions
#   bash benchmarks/gpu.sh profile    # where the bf16 step's time goes (+ optimised HLO)
#   bash benchmarks/gpu.sh headline   # cifar10_ddpm b128 bf16, ours and diffusers+torch.compile
#   bash benchmarks/gpu.sh sampling   # the 1000-step sampler alone at SAMPLE_BATCH (2048) images
#   bash benchmarks/gpu.sh forward    # the sampler's network: upsample variants x batches, A/B
#   bash benchmarks/gpu.sh best_sampling  # the 1000-step sampler, forward's fastest variant
#   bash benchmarks/gpu.sh levers     # each lever alone (fp32, attention, prng, dispatch, remat..)
#   bash benchmarks/gpu.sh warm levers text_to_image  # the same, compiled side by side first
#                                     # (T2I_WARM=1: text_to_image's too), then timed one by one
#   bash benchmarks/gpu.sh collect    # the lever runs' JSON as one file
#   bash benchmarks/gpu.sh text_to_image  # SD 1.5's layout, random weights, ours vs diffusers
#   bash benchmarks/gpu.sh dit        # DiT-XL/2 on 32x32x4 latents, bf16, batch DIT_BATCH (64: both
#                                     # frameworks' states share the card),
#                                     # ours vs diffusers' DiTTransformer2DModel + torch.compile
# LEVERS="args;args;..." picks the lever runs (run.py arguments; leading VAR=value words are
# set in the run's environment, e.g. XLA_FLAGS=...); TAGS="a b" runs only those --tag=s.
# Results go to $OUT (or benchmarks/results).
# Packages missing on the machine can sit as wheels in .whl/ (installed to /tmp/site first);
# .whl/fallback/ holds the versions we test with, installed only if ours do not import.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
OUT=${OUT:-benchmarks/results}
PY=${PY:-python3}
install() { $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site "$@"; }
if ls .whl/*.whl >/dev/null 2>&1 && [ ! -d /tmp/site ]; then
  install .whl/*.whl || exit 1
  if ! PYTHONPATH=/tmp/site $PY -c "from diffusion_jax import train, sample" 2>/dev/null \
      && ls .whl/fallback/*.whl >/dev/null 2>&1; then
    echo "installing .whl/fallback/ (the machine's packages did not import diffusion_jax)"
    install .whl/fallback/*.whl || exit 1
  fi
fi
[ -d /tmp/site ] && export PYTHONPATH=/tmp/site
CFG=${CFG:-configs/cifar10_ddpm.py}
RUN="$PY benchmarks/run.py --config=$CFG --batch_size=128 --out=$OUT"
T2I=${T2I_ARGS:-"--layout=sd15 --batch=${T2I_BATCH:-8} --steps=50 --dtype=bfloat16"}
T2I="$T2I --pipeline_dir=/tmp/pipeline_$(md5sum <<< "$T2I" | cut -c1-8)"  # per layout
# JAX's persistent compilation cache: a step compiled once on this machine (`warm`) loads in
# seconds in a later run, whose JSON then names the cache ("compilation_cache")
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/jax_cache}
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0

C10="--config=$CFG --batch_size=128 --precision=bf16 --nosample"
# (the whole GPU: without the peer, JAX's pool is 75 % of it unless told)
C256="XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 --config=configs/celebahq256_ddpm.py --batch_size=64
  --precision=bf16 --nosample"
DEFAULT_LEVERS="$C10 --precision=fp32 --tag=fp32; $C10 --prng=rbg --tag=prng_rbg;
  $C10 --attention=cudnn --tag=attn_cudnn; $C10 --nofast_group_norm --tag=flax_groupnorm;
  XLA_FLAGS=--xla_gpu_experimental_enable_conv_fusion=true $C10 --tag=xla_conv_fusion;
  $C10 --steps_per_dispatch=4 --tag=dispatch4; $C10 --nodonate --tag=nodonate;
  $C10 --upsample_conv=subpixel --tag=subpixel;
  $C10 --gn_swish_vjp=on --tag=gn_swish_vjp; $C10 --tag=baseline;
  $C10 --batch_size=256 --tag=b256; $C256 --remat --tag=remat_256; $C256 --tag=noremat_256"

each_lever() {  # calls "$1 tag env VAR=value... $PY benchmarks/run.py args... --nopeer" for each
  # lever in LEVERS (TAGS)
  local list lever w tag envs args
  IFS=';' read -rd '' -a list <<< "${LEVERS:-$DEFAULT_LEVERS}"
  for lever in "${list[@]}"; do
    envs=(); args=()
    for w in $lever; do
      if [[ $w =~ ^[A-Z_]+= ]]; then envs+=("$w"); else args+=("$w"); fi
    done
    [ ${#args[@]} -eq 0 ] && continue
    tag=$(grep -o -- "--tag=[a-z0-9_]*" <<< "$lever" | cut -d= -f2)
    [[ -n "${TAGS:-}" && " $TAGS " != *" $tag "* ]] && continue
    "$1" "$tag" env "${envs[@]}" $PY benchmarks/run.py "${args[@]}" --nopeer
  done
}
time_lever() {  # 20 timed steps, after the compile (or the cache's load)
  local tag=$1; shift
  echo "--- ${*:2}"
  if [ -f "/tmp/levers/$tag.log" ] && [ ! -f "/tmp/levers/$tag.compiled" ]; then
    echo "skipped: its compile did not finish in the warm stage"; return
  fi
  timeout ${LEVER_TIMEOUT:-110} "$@" --train_steps=20 --out=/tmp/levers 2>&1 \
    | grep -E "^RESULT|Error|error:" | tail -3
  bash "$0" collect > /dev/null
}
compile_lever() {  # in the background: the train step compiled into the cache, nothing timed
  local tag=$1; shift
  rm -f "/tmp/levers/$tag.compiled"
  (if timeout ${WARM_TIMEOUT:-300} "$@" --compile_only --out=/tmp/levers \
      > "/tmp/levers/$tag.log" 2>&1; then
     touch "/tmp/levers/$tag.compiled"
   else
     echo "$tag: no compile within ${WARM_TIMEOUT:-300} s"
   fi
   grep -E "^COMPILED|Error|error:" "/tmp/levers/$tag.log" | tail -3) &
}

for stage in "$@"; do
  echo "=== $stage"
  case $stage in
    env)
      nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,power.limit --format=csv
      $PY -c "import jax, flax, optax, orbax.checkpoint as oc, torch; print('jax', jax.__version__, \
'flax', flax.__version__, 'optax', optax.__version__, 'orbax', oc.__version__, 'torch', \
torch.__version__, jax.devices())" 2>&1 | tail -1
      $PY -c "import diffusers; print('diffusers', diffusers.__version__)" 2>&1 | tail -1 ;;
    profile)
      timeout 170 $PY benchmarks/profile_step.py --config=$CFG --batch_size=128 --precision=bf16 \
        --hlo_out="$OUT" 2>&1 | grep -v "^[IW][0-9]" | tail -60 ;;
    headline)
      timeout 420 $RUN --precision=bf16 --full_sample_batch=1024 2>&1 | grep -v "^[IW][0-9]" \
        | tail -25 ;;
    sampling)  # the sample mode's compiled 1000-step sampler, no training compiled;
      # SAMPLE_ARGS adds run.py arguments, e.g. "--upsample_conv=subpixel --tag=sample_subpixel"
      N=${SAMPLE_BATCH:-2048}
      timeout 300 $PY benchmarks/run.py --config=$CFG --precision=bf16 --notrain --nosample \
        --nopeer --batch_size=$N --full_sample_batch=$N --tag=sample$N ${SAMPLE_ARGS:-} \
        --out=$OUT 2>&1 | grep -E "^RESULT|Error|error:" | tail -3 ;;
    forward)  # FORWARD_VARIANTS="upsample_conv:batch,..." (benchmarks/forward_ab.py)
      timeout 240 $PY benchmarks/forward_ab.py --config=$CFG --precision=bf16 --calls=5 \
        --variants=${FORWARD_VARIANTS:-resize:2048,subpixel:2048,resize:4096,subpixel:4096} \
        --rounds=4 --out=$OUT 2>&1 | grep -E "^RESULT|^BEST|Error|error:" | tee /tmp/forward.log ;;
    best_sampling)
      read -r U B < <(grep ^BEST /tmp/forward.log 2>/dev/null | cut -d' ' -f2-)
      if [ -z "${B:-}" ]; then echo "no BEST line in /tmp/forward.log: run the forward stage first"
      else
        SAMPLE_BATCH=$B SAMPLE_ARGS="--upsample_conv=$U --tag=sample${B}_$U" bash "$0" sampling
      fi ;;
    levers)  # each lever alone against the headline's bf16 default, most telling first;
      # each run compiles its own step (~70 s on an H100), so a 10-minute slot holds ~5
      # (after `warm` in the same command, each loads its step from the cache instead)
      each_lever time_lever ;;
    warm)  # the levers' train steps (LEVERS, TAGS) and text_to_image's pipelines (T2I_WARM=1)
      # compiled side by side into the compilation cache, nothing timed; the `levers` and
      # `text_to_image` stages after it then time one run at a time, loading what they need
      export XLA_PYTHON_CLIENT_PREALLOCATE=false  # several processes share the GPU
      mkdir -p /tmp/levers
      if [ "${T2I_WARM:-0}" = 1 ]; then
        (timeout ${WARM_TIMEOUT:-300} $PY benchmarks/text_to_image.py $T2I --calls=1 \
          --out=/tmp/t2i_warm 2>&1 | grep -E "^ours|Error|error:" | sed "s/^/warm t2i: /") &
      fi
      each_lever compile_lever
      wait
      unset XLA_PYTHON_CLIENT_PREALLOCATE ;;
    text_to_image)  # needs transformers beside diffusers (a wheel in .whl/ if absent)
      timeout ${T2I_TIMEOUT:-560} $PY benchmarks/text_to_image.py $T2I --out=$OUT 2>&1 | grep -E "^RESULT|^ours|^diffusers|Error" \
        | tail -5 ;;
    dit)  # configs/imagenet256_dit.py measured in latent space (no VAE needed); DDIM-10 to
      # keep the slot: 2 x 10 DiT-XL/2 steps per round and side
      timeout ${DIT_TIMEOUT:-560} $PY benchmarks/run.py --config=configs/imagenet256_dit.py \
        --batch_size=${DIT_BATCH:-64} --precision=bf16 --ddim_steps=10 --rounds=3 \
        ${DIT_ARGS:-} --out=$OUT 2>&1 | grep -E "^RESULT|^train|^ddim|^one_step|Error|error:" \
        | tail -8 ;;
    collect)  # the lever runs' JSON, one file
      $PY -c "import glob, json; json.dump([json.load(open(p)) for p in sorted(glob.glob(
'/tmp/levers/*.json'))], open('$OUT/levers.json', 'w'), indent=1)" ;;
  esac
done
