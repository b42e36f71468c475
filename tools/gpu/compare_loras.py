#!/usr/bin/env python3
"""How far each run's final LoRA is from a base run's: max |Δ| over all parameters, against the largest
parameter. Runs are train_naruto output folders /tmp/run-NAME holding one checkpoint-*/lora_parameters.safetensors.

    python3 tools/gpu/compare_loras.py BASE NAME [NAME ...] [--label TEXT]
"""
import argparse
import glob

from safetensors.torch import load_file


def params(name):
    files = glob.glob(f"/tmp/run-{name}/checkpoint-*/lora_parameters.safetensors")
    return load_file(files[0]) if files else None


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("base")
    parser.add_argument("names", nargs="+")
    parser.add_argument("--label", default="final LoRA", help="what the lines start with")
    args = parser.parse_args()
    base = params(args.base)
    for name in args.names:
        other = params(name)
        if base is None or other is None:
            print(f"{args.label}, {name} vs {args.base}: missing")
            continue
        diff = max((other[k].float() - base[k].float()).abs().max().item() for k in base)
        scale = max(base[k].float().abs().max().item() for k in base)
        same = all(other[k].equal(base[k]) for k in base)
        print(f"{args.label}, {name} vs {args.base}: bit-identical {same}, max abs diff {diff:.3e} (max |param| {scale:.3e})")


if __name__ == "__main__":
    main()
