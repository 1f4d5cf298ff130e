"""Ahead-of-time compilation of every Triton kernel launch, for GPUs this machine does not have.

Triton compiles a kernel on its first launch, on the GPU host. The interpreter (``TRITON_INTERPRET=1``),
which the CPU tests run kernels under, executes kernel bodies as Python and never compiles them,
so an error that only the compiler sees (a non-constexpr global read in a kernel, shared memory
beyond the chip's, a construct a backend rejects) would first show on a GPU. ``triton.compile``
with a :class:`GPUTarget` goes through TTIR, TTGIR, LLVM IR and PTX to a cubin with no GPU present:
:func:`compile_launch` does that for one :class:`Launch`, and :func:`all_launches` lists every
launch the kernels' launchers can make, from lists kept beside each launcher (``launches()`` in
``triton_bag`` and ``triton_search``) and built with the same functions that choose a launch's
compile-time parameters. ``tests/test_aot.py`` compiles them all for sm_90 and sm_80.
"""

from __future__ import annotations

import contextlib
import io
import re
import sys
from dataclasses import dataclass, field, replace

import torch
import triton

# GPU targets: capability -> the most shared memory one block may use there (bytes; sm_90: H100/H200,
# 227 KiB; sm_80: A100, 163 KiB)
TARGETS = {90: 232448, 80: 166912}

_TRITON_TYPES = {
    torch.float32: "fp32",
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    torch.float64: "fp64",
    torch.int64: "i64",
    torch.int32: "i32",
}


@dataclass(frozen=True)
class Launch:
    """One compilation a launcher can ask for: ``kernel`` with ``pointers`` (pointer argument ->
    torch dtype; every other non-constexpr argument is an i32), ``constexprs`` and ``num_warps``."""

    kernel: triton.runtime.JITFunction
    pointers: dict
    constexprs: dict
    label: str
    num_warps: int = 4
    signature: dict = field(init=False, compare=False)

    def __post_init__(self):
        names = self.kernel.arg_names
        unknown = set(self.pointers) - set(names) or set(self.constexprs) - set(names)
        if unknown:
            raise ValueError(f"{self.kernel.__name__} has no argument {sorted(unknown)[0]!r}")
        signature = {}
        for name in names:
            if name in self.constexprs:
                signature[name] = "constexpr"
            elif name in self.pointers:
                signature[name] = "*" + _TRITON_TYPES[self.pointers[name]]
            else:
                signature[name] = "i32"
        object.__setattr__(self, "signature", signature)


def all_launches() -> list[Launch]:
    """Every distinct compilation that the launchers of this package's Triton kernels can ask for
    (two launches compiling the same thing, e.g. an fp32 forward and an fp32 table gradient,
    appear once, their labels joined)."""
    from . import triton_bag, triton_search

    unique: dict = {}
    for launch in triton_bag.launches() + triton_search.launches():
        constexprs = repr(sorted(launch.constexprs.items()))
        key = (launch.kernel, tuple(launch.signature.items()), constexprs, launch.num_warps)
        seen = unique.get(key)
        unique[key] = launch if seen is None else replace(seen, label=f"{seen.label}; {launch.label}")
    return list(unique.values())


def kernels_of(modules) -> set:
    """The ``@triton.jit`` functions defined in ``modules`` that no other of them calls: the
    kernels a launcher starts (helpers are compiled inside them)."""
    jitted = {
        name: value
        for module in modules
        for name, value in vars(module).items()
        if isinstance(value, triton.runtime.JITFunction) and value.fn.__module__ == module.__name__
    }
    called = {
        name
        for name in jitted
        for caller, other in jitted.items()
        if caller != name and re.search(rf"\b{name}\(", other.src)
    }
    return {fn for name, fn in jitted.items() if name not in called}


@dataclass
class Compiled:
    launch: Launch
    capability: int
    shared_bytes: int
    registers: int | None  # from ptxas's log, where this Triton prints it
    spill_bytes: int | None


