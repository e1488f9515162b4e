# Sourced by the GPU-host scripts: the unpacked wheels on the path, the project from src, where things live.
export PYTHONPATH=$PWD/src:/tmp/site:/tmp/site2:/tmp/site3 LD_LIBRARY_PATH=/tmp/site2/z3/lib:${LD_LIBRARY_PATH:-}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=true PYTHONUNBUFFERED=1
# Triton's compiled kernels and autotuning results on disk: a fresh host spends ~3 min tuning fla's kernels for
# SmolLM2's shapes; queue.sh saves the cache to $OUT/triton.tar.xz and pack.sh carries it to the next session
export TRITON_CACHE_DIR=/tmp/triton-cache TRITON_CACHE_AUTOTUNING=1
G=/tmp/smollm2.gguf C=/tmp/corpus R=/tmp/runs J=/tmp/jobs
mkdir -p $C $R $J
