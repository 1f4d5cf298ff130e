"""The device rule of memray.distributed.collectives, checked on every collective memray calls.

Under NCCL a collective takes only CUDA tensors; the rule (collectives.py's docstring) is that
memray calls torch.distributed only from collectives.py, which first moves every tensor to the
group's communication device. A CPU machine has only gloo, where that device is the CPU too, so
the check here is on the route rather than the device: every collective that memray's code
issues must come from collectives.py, with tensors that went through its device move. The
distributed paths run on 2 real ranks: training steps with their logged metrics, the row and
column layouts (row-wise Adagrad's whole-row sums), background and foreground checkpoint saves,
a resume, and the table reductions. DeepSpeed's own collectives (on the dense parameters, on the
device DeepSpeed puts them) are not memray's and are not checked.
"""

import pathlib

import pytest
import torch
import torch.distributed as dist
from helpers import watch_collectives

import memray
from memray.distributed import collectives, init_distributed, spawn
from memray.train import Trainer, load_run_config

pytestmark = pytest.mark.slow

MEMRAY_DIR = pathlib.Path(memray.__file__).resolve().parent
COLLECTIVES_FILE = str(pathlib.Path(collectives.__file__).resolve())


UNROUTED_SUM = """
def sum_over(x, group=None):
    out = x.clone()
    dist.all_reduce(out, group=group)
    return out
"""


def _checker(seen: dict, violations: list):
    """An ``on_call`` for :func:`helpers.watch_collectives` that applies the rule."""

    def on_call(name, tensors, _group, caller):
        path = pathlib.Path(caller.f_code.co_filename).resolve()
        if MEMRAY_DIR not in path.parents:
            return  # DeepSpeed's, torch's or the test's own
        where = f"{name} at {path.relative_to(MEMRAY_DIR)}:{caller.f_lineno}"
        if str(path) != COLLECTIVES_FILE:
            violations.append(f"{where}: a collective outside collectives.py")
            return
        seen[name] = seen.get(name, 0) + 1
        for t in tensors:
            if not collectives.audited(t):
                violations.append(f"{where}: a {t.device} tensor that did not go through the device rule")

    return on_call


def _train(ctx, run_dir, *overrides, resume=None):
    config = load_run_config(
        "tiny", ["train.steps=4", "train.log_every=1", f"distributed.workers={ctx.world_size}", *overrides]
    )
    trainer = Trainer(config, run_dir=run_dir, progress=False, context=ctx)
    if resume:
        trainer.resume(resume)
    trainer.fit()
    return trainer


def _worker(root):
    ctx = init_distributed("gloo")
    seen, violations = {}, []
    watch_collectives(_checker(seen, violations))
    with collectives.audit():
        row = _train(
            ctx, f"{root}/row", "distributed.zero_stage=2", "train.checkpoint_every=2", "train.async_checkpoint=true"
        )
        row.tables["layer1"].full_weight()
        _train(ctx, f"{root}/resumed", "distributed.zero_stage=2", resume=f"{root}/row/checkpoints/step-00000002")
        column = _train(ctx, f"{root}/column", "model.memory.layout=column", "optim.value_optimizer=rowwise_adagrad")
        column.tables["layer1"].full_weight()
        clean = list(violations)

        # the check itself catches a sum in collectives.py that skips the device move, and a
        # collective issued elsewhere in memray (code compiled under those files' names)
        unrouted = {"dist": dist, "torch": torch}
        exec(compile(UNROUTED_SUM, COLLECTIVES_FILE, "exec"), unrouted)
        original, collectives.sum_over = collectives.sum_over, unrouted["sum_over"]
        try:
            row._sum(torch.ones(()))
        finally:
            collectives.sum_over = original
        exec(compile("dist.all_reduce(torch.ones(()))", str(MEMRAY_DIR / "train" / "trainer.py"), "exec"), unrouted)
        caught = violations[len(clean) :]
    dist.destroy_process_group()
    return {"seen": seen, "violations": clean, "caught": caught}


def test_every_collective_follows_the_device_rule(tmp_path):
    for rank, result in enumerate(spawn(_worker, 2, str(tmp_path))):
        assert result["violations"] == [], f"rank {rank}: {sorted(set(result['violations']))}"
        # the paths did run: lookups, sums, per-rank counters, checkpoint checksums and barriers
        for name in ("all_to_all_single", "all_reduce", "all_gather", "all_gather_object", "barrier"):
            assert result["seen"].get(name, 0) > 0, (rank, name, result["seen"])
        caught = result["caught"]
        assert len(caught) == 2, caught
        assert "did not go through the device rule" in caught[0]
        assert "outside collectives.py" in caught[1] and "train/trainer.py" in caught[1]
