"""torchrun entry point: ``torchrun --nproc_per_node 2 ddp_toy.py OUT`` trains the toy model
under DDP (gloo) and writes OUT/result.json from rank 0."""

import sys

from toy_setup import run_ddp_toy  # this script's folder is on sys.path

if __name__ == "__main__":
    run_ddp_toy(sys.argv[1])
