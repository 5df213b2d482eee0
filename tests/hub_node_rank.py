"""One rank of the two-node test in test_hub.py: under torchrun, load a Hub repo id and encode.

Usage: torchrun ... hub_node_rank.py REPO_ID INPUTS.safetensors OUT_DIR
The node's HF_ENDPOINT / HF_HUB_CACHE / HF_TOKEN come from the environment. Writes
OUT_DIR/rank{RANK}.safetensors (outputs) and OUT_DIR/rank{RANK}.json (ranks, device, checkpoint directory).
"""

import json
import os
import sys

import torch
from safetensors.torch import load_file, save_file


def main() -> None:
    from tp_siglip import SiglipVisionTransformer
    from tp_siglip.loader import resolve_device

    torch.set_num_threads(1)
    repo_id, inputs, out_dir = sys.argv[1:4]
    rank = int(os.environ["RANK"])
    model = SiglipVisionTransformer.from_pretrained(repo_id, world_size=int(os.environ["WORLD_SIZE"]))
    with torch.inference_mode():
        out = model(load_file(inputs)["pixels"])
    save_file({"last_hidden_state": out.last_hidden_state.contiguous()}, os.path.join(out_dir, f"rank{rank}.safetensors"))
    facts = {
        "rank": rank,
        "local_rank": int(os.environ["LOCAL_RANK"]),
        "group_node": int(os.environ["GROUP_RANK"]),
        "resolved_device": str(resolve_device(None)),
        "param_device": str(next(model.parameters()).device),
    }
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
        json.dump(facts, fh)


if __name__ == "__main__":
    main()
