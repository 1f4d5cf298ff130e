"""The ``memray`` command line.

Exit codes: 0 success, 1 the run failed, 2 a usage or input error (one line naming the file, key
or value at fault; the traceback only with ``--debug``).
"""

from __future__ import annotations

import json
import sys

import click

from memray.cli_ray import register as register_ray_commands
from memray.errors import ReportedError, RunFailed, UsageError, UserError


class _Group(click.Group):
    """Turns user errors (exit code 2) and failed runs (exit code 1) into one line."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except click.exceptions.NoArgsIsHelpError as exc:  # `memray` alone: its help, as click prints it
            click.echo(exc.ctx.get_help())
            sys.exit(0)
        except click.UsageError as exc:  # a wrong option or argument: one line, not click's three
            command = exc.ctx.command_path if exc.ctx is not None else "memray"
            message = " ".join(exc.format_message().split())  # click folds some (a choice list) over lines
            click.echo(f"memray: error: {message} (see {command} --help)", err=True)
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            exc.show()
            sys.exit(exc.exit_code)
        except click.exceptions.Abort:
            click.echo("Aborted!", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)  # as click's standalone mode ends

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except ReportedError as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"memray: error: {exc}", err=True)
            sys.exit(exc.exit_code)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks for errors.")
@click.version_option(package_name="memray-layers", prog_name="memray")
@click.pass_context
def main(ctx, debug):
    """Train transformers with product-key memory layers (Memory Layers at Scale).

    \b
    Example:
      memray train tiny
      memray eval runs/tiny-20260101-000000 --facts runs/tiny-20260101-000000/data/facts.jsonl
    """
    ctx.ensure_object(dict)["debug"] = debug


@main.command()
@click.argument("config")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a config key (repeatable).")
@click.option("--run-dir", type=click.Path(file_okay=False), help="Run directory (default runs/<name>-<timestamp>).")
@click.option("--no-progress", is_flag=True, help="Log lines instead of a progress bar.")
@click.option(
    "--workers",
    type=int,
    help="Ranks (sets distributed.workers; default 2): Ray Train workers running "
    "DeepSpeed ZeRO + sharded value pools; 0: one process without Ray.",
)
@click.option(
    "--address",
    help="Train on the Ray cluster at ADDR (host:6379 or ray://host:10001; default: an "
    "embedded local Ray on 127.0.0.1).",
)
@click.option(
    "--resume",
    type=click.Path(),
    help="Start from a checkpoint (or a run directory's newest), saved on any number of processes. "
    "A --run-dir that already holds a committed checkpoint always continues from its own newest.",
)
def train(config, overrides, run_dir, no_progress, workers, address, resume):
    """Train a model from CONFIG: a bundled config name or a YAML file.

    \b
    Example:
      memray train tiny                      # 2 Ray Train workers on an embedded local Ray
      memray train tiny --workers 0 --set train.steps=50    # one process, no Ray
      memray train tiny --workers 3 --set distributed.zero_stage=2 --set model.memory.layout=column
      memray train tiny --workers 3 --resume runs/tiny-20260101-000000   # any world size
      memray train tiny --set distributed.launcher=processes              # local processes, no Ray
    """
    from memray.train import load_run_config

    if workers is not None:
        overrides = [*overrides, f"distributed.workers={workers}"]
    run_config = load_run_config(config, list(overrides))
    _launch(run_config, run_dir, no_progress, address, resume)


def _launch(run_config, run_dir, no_progress: bool, address: str | None, resume: str | None) -> None:
    """Train ``run_config`` on one process, local processes or Ray Train workers, as its
    ``distributed`` section says; print the result as one JSON line."""
    from memray.train import Trainer, train_local
    from memray.train.launch_local import check_launch
    from memray.train.rundir import resolve_run_dir

    progress = not no_progress and sys.stderr.isatty()
    d = run_config.distributed
    if address and (d.workers < 1 or d.launcher != "ray"):
        raise UsageError("--address needs Ray Train workers (--workers >= 1, distributed.launcher: ray)")
    run_dir = resolve_run_dir(run_config, run_dir)
    try:
        if d.workers >= 1 and d.launcher == "ray":
            from memray.launch.ray_train import train_on_ray

            result = train_on_ray(run_config, run_dir, progress, resume, address=address)
        elif d.workers >= 1:
            result = train_local(run_config, run_dir, progress, resume)
        else:
            resume = check_launch(run_config, resume, run_dir)
            trainer = Trainer(run_config, run_dir=run_dir, progress=progress)
            if resume:
                trainer.resume(resume)
            result = trainer.fit()
    except RunFailed as exc:
        raise _kept(exc, run_dir) from exc
    click.echo(json.dumps(result))


def _kept(exc: RunFailed, run_dir) -> RunFailed:
    """A failed run's one line, its tracebacks appended to ``RUN/failure.txt`` (named in the line)."""
    from datetime import datetime
    from pathlib import Path

    if not exc.details or not Path(run_dir).is_dir():
        return exc
    path = Path(run_dir) / "failure.txt"
    with path.open("a") as handle:
        handle.write(f"{datetime.now().isoformat(timespec='seconds')} {exc}\n{exc.details}\n")
    return RunFailed(f"{exc} (traceback in {path})", exc.details)


