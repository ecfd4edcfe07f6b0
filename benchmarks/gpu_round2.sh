#!/bin/bash
# One device call: install, GPU diagnosis + tests (timeouts), per-kernel profiles. Logs under $OUT.
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
python3 -m pip install --no-deps --no-build-isolation -e . -q > $OUT/pip.log 2>&1 || { cat $OUT/pip.log; exit 1; }
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,utilization.gpu --format=csv
python3 -c "import torch, triton; print(torch.__version__, triton.__version__)"
# probe: compile time of the old exact-at-limit shape (fp32, N=200, 256 padded clusters), in the background
( s=$(date +%s); timeout ${C256_T:-200} python3 -c "
import torch; from muse_compile.kernels.triton_muse import muse_attention as m
q=torch.randn(1,2,200,64,device='cuda'); o,_=m(q,q,q,clusters=256,block_size=64); torch.cuda.synchronize(); print('ok')
"; echo "c256 rc=$? after $(( $(date +%s) - s )) s" ) > $OUT/c256.log 2>&1 &
P=$!
rm -f $OUT/pip.log
if [ -z "$SKIP_CHECK" ]; then
echo "== check acausal fp32"; timeout 120 python3 benchmarks/gpu_check.py 2>&1 | tee $OUT/check.log
echo "== check causal fp32"; timeout 90 python3 benchmarks/gpu_check.py --causal 2>&1 | tee -a $OUT/check.log
fi
echo "== pytest"; s=$(date +%s)
timeout ${PYT_T:-200} python3 -m pytest -q tests/test_triton_gpu.py --durations=0 -p no:cacheprovider 2>&1 | tee $OUT/pytest.log | tail -25
echo "pytest rc=${PIPESTATUS[0]} wall $(( $(date +%s) - s )) s"
for a in "$@"; do echo "== $a"; timeout 240 bash -c "$a" 2>&1 | tee -a $OUT/bench.log; done
wait $P; cat $OUT/c256.log; rm -f $OUT/*/attention.png
