"""Do the CPU's convolution rewrites cost anything on TPUs and GPUs? Compiled numbers, per variant.

``flaxnets.conv`` traces unpadded 1x1 convolutions as matrix products (3x faster on XLA:CPU). This
compiles a model's bf16 training step for TPU v5e and H100 with that rewrite on and off (plain
``lax.conv_general_dilated``) and prints per-chip peak memory, FLOPs and the HLO's top-level copies
and transposes for each, so the rewrite is kept only where it costs nothing. Needs the ``[plan]``
extra; each compile runs in a child process.

    python benchmarks/plan_conv_paths.py [--model resnet50] [--per-chip 128]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

RESULTS = os.path.join(os.path.dirname(__file__), "results", "plan_conv_paths.json")
VARIANTS = {"matmul_1x1": True, "conv_1x1": False}


def _child(variant: str) -> None:
    import flaxnets.conv
    from train.plan_compile import RESULT_PREFIX, compile_request

    request = json.loads(sys.stdin.read())
    platform = "tpu" if ":" in request["target"] else "gpu"
    keep = VARIANTS[variant]
    flaxnets.conv.MATMUL_1X1_PLATFORMS = frozenset({"cpu", platform} if keep else {"cpu"})
    print(RESULT_PREFIX + json.dumps(compile_request(request)), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--per-chip", type=int, default=128)
    parser.add_argument("--targets", nargs="+", default=["v5e:2x2", "h100x8"])
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return _child(args.child)
    from train.plan import compile_request_for, run_shape
    from train.plan_compile import RESULT_PREFIX
    from train.recipes import recipe_for_model
    from train.targets import GiB, parse_target

    recipe = recipe_for_model(args.model)
    shape = run_shape(recipe, precision="bf16")
    results = json.load(open(RESULTS)) if os.path.exists(RESULTS) else {}
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3"}
    for target_name in args.targets:
        for variant in VARIANTS:
            key = f"{args.model}/{target_name}/{args.per_chip}/{variant}"
            if key not in results:
                request = compile_request_for(parse_target(target_name), recipe, shape, args.per_chip)
                done = subprocess.run([sys.executable, __file__, "--child", variant], input=json.dumps(request),
                                      text=True, capture_output=True, env=env)
                line = next((l for l in done.stdout.splitlines() if l.startswith(RESULT_PREFIX)), None)
                if line is None:
                    print(f"{key}: failed: {done.stderr.strip().splitlines()[-1:]}")
                    continue
                results[key] = json.loads(line[len(RESULT_PREFIX):])
                os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
                with open(RESULTS, "w") as f:
                    json.dump(results, f, indent=2)
            r = results[key]
            hlo = r["hlo"]
            print(f"{key:45s} peak {r['memory']['peak'] / GiB:6.2f} GiB  temp {r['memory']['temp'] / GiB:6.2f} GiB  "
                  f"{r['flops_per_step'] / args.per_chip / 1e9:6.2f} GFLOP/img  copies {hlo['copies']:4d} "
                  f"({hlo['copy_bytes'] / 2**20:7.1f} MiB)  transposes {hlo['transposes']:3d} "
                  f"({hlo['transpose_bytes'] / 2**20:7.1f} MiB)  kernels {hlo['kernels']:5d}  "
                  f"compile {r['compile_seconds']:.0f} s")


if __name__ == "__main__":
    main()