@main.command()
@click.argument("checkpoint", type=click.Path())
@click.option(
    "--data",
    required=True,
    type=click.Path(),
    help="The new data: a facts JSONL file, a text file, or a directory of `memray ingest` shards.",
)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run directory of the finetuned model.")
@click.option(
    "--mode",
    type=click.Choice(["full", "lora", "memory", "sparse-memory"]),
    required=True,
    help="What trains: every parameter, low-rank adapters, the value pools, or each step's top rows of them "
    "(see the README's table before choosing).",
)
@click.option("--slots-per-batch", type=click.IntRange(min=1), help="sparse-memory: rows per pool and step (t).")
@click.option("--steps", type=click.IntRange(min=1), help="Optimizer steps (sets train.steps).")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), help="Dense / adapter lr (sets optim.lr).")
@click.option(
    "--value-lr", type=click.FloatRange(min=0, min_open=True), help="Value-pool lr (sets model.memory.value_lr)."
)
@click.option("--lora-rank", type=click.IntRange(min=1), help="lora: the adapters' rank (default 8).")
@click.option("--train-keys", is_flag=True, help="memory: the memory layers' sub-keys train too.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a config key (repeatable).")
@click.option("--workers", type=int, help="Ranks (sets distributed.workers; default: the base run's).")
@click.option("--address", help="Train on the Ray cluster at ADDR (as memray train --address).")
@click.option("--no-progress", is_flag=True, help="Log lines instead of a progress bar.")
def finetune(
    checkpoint,
    data,
    out,
    mode,
    slots_per_batch,
    steps,
    lr,
    value_lr,
    lora_rank,
    train_keys,
    overrides,
    workers,
    address,
    no_progress,
):
    """Teach the model of CHECKPOINT (or a run directory's newest) new data, starting from its
    weights and usage counts, training only what --mode says.

    \b
    memory trains the value pools alone (with the base run's optimizer: tune --value-lr);
    sparse-memory updates per step only the --slots-per-batch rows per pool that the batch reads
    most relative to the base model's own usage of them (TF-IDF). Both learn new facts with far
    less forgetting of old ones than full or LoRA finetuning (the README's table). The result is
    a run directory like memray train's; rerunning the command continues it.

    \b
    Example:
      memray finetune runs/demo --data new.jsonl --out runs/demo-new --mode memory --steps 100 --workers 0
      memray finetune runs/demo --data new.jsonl --out runs/demo-sm --mode sparse-memory --slots-per-batch 3000
      memray finetune runs/demo --data new.jsonl --out runs/demo-lora --mode lora --lora-rank 16 --lr 1e-3
    """
    from memray.train.finetune import finetune_config

    flags = [
        f"{key}={value}"
        for key, value in (
            ("train.steps", steps),
            ("optim.lr", lr),
            ("model.memory.value_lr", value_lr),
            ("distributed.workers", workers),
        )
        if value is not None
    ]
    for given, flag, wanted in (
        (train_keys, "--train-keys", "memory"),
        (slots_per_batch, "--slots-per-batch", "sparse-memory"),
        (lora_rank, "--lora-rank", "lora"),
    ):
        if given and mode != wanted:
            raise UsageError(f"{flag} applies to --mode {wanted}, not {mode}")
    run_config = finetune_config(
        checkpoint,
        data,
        mode,
        [*overrides, *flags],
        slots_per_batch=slots_per_batch,
        lora_rank=lora_rank,
        train_keys=train_keys,
    )
    _launch(run_config, out, no_progress, address, None)


