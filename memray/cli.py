"""The ``memray`` command line.

Exit codes: 0 success, 1 the run failed, 2 a usage or input error (one line naming the file, key
or value at fault; the traceback only with ``--debug``).
"""
from __future__ import annotations

import json
import sys

import click

from memray.errors import UserError


class _Group(click.Group):
    """Turns user errors into one line and exit code 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as exc:
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
def train(config, overrides, run_dir, no_progress):
    """Train a model from CONFIG: a bundled config name or a YAML file.

    \b
    Example:
      memray train tiny --set train.steps=50 --set model.memory.knn=16
    """
    from memray.train import Trainer, load_run_config

    run_config = load_run_config(config, list(overrides))
    trainer = Trainer(run_config, run_dir=run_dir, progress=not no_progress and sys.stderr.isatty())
    result = trainer.fit()
    click.echo(json.dumps(result))


@main.command(name="eval")
@click.argument("checkpoint", type=click.Path())
@click.option("--facts", "facts_path", required=True, type=click.Path(), help="Facts JSONL: {\"prompt\", \"answer\"} per line.")
@click.option("--limit", type=int, default=0, help="Evaluate only the first N facts (0: all).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def evaluate(checkpoint, facts_path, limit, as_json):
    """Exact-match recall of greedy answers to the facts in --facts.

    CHECKPOINT is a checkpoint directory or a run directory (its newest committed checkpoint).

    \b
    Example:
      memray eval runs/demo --facts runs/demo/data/facts.jsonl
    """
    from memray.data import read_facts
    from memray.evaluate import fact_recall
    from memray.train.trainer import load_trained_model

    facts = read_facts(facts_path)
    if limit > 0:
        facts = facts[:limit]
    model, _, ckpt, manifest = load_trained_model(checkpoint)
    result = fact_recall(model, facts)
    result.update(checkpoint=str(ckpt), step=manifest["step"])
    if as_json:
        click.echo(json.dumps(result))
        return
    click.echo(f"checkpoint {ckpt} (step {manifest['step']})")
    for ex in result["examples"]:
        mark = "ok " if ex["predicted"] == ex["answer"] else "xx "
        click.echo(f"  {mark}{ex['prompt']} -> {ex['predicted']!r} (answer {ex['answer']!r})")
    click.echo(f"recall {result['recall']:.3f} ({result['correct']}/{result['total']} facts, exact match)")


if __name__ == "__main__":
    main()
