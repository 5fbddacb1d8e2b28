"""Compile every kernel to a CUDA binary without a GPU: `python -m kernels.compile_check [--arch 80 90]`.

The interpreter runs kernels as Python and forgives what the GPU compiler rejects (types, scalar/vector mixes,
register blow-ups at real widths), so CI also builds the kernels ahead of time with triton's bundled ptxas, at the
block sizes Wan 1.3B and 14B use, and reports registers and stack (spills) per kernel from the bundled cuobjdump.
Must run without TRITON_INTERPRET (it needs the compiled @triton.jit objects).
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass



def _specs(x: str):
    """(module, kernel name, {arg: triton type}, {constexpr: value}) for activations of triton type x."""
    f = "*fp32"
    ln_fwd = dict(x_ptr=f"*{x}", shift_ptr=f, scale_ptr=f, out_ptr=f, mean_ptr=f, rstd_ptr=f, num_tokens="i32",
                  D="i32", shift_stride="i32", scale_stride="i32", eps="fp32")
    ln_bwd = dict(dy_ptr=f, x_ptr=f"*{x}", scale_ptr=f, mean_ptr=f, rstd_ptr=f, dx_ptr=f"*{x}", dshift_part_ptr=f,
                  dscale_part_ptr=f, num_tokens="i32", D="i32", scale_stride="i32")
    rms_fwd = dict(x_ptr=f"*{x}", w_ptr=f, out_ptr=f, rstd_ptr=f, D="i32", eps="fp32")
    rms_bwd = dict(dy_ptr=f, x_ptr=f"*{x}", w_ptr=f, rstd_ptr=f, dx_ptr=f"*{x}", dw_part_ptr=f, num_rows="i32", D="i32")
    rope = dict(x_ptr=f"*{x}", cos_ptr=f, sin_ptr=f, out_ptr=f, num_tokens="i32", pairs_per_token="i32", half_d="i32")
    for block in (2048, 8192):  # Wan 1.3B (D = 1536) and 14B (D = 5120)
        yield "layer_norm_modulate", "_forward_kernel", ln_fwd, dict(BLOCK_D=block)
        yield "layer_norm_modulate", "_backward_kernel", ln_bwd, dict(ROWS=32, BLOCK_D=block)
        yield "rms_norm", "_forward_kernel", rms_fwd, dict(BLOCK_D=block)
        yield "rms_norm", "_backward_kernel", rms_bwd, dict(ROWS=32, BLOCK_D=block)
    for block in (1024, 4096):  # pairs per token: 12 x 64 and 40 x 64
        yield "rope", "_rotate_pairs", rope, dict(SIGN=1.0, BLOCK=block)


@dataclass
class Built:
    arch: int
    dtype: str
    kernel: str
    block: int
    cubin_bytes: int
    registers: int | None  # per thread; None when cuobjdump is unavailable
    stack_bytes: int | None  # register spills land here


def _resource_usage(cubin: bytes) -> tuple[int | None, int | None]:
    """(registers, stack bytes) from triton's bundled cuobjdump, (None, None) where it is missing."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return None, None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    regs, stack = re.search(r"REG:(\d+)", text), re.search(r"STACK:(\d+)", text)
    return (int(regs.group(1)) if regs else None), (int(stack.group(1)) if stack else None)


def compile_all(archs: tuple[int, ...] = (80, 90)) -> list[Built]:
    """Compile each kernel for each arch and activation dtype (fp32, bf16)."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("kernels.compile_check needs compiled kernels: unset TRITON_INTERPRET")
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from ._launch import num_warps_for

    built = []
    for arch in archs:
        target = GPUTarget("cuda", arch, 32)
        for x in ("fp32", "bf16"):
            for module, name, args, constexprs in _specs(x):
                fn = getattr(importlib.import_module(f"kernels.{module}"), name)
                signature = {**args, **{c: "constexpr" for c in constexprs}}
                if list(signature) != list(fn.arg_names):
                    raise RuntimeError(f"kernels.{module}.{name} takes {fn.arg_names}; update compile_check's spec")
                block = constexprs.get("BLOCK_D", constexprs.get("BLOCK"))
                src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
                cubin = triton.compile(src, target=target, options={"num_warps": num_warps_for(block)}).asm["cubin"]
                built.append(Built(arch, x, f"{module}.{name}", block, len(cubin), *_resource_usage(cubin)))
    return built


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="CUDA compute capabilities, e.g. 80 90")
    args = parser.parse_args(argv)
    print("| arch | dtype | kernel | block | cubin bytes | registers | stack bytes |")
    print("|---|---|---|---|---|---|---|")
    for b in compile_all(tuple(args.arch)):
        print(f"| sm_{b.arch} | {b.dtype} | {b.kernel} | {b.block} | {b.cubin_bytes} | {b.registers} | {b.stack_bytes} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
