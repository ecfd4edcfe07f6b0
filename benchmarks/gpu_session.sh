#!/bin/bash
# One device call: install, per-kernel profiles with tuning variants, then the benchmark rows given as
# arguments (each a shell command, CAP s each, default 240). Triton's compile cache lives in .tcache (carry it to
# reuse it; it comes back under $OUT as tcache.tgz only when small enough for the device tool). Logs under $OUT.
export PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=$PWD/.tcache
OUT=${OUT:-/tmp/out}; mkdir -p $OUT $TRITON_CACHE_DIR
python3 -m pip install --no-deps --no-build-isolation -e . -q > $OUT/pip.log 2>&1 || { cat $OUT/pip.log; exit 1; }
rm -f $OUT/pip.log
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu --format=csv,noheader
python3 -c "import torch, triton; print(torch.__version__, triton.__version__)"; date -u
for a in "$@"; do echo "== $a"; s=$(date +%s); timeout ${CAP:-240} bash -c "$a" 2>&1 | tee -a $OUT/log.txt; echo "rc=${PIPESTATUS[0]} wall $(( $(date +%s) - s )) s"; done
tar czf $OUT/tcache.tgz .tcache; du -sh $OUT/tcache.tgz