@main.command(name="eval")
@click.argument("checkpoint", type=click.Path())
@click.option(
    "--facts", "facts_path", required=True, type=click.Path(), help='Facts JSONL: {"prompt", "answer"} per line.'
)
@click.option("--limit", type=int, default=0, help="Evaluate only the first N facts (0: all).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--min-recall", type=float, help="Exit 1 when the recall is below this fraction (a check for scripts).")
def evaluate(checkpoint, facts_path, limit, as_json, min_recall):
    """Exact-match recall of greedy answers to the facts in --facts.

    CHECKPOINT is a checkpoint directory or a run directory (its newest committed checkpoint).

    \b
    Example:
      memray eval runs/demo --facts runs/demo/data/facts.jsonl
    """
    from memray.checkpoint.model import load_trained_model
    from memray.data import read_facts, saved_tokenizer
    from memray.evaluate import fact_recall

    facts = read_facts(facts_path)
    if limit > 0:
        facts = facts[:limit]
    model, _, ckpt, manifest = load_trained_model(checkpoint)
    result = fact_recall(model, facts, saved_tokenizer(ckpt))
    result.update(checkpoint=str(ckpt), step=manifest["step"])
    if as_json:
        click.echo(json.dumps(result))
    else:
        click.echo(f"checkpoint {ckpt} (step {manifest['step']})")
        for ex in result["examples"]:
            mark = "ok " if ex["predicted"] == ex["answer"] else "xx "
            click.echo(f"  {mark}{ex['prompt']} -> {ex['predicted']!r} (answer {ex['answer']!r})")
        click.echo(f"recall {result['recall']:.3f} ({result['correct']}/{result['total']} facts, exact match)")
    if min_recall is not None and result["recall"] < min_recall:
        click.echo(f"memray: recall {result['recall']:.3f} is below --min-recall {min_recall}", err=True)
        sys.exit(1)


def read_prompts(path: str) -> list[str]:
    """Prompts of a file, one per line: a JSON object's ``prompt`` (a facts file works as it
    is), else the line itself; blank lines are skipped."""
    from memray.errors import InputError

    try:
        lines = open(path, encoding="utf-8").read().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot be read ({exc.__class__.__name__}: {exc})") from None
    prompts = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
            if not isinstance(record.get("prompt"), str):
                raise InputError(f'{path}:{number}: a JSON line needs a string "prompt"')
            prompts.append(record["prompt"])
        else:
            prompts.append(line)
    if not prompts:
        raise InputError(f"{path}: no prompts")
    return prompts


