"""Builds and loads the C++ CPU kernels (``cpu_bag.cpp``) on first use.

The extension is compiled once per machine and torch version by
``torch.utils.cpp_extension.load`` (ninja, about ten seconds) into ``$TORCH_EXTENSIONS_DIR`` or
torch's default extension cache, and registers ``torch.ops.memray_cpu_bag``. Anything that
stops the build (no compiler, no ninja, a read-only cache, ``MEMRAY_CPU_EXT=0``) leaves the
pure-torch backend in charge: :func:`load` then returns ``None`` and :data:`load_error` says why.
"""

import contextlib
import os
import pathlib
import sys
import threading
import time
import warnings

import torch

SOURCE = pathlib.Path(__file__).resolve().parent / "cpu_bag.cpp"
NAMESPACE = "memray_cpu_bag"
# Set MEMRAY_CPU_EXT=0 to never build or use the extension (the torch backend serves CPU).
ENV_SWITCH = "MEMRAY_CPU_EXT"
# A build lock older than this was left by a process that died mid-build; without removing it
# every later process would wait for it forever.
_STALE_LOCK_S = 600

_lock = threading.Lock()
_ops = None
_tried = False
load_error = None


def _disabled():
    return os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "off", "no")


def _isa_flags():
    """Vector ISA flags for this CPU, as torch itself detected it at start-up.

    8-wide AVX2 with FMA keeps the kernels' arithmetic off the critical path; AVX-512 capable
    CPUs get the same build (benchmarks/bench_lookup.py times it against a baseline x86-64
    build, "ISA" rows).
    """
    capability = torch.backends.cpu.get_cpu_capability()
    if capability in ("AVX2", "AVX512"):
        return "avx2", ["-mavx2", "-mfma", "-mf16c"]
    return "base", []


def _build_directory(name):
    from torch.utils import cpp_extension

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()
    # One folder per torch version (the library links against libtorch) and build flavour (a
    # cache shared by different machines must not hand AVX2 code to a CPU without it).
    tag = torch.__version__.replace("+", "_").replace(".", "_")
    path = pathlib.Path(root) / f"{name}_torch{tag}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _remove_stale_lock(build_dir):
    lock = build_dir / "lock"
    try:
        if time.time() - lock.stat().st_mtime > _STALE_LOCK_S:
            lock.unlink()
    except FileNotFoundError:
        pass


@contextlib.contextmanager
def this_interpreters_ninja():
    """``cpp_extension`` runs the first ``ninja`` on ``PATH``. Ninja versions hash build commands
    differently (1.11 and 1.13 do), so two processes finding two ninjas (a system one, and pip's
    beside this interpreter, which a Ray head puts first on its ``PATH``) would each rebuild what
    the other built, on every first use. The one beside the interpreter goes first for the build."""
    bin_dir = pathlib.Path(sys.executable).parent
    if not (bin_dir / "ninja").exists():
        yield
        return
    path = os.environ.get("PATH", "")
    os.environ["PATH"] = os.pathsep.join([str(bin_dir), path])
    try:
        yield
    finally:
        os.environ["PATH"] = path


def build(isa, isa_flags, namespace=NAMESPACE):
    """Compile (or find in the cache) and load one build; returns ``torch.ops.<namespace>``.

    :func:`load` is the entry point; benchmarks call this directly to load a second build with
    other ISA flags under another namespace beside it.
    """
    from torch.utils import cpp_extension

    build_dir = _build_directory(f"{namespace}_{isa}")
    _remove_stale_lock(build_dir)
    # Loading registers the ops in torch.ops.<namespace>; the returned path is not needed.
    with this_interpreters_ninja():
        cpp_extension.load(
            name=namespace,
            sources=[str(SOURCE)],
            extra_cflags=["-O3", "-fopenmp", f"-DMEMRAY_CPU_BAG_NS={namespace}", *isa_flags],
            extra_ldflags=["-fopenmp"],
            build_directory=str(build_dir),
            is_python_module=False,
            verbose=False,
        )
    return getattr(torch.ops, namespace)


def load():
    """The extension's ops (``torch.ops.memray_cpu_bag``), or ``None`` if it cannot be built."""
    global _ops, _tried, load_error
    if _tried:
        return _ops
    with _lock:
        if _tried:
            return _ops
        if _disabled():
            load_error = f"disabled by {ENV_SWITCH}={os.environ[ENV_SWITCH]}"
        else:
            try:
                _ops = build(*_isa_flags())
            except Exception as exc:  # noqa: BLE001 -- any build failure means: use the torch backend
                load_error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
                warnings.warn(
                    f"memray.kernels: C++ CPU kernels unavailable ({load_error}); using the slower torch backend",
                    RuntimeWarning,
                    stacklevel=3,
                )
        _tried = True
    return _ops


def available():
    return load() is not None
