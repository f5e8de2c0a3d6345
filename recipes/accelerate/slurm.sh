#!/bin/bash
# One stage of a recipe on N nodes: sbatch --nodes=2 recipes/accelerate/slurm.sh RECIPE STAGE
# Every node runs the same accelerate command; Slurm provides the node rank and the main node's address.
#SBATCH --job-name=posttrain
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
set -euo pipefail
RECIPE=${1:?recipe}; STAGE=${2:?stage}
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
srun bash -c "accelerate launch --config_file recipes/accelerate/multinode.yaml \
  --num_machines $SLURM_NNODES --num_processes $((SLURM_NNODES * 8)) \
  --machine_rank \$SLURM_NODEID --main_process_ip $MASTER_ADDR \
  -m posttrain stage $STAGE $RECIPE"