@main.command()
@click.argument("checkpoint", type=click.Path())
@click.option("--prompt", "prompt_texts", multiple=True, help="A prompt (repeatable).")
@click.option(
    "--prompts",
    "prompts_path",
    type=click.Path(dir_okay=False),
    help='A file of prompts, one per line (or JSON lines with "prompt", e.g. a facts file).',
)
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--temperature", type=click.FloatRange(min=0), default=0.0, show_default=True, help="0: greedy.")
@click.option("--top-k", type=click.IntRange(min=0), default=0, show_default=True, help="0: no cut.")
@click.option("--top-p", type=click.FloatRange(min=0, min_open=True, max=1), default=1.0, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the sampling.")
@click.option("--json", "as_json", is_flag=True, help="JSON lines even for one prompt.")
def generate(checkpoint, prompt_texts, prompts_path, max_new_tokens, temperature, top_k, top_p, seed, as_json):
    """Continue prompts with a trained model: greedy, or sampled (temperature, top-k, top-p).

    CHECKPOINT is a checkpoint directory or a run directory (its newest committed checkpoint);
    the run's own tokenizer is used. One prompt streams its continuation to stdout as it is
    decoded; several (or --json) print one JSON line each: {"prompt", "completion"}.

    \b
    Example:
      memray generate runs/demo --prompt "The capital of Zarnia is"
      memray generate runs/demo --prompts runs/demo/data/facts.jsonl --max-new-tokens 16 > out.jsonl
    """
    from memray.checkpoint.model import load_trained_model
    from memray.data import saved_tokenizer
    from memray.generate import Sampling, TextStream, generate_text
    from memray.generate import generate as generate_ids

    prompts = list(prompt_texts) + (read_prompts(prompts_path) if prompts_path else [])
    if not prompts:
        raise UsageError("give a --prompt or a --prompts file")
    sampling = Sampling(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    model, _, ckpt, _ = load_trained_model(checkpoint)
    tokenizer = saved_tokenizer(ckpt)
    if len(prompts) == 1 and not as_json:
        stream = TextStream(tokenizer)
        ids = generate_ids(
            model,
            tokenizer,
            prompts,
            max_new_tokens,
            sampling,
            on_token=lambda _, ids: click.echo(stream.update(ids), nl=False),
        )[0]
        click.echo(tokenizer.decode(ids)[len(stream.shown) :])
        return
    for prompt, completion in zip(prompts, generate_text(model, tokenizer, prompts, max_new_tokens, sampling)):
        click.echo(json.dumps({"prompt": prompt, "completion": completion}))


@main.command()
@click.argument("run_dir", type=click.Path())
@click.option("--out", type=click.Path(dir_okay=False), help="PNG to write (default RUN/metrics.png).")
def plot(run_dir, out):
    """Plot a run's training curves from its metrics.jsonl as one PNG (no TensorBoard server).

    Loss, learning rates, gradient norms, tokens/s, the share of each pool's slots read, and
    the lookup imbalance across ranks. The same scalars are TensorBoard event files in the run
    directory (`tensorboard --logdir RUN`).

    \b
    Example:
      memray plot runs/demo --out demo.png
    """
    from memray.train.plot import plot_run

    click.echo(plot_run(run_dir, out))


@main.command()
@click.argument("config")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a config key (repeatable).")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Facts JSONL file to write.")
def facts(config, overrides, out):
    """Write the synthetic facts a config trains on (data.source: synthetic) as facts JSONL.

    \b
    Example:
      memray facts demo --out data/demo-facts.jsonl
      memray ingest data/demo-facts.jsonl --out data/demo-shards
    """
    from memray.data import generate_facts, write_facts
    from memray.train import load_run_config

    d = load_run_config(config, list(overrides)).data
    items = generate_facts(d.num_entities, d.num_attributes, d.seed, style=d.style)
    write_facts(out, items)
    click.echo(
        f"{out}: {len(items):,} facts ({d.num_entities} entities x {d.num_attributes} attributes, "
        f"style {d.style}, seed {d.seed})"
    )


@main.command()
@click.argument("sources", nargs=-1, required=True, type=click.Path())
@click.option(
    "--out", required=True, type=click.Path(file_okay=False), help="Directory for the shards and manifest.json."
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["text", "jsonl", "parquet"]),
    help="Input format (default: from each file's suffix; .jsonl/.json, .parquet, else text).",
)
@click.option("--text-column", default="text", show_default=True, help="Parquet column holding the text.")
@click.option("--shard-tokens", type=int, default=1 << 24, show_default=True, help="Tokens per shard at most.")
@click.option("--workers", type=int, help="Processes ingesting files in parallel (default: one per core).")
@click.option("--strict", is_flag=True, help="Stop at the first malformed record instead of rejecting it.")
@click.option(
    "--tokenizer",
    default="byte",
    show_default=True,
    help="byte; bpe (train a byte-level BPE on SOURCES, saved as OUT/tokenizer.json); bpe:PATH (use that file).",
)
@click.option(
    "--vocab-size", type=int, default=8192, show_default=True, help="Ids of a BPE trained with --tokenizer bpe."
)
@click.option(
    "--ray",
    "on_ray",
    is_flag=True,
    help="One Ray task per file (on the cluster RAY_ADDRESS names, else an "
    "embedded local Ray); OUT must be shared storage.",
)
def ingest(sources, out, fmt, text_column, shard_tokens, workers, strict, tokenizer, vocab_size, on_ray):
    """Tokenize SOURCES (text, JSON lines, Parquet) into Arrow shards for training (data.source: arrow).

    Malformed records are counted and written to OUT/rejects.jsonl with file:line and reason.

    \b
    Example:
      memray ingest corpus/*.jsonl --out data/corpus
      memray ingest corpus/*.jsonl --out data/bpe --tokenizer bpe --vocab-size 8192
      memray train my.yaml --set data.source=arrow --set data.path=data/corpus
    """
    from memray.data.ingest import ingest as run_ingest

    map_files = None
    if on_ray:
        from memray.launch.tasks import map_files
    manifest = run_ingest(
        list(sources),
        out,
        fmt=fmt,
        shard_tokens=shard_tokens,
        workers=workers,
        strict=strict,
        text_column=text_column,
        tokenizer=tokenizer,
        vocab_size=vocab_size,
        map_files=map_files,
    )
    t = manifest["totals"]
    click.echo(
        f"{out}: {t['written']:,} documents, {t['tokens']:,} tokens in {len(manifest['shards'])} shard(s); "
        f"{t['rejected']:,} rejected of {t['read']:,} read (see {out}/rejects.jsonl)"
    )


