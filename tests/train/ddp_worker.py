"""Run by test_distributed.py under `torchrun --nproc_per_node 2`: trains the tiny Llama with
peftkit.train and writes each process's final trainable weights to OUT/rank{r}.safetensors."""

import json
import os
import sys
from pathlib import Path

from _tiny_train import lm_rows, tiny_llama, trainable
from safetensors.torch import save_file

from peftkit.train import TrainConfig, train

out = Path(sys.argv[1])
config = TrainConfig(**json.loads(sys.argv[2]))
model = tiny_llama()
result = train(model, lm_rows(13, seed=11), lm_rows(5, seed=12), config)
rank = os.environ["RANK"]
save_file({k: v.contiguous() for k, v in trainable(model).items()}, str(out / f"rank{rank}.safetensors"))
if rank == "0":
    (out / "result.json").write_text(json.dumps({"summary": result.summary, "eval": result.eval_metrics}))
