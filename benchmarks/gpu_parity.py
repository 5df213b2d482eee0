"""Parity of our encoder with transformers on a GPU (or any device), for the device check script.

    python benchmarks/gpu_parity.py --device cuda [--layers 27] [--batch 8] [--json out.json]

Builds a random-weight so400m-384 tower with transformers (``save_pretrained`` to a temporary folder),
loads it with ``SiglipVisionTransformer.from_pretrained`` in fp32 and bf16 on the device, and reports
the max abs difference against transformers' eager fp32 outputs on the same device (TF32 off), next to
transformers' own bf16 error. It also checks that a CPU input is refused with a ValueError on a GPU
model. Exit status 1 if fp32 differs by more than 5e-4 or our bf16 error exceeds 1.5x transformers'
bf16 error + 1e-2 (the same bounds as the CPU tests).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--layers", type=int, default=27)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    from transformers import SiglipVisionConfig, SiglipVisionModel

    from tp_siglip import SiglipVisionTransformer

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device = torch.device(args.device)
    config = SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=args.layers,
                                num_attention_heads=16, image_size=384, patch_size=14)
    torch.manual_seed(0)
    reference = SiglipVisionModel(config).eval()
    with torch.no_grad():  # perturb so no tensor is a constant
        for param in reference.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    pixels = torch.randn(args.batch, 3, 384, 384, generator=torch.Generator().manual_seed(1)).to(device)
    report: dict[str, object] = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                                 "layers": args.layers, "batch": args.batch}
    with tempfile.TemporaryDirectory() as tmp:
        reference.save_pretrained(tmp)
        theirs = SiglipVisionModel.from_pretrained(tmp, attn_implementation="eager").to(device).eval()
        with torch.inference_mode():
            fp32 = theirs(pixels)
            theirs_bf16 = theirs.to(torch.bfloat16)(pixels.to(torch.bfloat16))
        del theirs
        results = {}
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            ours = SiglipVisionTransformer.from_pretrained(tmp, dtype=dtype, device=device)
            with torch.inference_mode():
                out = ours(pixels.to(dtype))
            results[name] = max(
                (out.last_hidden_state.float() - fp32.last_hidden_state).abs().max().item(),
                (out.pooler_output.float() - fp32.pooler_output).abs().max().item(),
            )
            if device.type == "cuda":
                try:
                    ours(pixels.cpu().to(dtype))
                    results["cpu_input_refused"] = False
                except ValueError:
                    results["cpu_input_refused"] = True
            del ours
    transformers_bf16 = max(
        (theirs_bf16.last_hidden_state.float() - fp32.last_hidden_state).abs().max().item(),
        (theirs_bf16.pooler_output.float() - fp32.pooler_output).abs().max().item(),
    )
    report.update(ours_fp32_max_diff=results["fp32"], ours_bf16_max_diff=results["bf16"],
                  transformers_bf16_max_diff=transformers_bf16,
                  cpu_input_refused=results.get("cpu_input_refused"))
    ok = results["fp32"] <= 5e-4 and results["bf16"] <= 1.5 * transformers_bf16 + 1e-2
    ok = ok and results.get("cpu_input_refused", True)
    report["ok"] = ok
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
