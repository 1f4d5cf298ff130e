"""Tests that can fail: plant one fault at a time in a copy of the project and run the tests.

Each mutant is one textual change to one source file (the exact text must occur once, so a
mutant whose code has moved is reported, not silently skipped). For each, the test files of the
mutant's area run (whole files, slow ones included, so the table shows every test there that
notices); a mutant is *caught* when at least one of them fails or errors. The table (``--out``, default
``benchmarks/results/mutations.md``) lists every mutant, what ran and what failed. Exit 1 if any
mutant survives.

    .venv/bin/python tests/mutations.py [--only NAME ...] [--out FILE]

Takes about 11 minutes for all 18 on 2 cores (not part of ``make test``).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass

ROOT = pathlib.Path(__file__).resolve().parent.parent


@dataclass
class Mutant:
    name: str
    what: str  # the fault, in words
    path: str
    old: str
    new: str
    tests: tuple[str, ...]  # the area's tests: files or pytest node ids; or, with ``command``, its name
    command: tuple[str, ...] = ()  # instead of pytest: a script and its arguments, caught by a non-zero exit


MUTANTS = [
    Mutant(
        "lookup-weight-grad",
        "the lookup's backward drops the gradient of the score weights",
        "kernels/embedding_bag.py",
        "        return grad_weights, grad_table, None, None, None, None",
        "        return None, grad_table, None, None, None, None",
        ("tests/test_kernels.py", "tests/test_memory.py"),
    ),
    Mutant(
        "restore-rows-shifted",
        "ranks after the first restore their value rows shifted by one",
        "memray/train/checkpointer.py",
        "load_pool_shard(ckpt, name, table.row_range, table.col_range, manifest)",
        "load_pool_shard(ckpt, name, tuple(r - (table.shard.rank > 0) for r in table.row_range), "
        "table.col_range, manifest)",
        ("tests/test_resume.py::test_resume_on_any_world_size", "tests/test_checkpoint_sharded.py"),
    ),
    Mutant(
        "chunk-checksum-skipped",
        "a chunk read for a restore is not checked against its checksum",
        "memray/checkpoint/pools.py",
        "        if not complete or hashlib.sha256(raw).hexdigest() != checksums[rel]:",
        "        if not complete:",
        ("tests/test_checkpoint_sharded.py",),
    ),
    Mutant(
        "restore-ranges-swapped",
        "a restore passes the column range as the row range and back",
        "memray/train/checkpointer.py",
        "load_pool_shard(ckpt, name, table.row_range, table.col_range, manifest)",
        "load_pool_shard(ckpt, name, table.col_range, table.row_range, manifest)",
        ("tests/test_resume.py::test_single_process_resume_is_exact", "tests/test_trainer.py"),
    ),
    Mutant(
        "lazy-adam-global-step",
        "lazy Adam bias-corrects every row with the largest step count instead of its own",
        "memray/optim/sparse.py",
        '        row_step = state["row_step"].index_select(0, rows).add_(1)  # [U]',
        '        row_step = state["row_step"].index_select(0, rows).fill_(int(state["row_step"].max()) + 1)',
        ("tests/test_optim.py",),
    ),
    Mutant(
        "usage-not-recorded",
        "lookups are not added to the usage statistics",
        "memray/model/values.py",
        "        self.usage_count.index_add_(0, rows, torch.ones_like(rows))\n",
        "        return\n",
        ("tests/test_memory.py", "tests/test_trainer.py"),
    ),
    Mutant(
        "data-position-lost",
        "a resumed run starts its data from the first batch again",
        "memray/train/trainer.py",
        '        self.batches.position = Position(**attrs["data_position"])',
        "        self.batches.position = Position()",
        ("tests/test_resume.py::test_single_process_resume_is_exact", "tests/test_trainer.py"),
    ),
    Mutant(
        "ingest-last-batch-dropped",
        "ingestion closes a shard without writing its last partial record batch",
        "memray/data/ingest.py",
        "            flush()\n            writer.close()",
        "            writer.close()",
        ("tests/test_ingest.py",),
    ),
    Mutant(
        "zero3-moments-unsaved",
        "a ZeRO-3 checkpoint looks for optimizer state in the base optimizer's (empty) groups",
        "memray/train/deepspeed.py",
        '        return any("exp_avg" in state for state in self._base_state().values())',
        "        base = self.engine.optimizer.optimizer if self.stage else self.engine.optimizer\n"
        '        return any(base.state.get(p) for group in base.param_groups for p in group["params"])',
        ("tests/test_resume.py::test_zero3_resumes_exactly",),
    ),
    Mutant(
        "zero3-partition-unpadded",
        "every ZeRO-3 rank restores the first partition of each tensor",
        "memray/train/deepspeed.py",
        "    flat = full.detach().float().flatten()[rank * size : (rank + 1) * size]",
        "    flat = full.detach().float().flatten()[:size]",
        ("tests/test_resume.py::test_zero3_resumes_exactly", "tests/test_resume.py::test_resume_on_any_world_size"),
    ),
    Mutant(
        "rerun-starts-over",
        "training into a run directory with checkpoints starts over instead of continuing",
        "memray/train/launch_local.py",
        "    if own:\n        resume = own[-1]",
        "    if False:\n        resume = own[-1]",
        ("tests/test_resume.py::test_a_rerun_continues_its_run_directory", "tests/test_faults.py"),
    ),
    Mutant(
        "grow-grid-row-cut",
        "the chunked grow skips the grid row a chunk ends inside",
        "memray/train/grow.py",
        "        for i in range(lo // m, min(n, -(-hi // m))):",
        "        for i in range(lo // m, min(n, hi // m)):",
        ("tests/test_grow.py",),
    ),
    Mutant(
        "extra-file-unchecked",
        "a file copied into a checkpoint (the tokenizer) is left out of its manifest",
        "memray/checkpoint/sharded.py",
        "                    written[name] = _sha256(self.tmp / name)",
        "                    pass",
        ("tests/test_ingest.py",),
    ),
    Mutant(
        "search-global-not-constexpr",
        "the Triton search reads a plain int global in its kernel (the interpreter runs it; the compiler refuses it)",
        "kernels/triton_search.py",
        "_MIN_INT64 = tl.constexpr(-(2**63))",
        "_MIN_INT64 = -(2**63)",
        ("tests/test_aot.py",),
    ),
    Mutant(
        "bf16-masters-rounded",
        "a checkpoint of a bf16 run holds its dense weights rounded to bf16, not the fp32 masters",
        "memray/train/deepspeed.py",
        'yield "weights", name, value.detach().to("cpu", dtype)',
        'yield "weights", name, value.detach().bfloat16().to("cpu", dtype)',
        ("tests/test_resume.py::test_bf16_checkpoints_hold_fp32_masters_and_resume_exactly",),
    ),
    Mutant(
        "bf16-masters-rounded-gpu-check",
        "the same fault, against make gpu-check's train section (its CPU smoke run)",
        "memray/train/deepspeed.py",
        'yield "weights", name, value.detach().to("cpu", dtype)',
        'yield "weights", name, value.detach().bfloat16().to("cpu", dtype)',
        ("gpu_check.py --sections train",),
        ("benchmarks/gpu_check.py", "--device", "cpu", "--sections", "train", "--out", "gpu-check-out"),
    ),
    Mutant(
        "dense-moments-zeroed",
        "a checkpoint holds zeros for the dense Adam moments",
        "memray/train/deepspeed.py",
        'value = torch.zeros(shape) if value is None else value.detach().to("cpu", torch.float32)',
        "value = torch.zeros(shape)",
        ("tests/test_resume.py::test_bf16_checkpoints_hold_fp32_masters_and_resume_exactly",),
    ),
    Mutant(
        "dense-moments-zeroed-gpu-check",
        "the same fault, against make gpu-check's train section (its CPU smoke run)",
        "memray/train/deepspeed.py",
        'value = torch.zeros(shape) if value is None else value.detach().to("cpu", torch.float32)',
        "value = torch.zeros(shape)",
        ("gpu_check.py --sections train",),
        ("benchmarks/gpu_check.py", "--device", "cpu", "--sections", "train", "--out", "gpu-check-out"),
    ),
]


def _copy_project(dest: pathlib.Path) -> None:
    """The project's files (tracked and untracked, not ignored) under ``dest``; ``memray.kernels``
    resolves inside the copy through a link, as ``setup.py`` maps it."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for rel in filter(None, (p.decode() for p in listed)):
        source = ROOT / rel
        if source.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / rel)
    (dest / "memray" / "kernels").symlink_to(dest / "kernels", target_is_directory=True)


