"""Every Triton kernel compiled ahead of time for the GPUs memray targets, on this CPU machine.

The interpreter that runs the kernels in the other tests never compiles them; ``triton.compile``
with a GPU target does, down to a cubin, with no GPU present (memray.kernels.aot). It runs in a
process of its own: the test session runs Triton under the interpreter."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from memray.kernels import aot


def _compiler_env(tmp_path) -> dict:
    # a cache of its own: every launch is compiled here, none read from an earlier run
    return {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path / "triton-cache")}


@pytest.mark.slow
def test_every_kernel_launch_compiles_for_sm90_and_sm80(tmp_path):
    report_path = tmp_path / "aot.json"
    command = [sys.executable, "-m", "memray.kernels.aot", "--targets", "90", "80", "--json", str(report_path)]
    result = subprocess.run(command, capture_output=True, text=True, env=_compiler_env(tmp_path), timeout=900)
    failed = [line for line in result.stdout.splitlines() if line.startswith("FAILED")]
    assert result.returncode == 0 and not failed, "\n".join(failed) or result.stderr[-3000:]
    report = json.loads(report_path.read_text())
    assert not report["failures"]
    compiled = {(row["kernel"], row["target"], row["launch"]) for row in report["compiled"]}
    kernels = {kernel for kernel, _, _ in compiled}
    assert kernels == {"_bag_sum_kernel", "_bag_dot_kernel", "_pk_search_kernel"}
    # every listed launch, for both targets, within the target's shared memory
    assert len(compiled) == 2 * len({row["launch"] for row in report["compiled"]})
    for row in report["compiled"]:
        assert row["shared_bytes"] <= aot.TARGETS[int(row["target"][3:])], row
    labels = " ".join(row["launch"] for row in report["compiled"])
    for needle in ("torch.bfloat16", "torch.float32", f"knn {64}", "D 16", "D 256"):
        assert needle in labels


def test_a_kernel_without_a_listed_launch_is_reported(tmp_path):
    """A new kernel (one no other jit function calls) that no ``launches()`` lists is named."""
    module = tmp_path / "planted_kernels.py"
    module.write_text(
        textwrap.dedent(
            """
            import triton
            import triton.language as tl

            @triton.jit
            def _helper(x):
                return x + 1

            @triton.jit
            def _listed_kernel(ptr):
                tl.store(ptr, _helper(tl.load(ptr)))

            @triton.jit
            def _new_kernel(ptr):
                tl.store(ptr, 0.0)
            """
        )
    )
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import planted_kernels as m\n"
        "from memray.kernels import aot\n"
        "print(sorted(f.__name__ for f in aot.kernels_of([m])))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, env=_compiler_env(tmp_path)
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "['_listed_kernel', '_new_kernel']"


def test_launch_signatures_name_real_arguments():
    from memray.kernels import triton_bag

    with pytest.raises(ValueError, match="no argument 'table'"):
        aot.Launch(triton_bag._bag_sum_kernel, {"table": "fp32"}, {}, "a misspelt argument")
