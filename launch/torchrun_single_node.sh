#!/usr/bin/env bash
# One machine, N ranks: every GPU, or 2 CPU ranks (gloo) when there is no GPU.
#
#   launch/torchrun_single_node.sh labs/02_data_parallel.py --steps 20
#   NPROC=4 launch/torchrun_single_node.sh labs/05_3d_parallel.py --dp 2 --pp 2
#   MAX_RESTARTS=1 launch/torchrun_single_node.sh labs/10_reliability.py --crash-once
#
# Env: NPROC (default: GPU count, else 2), PYTHON (default: python3), MAX_RESTARTS (default 0).
# --standalone picks a free port and runs the rendezvous in-process, so nothing else to set.
set -euo pipefail
LAB=${1:?usage: $0 labs/NN_name.py [lab arguments...]}
shift
PYTHON=${PYTHON:-python3}
if [[ -z "${NPROC:-}" ]]; then
  NPROC=$("$PYTHON" -c "import torch; print(torch.cuda.device_count() or 2)")
fi
MAX_RESTARTS=${MAX_RESTARTS:-0}
if [[ "$MAX_RESTARTS" -gt 0 ]]; then
  # Restarted workers must not reuse the agent's rendezvous TCPStore (known torch issue:
  # the second round's workers can fail to connect or read stale keys).
  export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
fi
exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" \
  --max-restarts="$MAX_RESTARTS" "$LAB" "$@"