def _failures(junit: pathlib.Path) -> tuple[int, list[str]]:
    """(tests run, ids of the failed or errored ones) from a JUnit XML report."""
    if not junit.exists():
        return 0, ["(pytest wrote no report)"]
    run, failed = 0, []
    for case in ET.parse(junit).getroot().iter("testcase"):
        if case.find("skipped") is not None:
            continue
        run += 1
        if case.find("failure") is not None or case.find("error") is not None:
            failed.append(f"{case.get('classname', '').split('.')[-1]}::{case.get('name')}")
    return run, failed


def run_mutant(mutant: Mutant, python: str) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"mutant-{mutant.name}-") as tmp:
        work = pathlib.Path(tmp)
        _copy_project(work)
        target = work / mutant.path
        text = target.read_text()
        found = text.count(mutant.old)
        if found != 1:
            return {"mutant": mutant.name, "error": f"{mutant.path}: the text to change occurs {found} times"}
        target.write_text(text.replace(mutant.old, mutant.new))
        env = {**os.environ, "PYTHONPATH": str(work)}
        start, junit = time.monotonic(), work / "junit.xml"
        if mutant.command:
            done = subprocess.run([python, *mutant.command], cwd=work, env=env, capture_output=True)
            ran, failed = 1, ([mutant.tests[0]] if done.returncode != 0 else [])
        else:
            subprocess.run(
                [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}", *mutant.tests],
                cwd=work,
                env=env,
                capture_output=True,
            )
            ran, failed = _failures(junit)
        return {
            "mutant": mutant.name,
            "fault": mutant.what,
            "file": mutant.path,
            "tests": mutant.tests,
            "tests_run": ran,
            "failed": len(failed),
            "caught": bool(failed),
            "failing_tests": failed,
            "seconds": round(time.monotonic() - start),
        }


