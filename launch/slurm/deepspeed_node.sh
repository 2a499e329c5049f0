#!/bin/bash
# One node's share of launch/slurm/train_deepspeed.sbatch (srun runs it once per node): the
# deepspeed launcher in its no-ssh mode starts this node's processes, numbered after those of
# the nodes before it in $HOSTFILE. Needs HOSTFILE, MASTER_ADDR, MASTER_PORT (exported by the
# sbatch script) and SLURM_NODEID (set by srun). Arguments go to launch/train.py.
# SGFM_DRY_RUN=1 prints the command instead of running it.
set -euo pipefail

cmd=(deepspeed --hostfile "${HOSTFILE:?}" --no_ssh --node_rank "${SLURM_NODEID:?not an srun task}"
     --master_addr "${MASTER_ADDR:?}" --master_port "${MASTER_PORT:?}" launch/train.py --resume "$@")
if [[ -n "${SGFM_DRY_RUN:-}" ]]; then
    printf '%q ' "${cmd[@]}" | sed 's/ $//'
    echo
    exit 0
fi
# a host that does not resolve would only show as a rendezvous timeout: say which one, now
python launch/slurm/make_hostfile.py --check "$HOSTFILE" >/dev/null
exec "${cmd[@]}"