@main.command()
@click.argument("checkpoint", type=click.Path())
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Directory for the per-rank shards.")
@click.option("--world-size", required=True, type=int, help="Ranks to reshard for.")
@click.option("--layout", type=click.Choice(["row", "column"]), default="row", show_default=True)
def restore(checkpoint, out, world_size, layout):
    """Reshard CHECKPOINT's value pools offline for WORLD_SIZE ranks of LAYOUT.

    Writes OUT/rank-XXXXX.safetensors (that rank's part of every pool array) and OUT/restore.json,
    reading one rank's rows or columns at a time. Training resumes on any world size directly
    (memray train --resume); this is for tools and inspection.

    \b
    Example:
      memray restore runs/exp1 --out runs/exp1-w4 --world-size 4 --layout column
    """
    from memray.checkpoint.sharded import restore_offline

    summary = restore_offline(checkpoint, out, world_size, layout)
    click.echo(f"{out}: {world_size} {layout}-layout shard file(s) of step {summary['step']} from {summary['source']}")


@main.command()
@click.argument("checkpoint", type=click.Path())
def verify(checkpoint):
    """Check every file and chunk of a checkpoint against its manifest (exit 2 on damage).

    CHECKPOINT is a checkpoint directory or a run directory (its newest committed checkpoint).

    \b
    Example:
      memray verify runs/demo/checkpoints/step-00000900
    """
    from memray.checkpoint.sharded import verify_checkpoint

    ckpt, manifest = verify_checkpoint(checkpoint)
    click.echo(
        f"checkpoint {ckpt} (step {manifest['step']}): {len(manifest['files'])} files and "
        f"{len(manifest.get('chunks', {}))} chunks match their checksums"
    )


@main.command()
@click.argument("checkpoint", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the description as JSON.")
@click.option("--pool", help="Only this value pool.")
@click.option("--slot", type=int, help="Also this slot: its value norm, usage and the layers that read it.")
@click.option(
    "--usage-png", type=click.Path(dir_okay=False), help="Draw each pool's usage (histogram, key-grid heat map)."
)
def inspect(checkpoint, as_json, pool, slot, usage_png):
    """What a checkpoint holds: step, world size, layout, checksum status, and per value pool its
    shape, dtype, shard map, usage metrics and value norms (read a chunk at a time).

    \b
    Example:
      memray inspect runs/demo --slot 42 --usage-png usage.png
    """
    from memray.checkpoint.inspect import describe, format_description

    description = describe(checkpoint, pool, slot, usage_png)
    click.echo(json.dumps(description) if as_json else format_description(description))


@main.command()
@click.argument("checkpoint", type=click.Path())
@click.option("--format", "fmt", type=click.Choice(["safetensors", "hf"]), default="safetensors", show_default=True)
@click.option("--out", required=True, type=click.Path(), help="The file (safetensors) or directory (hf) to write.")
@click.option(
    "--max-pool-gib",
    type=click.FloatRange(min=0, min_open=True),
    default=16.0,
    show_default=True,
    help="hf: the largest value pools (together) exported whole; larger ones are refused.",
)
def export(checkpoint, fmt, out, max_pool_gib):
    """Write the whole model (dense weights and every value pool, gathered) for other tools.

    safetensors: one file of every tensor. hf: a Hugging Face transformers model directory
    (config.json with auto_map, model.safetensors, modeling_memray.py, the run's tokenizer):
    AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True) loads it where
    memray-layers is installed. The pools are assembled in memory: for tables larger than RAM
    read memory.zarr directly.

    \b
    Example:
      memray export runs/demo --format safetensors --out demo.safetensors
      memray export runs/demo --format hf --out demo-hf
    """
    from safetensors.torch import save_file

    from memray.checkpoint.model import load_trained_model

    if fmt == "hf":
        from memray.integrations.hf import export_hf

        path = export_hf(checkpoint, out, max_pool_bytes=int(max_pool_gib * 2**30))
        click.echo(f"wrote {path}: a transformers model (AutoModelForCausalLM, trust_remote_code=True)")
        return

    model, _, ckpt, manifest = load_trained_model(checkpoint)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, out, metadata={"step": str(manifest["step"]), "checkpoint": str(ckpt)})
    click.echo(f"wrote {out}: {len(state)} tensors, {sum(v.numel() for v in state.values()):,} parameters and buffers")