def write_table(results: list[dict], out: pathlib.Path) -> None:
    lines = [
        "# Mutation check",
        "",
        "One planted fault at a time in a copy of the project; the test files of its area run",
        "against it. `python tests/mutations.py` writes this table.",
        "",
        "| mutant | fault | file | tests (run) | failed | caught | some failing tests |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['mutant']} | {r['error']} | | | | **stale** | |")
            continue
        shown = ", ".join(f"`{t}`" for t in r["failing_tests"][:3])
        more = len(r["failing_tests"]) - 3
        shown += f" (+{more} more)" if more > 0 else ""
        lines.append(
            f"| {r['mutant']} | {r['fault']} | `{r['file']}` | "
            f"{', '.join(t.removeprefix('tests/') for t in r['tests'])} ({r['tests_run']}) | {r['failed']} | "
            f"{'yes' if r['caught'] else '**no**'} | {shown} |"
        )
    caught = sum(1 for r in results if r.get("caught"))
    lines += ["", f"{caught} of {len(results)} mutants caught."]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="run only these mutants")
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "benchmarks" / "results" / "mutations.md")
    parser.add_argument("--python", default=sys.executable)
    args = parser.parse_args(argv)
    chosen = [m for m in MUTANTS if not args.only or m.name in args.only]
    results = []
    for mutant in chosen:
        result = run_mutant(mutant, args.python)
        results.append(result)
        print(
            f"{mutant.name}: "
            + (result["error"] if "error" in result else f"{result['failed']} of {result['tests_run']} tests fail"),
            flush=True,
        )
    write_table(results, args.out)
    return 0 if all(r.get("caught") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
