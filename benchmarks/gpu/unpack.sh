#!/usr/bin/env bash
# Unpack part N of benchmarks/gpu/pack.sh on the GPU host (see there); /tmp keeps it while the host stays up.
set -euo pipefail
source benchmarks/gpu/env.sh
parts=${PARTS:-.carry}
install() { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$1" "${@:2}"; }
case ${1:?usage: unpack.sh 1|2|3} in
  1) install /tmp/site2 .whl2/*.whl && cp $parts/c1/gguf.aa /tmp/ ;;
  2) install /tmp/site .whl/*.whl && cp $parts/c2/gguf.ab /tmp/ ;;
  3) cat /tmp/gguf.aa /tmp/gguf.ab $parts/c3/gguf.ac > $G
     install /tmp/site3 $parts/c3/gguf-*.whl
     for split in val holdout; do xz -dc $parts/c3/$split.jsonl.xz > $C/$split.jsonl; done
     cp $parts/c3/code.jsonl $C/
     ls -l $G $C; nvidia-smi --query-gpu=name,memory.used --format=csv,noheader
     python3 -c "import torch, fla; print('torch', torch.__version__, 'fla', fla.__version__)"
     python3 -c "from hybridize.ops.dispatch import fla_status; print('kernels:', fla_status())" ;;
  *) echo "unpack.sh: part 1, 2 or 3" >&2; exit 2 ;;
esac