@main.command()
@click.argument("checkpoint", type=click.Path())
@click.option("--n-keys", type=int, required=True, help="Keys per half after growing (slots: n_keys²).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run directory for the grown checkpoint.")
@click.option(
    "--ray",
    "on_ray",
    is_flag=True,
    help="Grow the pools as Ray tasks (on the cluster RAY_ADDRESS names, else an embedded "
    "local Ray); OUT must be shared storage.",
)
def grow(checkpoint, n_keys, out, on_ray):
    """Enlarge the product-key grid of CHECKPOINT's memory, keeping every learned slot.

    Slot (i, j) moves to i·M + j; new sub-keys and value rows start at zero so they do not
    disturb old lookups. The pools are grown chunk by chunk (a few chunks in memory at a
    time), on a few threads or as Ray tasks. Continue training with --resume OUT.

    \b
    Example:
      memray grow runs/demo --n-keys 256 --out runs/demo-256
      memray train demo --set model.memory.n_keys=256 --workers 4 --resume runs/demo-256
    """
    from memray.train.grow import grow_checkpoint

    map_files = None
    if on_ray:
        from memray.launch.tasks import map_files
    path = grow_checkpoint(checkpoint, n_keys, out, map_files=map_files)
    click.echo(f"{path}: n_keys {n_keys} ({n_keys * n_keys:,} slots)")


@main.command()
@click.option("--memory-params", required=True, help="Value-table parameters per pool: 128e9, 1.07B, 4M, 2000000.")
@click.option("--value-dim", default="4096", show_default=True, help="Value dim D.")
@click.option("--gpu-mem", required=True, help="Memory of one GPU: 80GiB, 80GB, 85899345920.")
@click.option(
    "--tokens-per-rank",
    default="16384",
    show_default=True,
    help="Tokens each rank processes per step (its micro-batch): sizes lookup buffers and traffic.",
)
@click.option("--heads", default="4", show_default=True, help="Memory heads.")
@click.option("--knn", default="32", show_default=True, help="Values read per head and token.")
@click.option("--memory-layers", default="3", show_default=True, help="Memory layers reading the pool(s).")
@click.option("--pools", default="1", show_default=True, help="Value pools (1: one pool shared by the layers).")
@click.option("--dtype", type=click.Choice(["bf16", "fp32"]), default="bf16", show_default=True, help="Value dtype.")
@click.option(
    "--optimizer",
    type=click.Choice(["rowwise_adagrad", "lazy_adam", "lazy_adamw", "sgd", "adamw"]),
    default="rowwise_adagrad",
    show_default=True,
    help="Value-table optimizer.",
)
@click.option("--dense-params", default="8e9", show_default=True, help="Dense-model parameters (ZeRO data parallel).")
@click.option("--world", help="Report at this many ranks instead of the fewest that hold it.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
def plan(as_json, dtype, optimizer, **options):
    """Per-GPU memory and all-to-all traffic of a sharded value table, row and column layouts.

    Memory is for the fullest rank (values, optimizer state, lookup buffers, the dense model
    under ZeRO), against 90% of --gpu-mem; traffic is what one rank sends per step.

    \b
    Example:
      memray plan --memory-params 128e9 --gpu-mem 80GiB
    """
    from memray.distributed.plan import BYTE_UNITS, COUNT_UNITS, format_plan, make_plan, parse_quantity

    values = {}
    for name, text in options.items():
        if text is not None:  # --world is optional
            units = BYTE_UNITS if name == "gpu_mem" else COUNT_UNITS
            minimum = 0 if name == "dense_params" else 1
            values[name] = parse_quantity(text, "--" + name.replace("_", "-"), units, minimum)
    if values["value_dim"] > values["memory_params"]:
        raise UserError(f"--value-dim: {values['value_dim']} is larger than --memory-params {values['memory_params']}")
    result = make_plan(dtype=dtype, optimizer=optimizer, **values)
    click.echo(json.dumps(result) if as_json else format_plan(result))


register_ray_commands(main)

if __name__ == "__main__":
    main()
