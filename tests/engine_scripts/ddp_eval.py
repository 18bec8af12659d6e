"""torchrun entry point: ``torchrun --nproc_per_node 2 ddp_eval.py OUT`` evaluates the toy
model (retrieval, MC, QA, classification, probe) with the work split over the ranks; each rank
writes OUT/rank{r}.json."""

import sys

from toy_setup import run_toy_eval  # this script's folder is on sys.path

if __name__ == "__main__":
    run_toy_eval(sys.argv[1])