def compile_launch(launch: Launch, capability: int) -> Compiled:
    """Compile ``launch`` to a cubin for ``sm_<capability>`` (no GPU needed); raises whatever the
    compiler raises."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    # every pointer is 16-byte aligned at run time (torch's allocations), as the launcher specialises it
    attrs = {(i,): [["tt.divisibility", 16]] for i, t in enumerate(launch.signature.values()) if t.startswith("*")}
    source = ASTSource(fn=launch.kernel, signature=launch.signature, constexprs=launch.constexprs, attrs=attrs)
    log = io.StringIO()
    with _ptxas_log(), contextlib.redirect_stdout(log):
        target = GPUTarget("cuda", capability, 32)
        kernel = triton.compile(source, target=target, options={"num_warps": launch.num_warps})
    if "cubin" not in kernel.asm:
        raise RuntimeError(f"{launch.kernel.__name__}: no cubin for sm_{capability}")
    registers = re.search(r"Used (\d+) registers", log.getvalue())
    spills = re.search(r"(\d+) bytes spill stores", log.getvalue())
    return Compiled(
        launch,
        capability,
        kernel.metadata.shared,
        int(registers.group(1)) if registers else None,
        int(spills.group(1)) if spills else None,
    )


@contextlib.contextmanager
def _ptxas_log():
    """Triton prints ptxas's resource report (registers, spills) while this is on, where the
    installed release has the switch."""
    knobs = getattr(getattr(triton, "knobs", None), "nvidia", None)
    if knobs is None or not hasattr(knobs, "dump_ptxas_log"):
        yield
        return
    before = knobs.dump_ptxas_log
    knobs.dump_ptxas_log = True
    try:
        yield
    finally:
        knobs.dump_ptxas_log = before


def check_listed(launches: list[Launch]) -> list[str]:
    """The kernels of this package that no listed launch compiles (each one line)."""
    import importlib
    import pkgutil

    package = sys.modules[__package__]
    modules = [importlib.import_module(f"{__package__}.{m.name}") for m in pkgutil.iter_modules(package.__path__)]
    listed = {launch.kernel for launch in launches}
    return [
        f"{fn.fn.__module__}.{fn.__name__}: a kernel with no launch in its module's launches()"
        for fn in sorted(kernels_of(modules) - listed, key=lambda f: f.__name__)
    ]


def _compile_one(job: tuple[int, int]) -> tuple[int, int, tuple | None, str | None]:
    index, capability = job
    launch = all_launches()[index]
    try:
        compiled = compile_launch(launch, capability)
        return index, capability, (compiled.shared_bytes, compiled.registers, compiled.spill_bytes), None
    except Exception as exc:  # noqa: BLE001 - every failure is reported, one line each
        cause = exc.__cause__ or exc  # a CompilationError's own text is the source excerpt
        lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
        return index, capability, None, f"{type(cause).__name__}: {lines[-1] if lines else ''}"


def main(argv=None) -> int:
    """``python -m memray.kernels.aot [--targets 90 80] [--jobs N] [--json FILE]``: compile every
    launch for every target; one line per failure (a compile error, shared memory over the
    target's limit, a kernel no launch lists) and exit 1, else a table and exit 0."""
    import argparse
    import json
    import os
    import time
    from concurrent.futures import ProcessPoolExecutor

    parser = argparse.ArgumentParser(prog="python -m memray.kernels.aot", description=main.__doc__.split("\n")[0])
    parser.add_argument("--targets", type=int, nargs="+", default=sorted(TARGETS, reverse=True))
    parser.add_argument("--jobs", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument("--json", help="write every compilation's figures here")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0").lower() not in ("", "0", "false", "off"):
        parser.error("TRITON_INTERPRET is set: the interpreter compiles nothing (unset it)")
    started = time.monotonic()
    launches = all_launches()
    failures = check_listed(launches)
    jobs = [(i, cap) for i in range(len(launches)) for cap in args.targets]
    rows = []
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for index, cap, compiled, error in pool.map(_compile_one, jobs):
            launch = launches[index]
            where = f"{launch.kernel.__name__} for sm_{cap} ({launch.label})"
            if error is not None:
                failures.append(f"{where}: {error}")
                continue
            shared, registers, spills = compiled
            limit = TARGETS.get(cap)
            if limit is not None and shared > limit:
                failures.append(f"{where}: {shared} bytes of shared memory, sm_{cap} has {limit}")
            rows.append(
                {
                    "kernel": launch.kernel.__name__,
                    "target": f"sm_{cap}",
                    "launch": launch.label,
                    "constexprs": {k: str(v) for k, v in launch.constexprs.items()},
                    "num_warps": launch.num_warps,
                    "shared_bytes": shared,
                    "registers": registers,
                    "spill_bytes": spills,
                }
            )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"triton": triton.__version__, "compiled": rows, "failures": failures}, handle, indent=1)
    for row in rows:
        print(
            f"{row['target']}  {row['kernel']:18s} shared {row['shared_bytes']:6d} B  registers {row['registers']}"
            f"  spills {row['spill_bytes']} B  {row['launch'][:90]}"
        )
    seconds = time.monotonic() - started
    print(f"triton {triton.__version__}: {len(rows)} of {len(jobs)} compilations to cubin in {seconds:.0f} s")
    for line in failures:
        print(f"FAILED {line}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
