"""Training on Ray Train workers: ``memray train CONFIG [--address ADDR] [--workers N]``.

A ``TorchTrainer`` starts ``distributed.workers`` workers; Ray Train forms their torch process
group (gloo on CPU, NCCL with GPUs) and each worker runs
:func:`memray.train.launch_local.train_worker` — the same rank body as the local launcher:
DeepSpeed ZeRO for the dense model, sharded value pools. Every committed checkpoint is reported
to Ray as a small pointer checkpoint (``memray_checkpoint.json``: the checkpoint's path and step)
stored under ``RUN/ray/``; the checkpoint itself stays where memray wrote it, so Ray never copies
the value table. With ``distributed.max_failures`` > 0, when a worker dies Ray Train restarts the
group (as many workers as before) and they resume from the newest reported checkpoint; a run
resumed with ``--resume`` on another number of workers reshards as it reads. The driver draws a
progress bar from the run's ``metrics.jsonl``.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import threading
from pathlib import Path

from memray.errors import ConfigError
from memray.train.config import RunConfig

from .local import ray_session, user_error

POINTER = "memray_checkpoint.json"
RESULT = "result.json"  # rank 0's result, written when training ends


def _pointer_path(checkpoint) -> str | None:
    """The memray checkpoint a reported Ray checkpoint points to."""
    with checkpoint.as_directory() as directory:
        return json.loads((Path(directory) / POINTER).read_text())["path"]


def _worker(args: dict) -> None:
    """One Ray Train worker: start from the run directory's newest committed checkpoint (the
    rerun rule; after a restart it is at least as new as the latest one reported to Ray, which
    may lag behind a commit), else Ray's reported one, else ``--resume``; report each committed
    checkpoint and the final result."""
    import ray.train

    from memray.checkpoint import committed_checkpoints
    from memray.train.launch_local import train_worker
    from memray.train.rundir import CHECKPOINTS

    context = ray.train.get_context()
    rank = context.get_world_rank()
    run_dir = Path(args["run_dir"])
    pids = run_dir / "pids"
    pids.mkdir(parents=True, exist_ok=True)
    (pids / f"rank-{rank}.pid").write_text(str(os.getpid()))
    own = committed_checkpoints(run_dir / CHECKPOINTS)
    restored = ray.train.get_checkpoint()
    if own:
        resume = str(own[-1])
    else:
        resume = _pointer_path(restored) if restored is not None else args["resume"]

    def report(path: Path, metrics: dict) -> None:
        if rank != 0:
            ray.train.report(metrics, checkpoint=None)
            return
        with tempfile.TemporaryDirectory() as directory:
            (Path(directory) / POINTER).write_text(
                json.dumps({"path": str(Path(path).resolve()), "step": metrics.get("step")})
            )
            ray.train.report(
                metrics, checkpoint=ray.train.Checkpoint.from_directory(directory), checkpoint_dir_name=Path(path).name
            )

    config: RunConfig = args["config"]
    result = train_worker(config, str(run_dir), progress=False, resume=resume, on_checkpoint=report)
    if rank == 0:
        (run_dir / RESULT).write_text(json.dumps(result))


def _check_fits(config: RunConfig) -> None:
    """Fail at once (not hang waiting for resources) when the workers cannot all be placed."""
    import ray

    d = config.distributed
    resources = ray.cluster_resources()
    need = {"CPU": d.workers * d.cpus_per_worker, **({"GPU": float(d.workers)} if d.use_gpu else {})}
    for name, amount in need.items():
        if resources.get(name, 0.0) < amount:
            raise ConfigError(
                "distributed.workers",
                f"{d.workers} workers need {amount:g} {name}s, the Ray cluster has {resources.get(name, 0.0):g}",
            )


def _progress(run_dir: Path, total: int, done: threading.Event, enabled: bool) -> None:
    """A progress bar on the driver, fed by the run's metrics.jsonl (rank 0 writes it)."""
    import sys

    from tqdm import tqdm

    bar = tqdm(total=total, desc=run_dir.name, disable=not enabled, file=sys.stderr, dynamic_ncols=True)
    metrics, offset = run_dir / "metrics.jsonl", 0
    while not done.wait(0.5):
        if not metrics.is_file():
            continue
        with metrics.open() as handle:
            handle.seek(offset)
            for line in handle:
                if not line.endswith("\n"):
                    break
                offset += len(line)
                entry = json.loads(line)
                bar.n = entry["step"]
                bar.set_postfix(loss=f"{entry['loss']:.3f}", tok_s=f"{entry['tokens_per_s']:,.0f}")
                bar.refresh()
    bar.close()


def train_on_ray(
    config: RunConfig,
    run_dir: str | Path,
    progress: bool = False,
    resume: str | Path | None = None,
    address: str | None = None,
) -> dict:
    """Train on ``config.distributed.workers`` Ray Train workers (an embedded local Ray unless
    ``address``); rank 0's result."""
    from memray.train.launch_local import check_launch

    d = config.distributed
    resume = check_launch(config, resume, run_dir)
    config = config.with_absolute_paths()  # Ray workers do not start in this directory
    run_dir = Path(run_dir).resolve()
    backend = d.backend if d.backend != "auto" else ("nccl" if d.use_gpu else "gloo")
    # Ray Train's print patch would log every worker line twice on the driver
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    with ray_session(address, num_cpus=max(os.cpu_count() or 1, math.ceil(d.workers * d.cpus_per_worker))):
        from ray.train import CheckpointConfig, FailureConfig, ScalingConfig
        from ray.train import RunConfig as RayRunConfig
        from ray.train.torch import TorchConfig, TorchTrainer

        _check_fits(config)
        trainer = TorchTrainer(
            _worker,
            train_loop_config={"config": config, "run_dir": str(run_dir), "resume": resume},
            torch_config=TorchConfig(backend=backend),
            scaling_config=ScalingConfig(
                num_workers=d.workers, use_gpu=d.use_gpu, resources_per_worker={"CPU": d.cpus_per_worker}
            ),
            run_config=RayRunConfig(
                name="train",
                storage_path=str(run_dir / "ray"),
                failure_config=FailureConfig(max_failures=d.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=config.train.keep_last or None),
                worker_runtime_env={"env_vars": {"DS_ACCELERATOR": "cuda" if d.use_gpu else "cpu"}},
            ),
        )
        done = threading.Event()
        bar = threading.Thread(target=_progress, args=(run_dir, config.train.steps, done, progress), daemon=True)
        bar.start()
        try:
            result = trainer.fit()
        except Exception as exc:
            user = user_error(exc)
            if user is not None:
                raise user from None
            raise
        finally:
            done.set()
            bar.join()
    if result.error is not None:
        user = user_error(result.error)
        if user is not None:
            raise user from None
        raise result.error
    try:
        return json.loads((run_dir / RESULT).read_text())
    except FileNotFoundError:
        raise RuntimeError(f"run {run_dir}: the workers ended without writing {RESULT}") from None
