#!/usr/bin/env bash
# Several machines, c10d rendezvous. Run the SAME command on every node (node 0 first or not:
# the agents wait for each other up to the rendezvous timeout).
#
#   node 0:  NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 launch/torchrun_multi_node.sh labs/05_3d_parallel.py --dp 4 --tp 2 --pp 2
#   node 1:  NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 launch/torchrun_multi_node.sh labs/05_3d_parallel.py --dp 4 --tp 2 --pp 2
#
# Env:
#   NNODES          number of machines (required)
#   NODE_RANK       this machine's index, 0..NNODES-1 (logged; with c10d the rendezvous
#                   assigns ranks, so global rank order follows join order, not NODE_RANK)
#   MASTER_ADDR     address of the rendezvous host, reachable from every node (required)
#   PORT            rendezvous port on MASTER_ADDR (default 29500; open it in the firewall)
#   NPROC_PER_NODE  ranks per machine (default: GPU count, else 1)
#   RDZV_ID         job id shared by all nodes (default: journey-$PORT; use $SLURM_JOB_ID)
#   MAX_RESTARTS    restarts of the whole job after a failure (default 0)
#   PYTHON          interpreter (default python3)
# Which network interface: GLOO_SOCKET_IFNAME=eth0 / NCCL_SOCKET_IFNAME=eth0 if the default
# route is not the fast or the reachable one.
# Tested on one machine with two agents on loopback: tests/test_torchrun.py (MASTER_ADDR=127.0.0.1).
set -euo pipefail
LAB=${1:?usage: NNODES=.. NODE_RANK=.. MASTER_ADDR=.. $0 labs/NN_name.py [lab arguments...]}
shift
: "${NNODES:?set NNODES (number of machines)}"
: "${NODE_RANK:?set NODE_RANK (0..NNODES-1)}"
: "${MASTER_ADDR:?set MASTER_ADDR (the rendezvous host, reachable from every node)}"
PORT=${PORT:-29500}
PYTHON=${PYTHON:-python3}
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
  NPROC_PER_NODE=$("$PYTHON" -c "import torch; print(torch.cuda.device_count() or 1)")
fi
RDZV_ID=${RDZV_ID:-journey-$PORT}
MAX_RESTARTS=${MAX_RESTARTS:-0}
if [[ "$MAX_RESTARTS" -gt 0 ]]; then
  export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1  # see torchrun_single_node.sh
fi
echo "node $NODE_RANK/$NNODES: $NPROC_PER_NODE ranks, rendezvous $MASTER_ADDR:$PORT id $RDZV_ID" >&2
exec "$PYTHON" -m torch.distributed.run --nnodes="$NNODES" --node_rank="$NODE_RANK" \
  --nproc_per_node="$NPROC_PER_NODE" --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$PORT" \
  --rdzv_id="$RDZV_ID" --max-restarts="$MAX_RESTARTS" "$LAB" "$@"
