"""Teaching a trained model new facts without forgetting: the four modes of ``memray finetune``.

A base model (the demo config: one Memory+ layer, 2,000 invented-people facts, or ``--base RUN``)
is finetuned on ``--new`` facts about people it never saw, in each mode (full, lora, memory,
sparse-memory), for the same steps on the same batches, at each learning rate of the mode's
grid. Measured every few steps:

* new-fact recall: exact-match greedy recall of the new facts (what ``memray eval`` measures);
* retention: the old facts' recall over the base model's, on a seeded sample of the base facts
  split in two halves: the *tune* half picks each mode's learning rate, the *test* half is
  reported (so the figures are not those the choice was made on);
* the base data's loss: token loss on the test half's training sentences.

Every mode keeps the base run's optimizers (the demo: AdamW for dense parameters and adapters,
lazy Adam for the pools; ``--set optim.value_optimizer=sgd`` for another).
Each mode's learning rate (and sparse-memory's rows per step) is the entry of its grid that
reaches ``--target`` new-fact recall with the best retention on the tune half (the highest new
recall when none reaches it). Reported: the
chosen run's final figures, the forgetting (1 - retention) where each mode first reaches the
target recall (the matched comparison), and sparse-memory's forgetting over full finetuning's
there. Results: ``results/<name>.csv`` (every run), ``.md``, ``_curve.png`` (new-fact recall vs
retention over steps, chosen runs); the last line printed is JSON.

    python benchmarks/continual.py --quick     # 500-fact base, 100 new facts, one setting per mode: < 6 min
    python benchmarks/continual.py             # the demo base (2,000 facts), 200 new facts, 15 runs: ~20 min
    python benchmarks/continual.py --modes memory,sparse-memory --set optim.value_optimizer=lazy_adam \
        --lrs memory=0.003,0.01,0.03 --lrs sparse-memory=0.003,0.01,0.03 --name continual_adam   # Adam instead
    python benchmarks/continual.py --base runs/demo-run   # a base run already trained on generated facts
"""

from __future__ import annotations

import argparse
import json
import pathlib
import random
import sys
import time

import torch

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import machine_info, write_table  # noqa: E402

from memray.checkpoint import committed_checkpoints, find_checkpoint  # noqa: E402
from memray.data import ByteTokenizer, PackedBatches, generate_facts, read_facts, write_facts  # noqa: E402
from memray.data.packing import IGNORE_INDEX  # noqa: E402
from memray.evaluate import fact_recall  # noqa: E402
from memray.train import Trainer, load_run_config  # noqa: E402
from memray.train.dense import summed_token_loss  # noqa: E402
from memray.train.finetune import finetune_config  # noqa: E402

MODES = ("full", "lora", "memory", "sparse-memory")
# each mode's grid: the dense/adapter lr (full: the value pools at 10x, the demo's ratio) or the
# value pools' lr (memory modes; the base run's optimizer, lazy Adam for the demo), and
# sparse-memory's rows per step. --quick runs the entry listed first.
GRIDS = {
    "full": [{"lr": lr} for lr in (1e-4, 3e-5, 3e-4)],
    "lora": [{"lr": lr} for lr in (1e-3, 3e-4, 3e-3)],
    "memory": [{"lr": lr} for lr in (1e-2, 3e-3, 3e-2)],
    "sparse-memory": [{"lr": lr, "slots": t} for t in (3000, 1000) for lr in (1e-2, 3e-3, 3e-2)],
}
SETTINGS = {
    # base: the demo config on entities x 5 facts; new facts; finetuning steps; evaluations
    "full": {"entities": 400, "base_steps": 900, "new": 200, "steps": 100, "points": 10, "sample": 1000, "grid": 0},
    "quick": {"entities": 100, "base_steps": 400, "new": 100, "steps": 60, "points": 4, "sample": 300, "grid": 1},
}


def lr_overrides(mode: str, lr: float) -> list[str]:
    if mode == "full":
        return [f"optim.lr={lr}", f"model.memory.value_lr={10 * lr}"]
    if mode == "lora":
        return [f"optim.lr={lr}"]
    return [f"model.memory.value_lr={lr}"]


def base_loss(model, facts, seq_len: int) -> float:
    """Mean token loss of the facts' training sentences (fixed packing)."""
    tokenizer = ByteTokenizer()
    documents = [tokenizer.encode(f.text, bos=True, eos=True) for f in facts]
    batches = PackedBatches(documents, seq_len, 32, tokenizer.pad_id, seed=1)
    total, count = 0.0, 0
    with torch.no_grad():
        for _ in range(batches.batches_per_epoch):
            inputs, targets = batches.next()
            total += float(summed_token_loss(model(inputs), targets))
            count += int((targets != IGNORE_INDEX).sum())
    return total / max(count, 1)


def measure(model, new, tune, test, seq_len: int) -> dict:
    was = model.training
    model.eval()
    out = {
        "new_recall": fact_recall(model, new)["recall"],
        "old_tune": fact_recall(model, tune)["recall"],
        "old_test": fact_recall(model, test)["recall"],
        "base_loss": base_loss(model, test, seq_len),
    }
    model.train(was)
    return out


def train_base(workdir: pathlib.Path, s: dict) -> pathlib.Path:
    """The demo config on ``entities`` x 5 generated facts, trained once into ``workdir/base``."""
    run = workdir / "base"
    if committed_checkpoints(run / "checkpoints"):
        return run
    config = load_run_config(
        "demo", [f"data.num_entities={s['entities']}", f"train.steps={s['base_steps']}", "distributed.workers=0"]
    )
    Trainer(config, run_dir=run, progress=False).fit()
    return run


def new_facts(base_facts, count: int, seed: int, style: str, attributes: int):
    """``count`` facts about people absent from the base facts (the generator at another seed)."""
    known = {f.meta.get("entity") for f in base_facts}
    facts = [f for f in generate_facts(count, attributes, seed, style=style) if f.meta.get("entity") not in known]
    entities = 2 * count  # more people than needed: some names may repeat the base's
    while len(facts) < count:
        facts = [
            f for f in generate_facts(entities, attributes, seed, style=style) if f.meta.get("entity") not in known
        ]
        entities *= 2
    return facts[:count]


def finetune_run(base, new_path, mode, entry, s, args, workdir, new, tune, test, seq_len, before) -> dict:
    lr, slots = entry["lr"], entry.get("slots")
    overrides = [
        "distributed.workers=0",
        f"train.steps={s['steps']}",
        "train.tensorboard=false",
        f"seed={args.seed}",
        *args.overrides,
        *lr_overrides(mode, lr),
    ]
    options = {"slots_per_batch": slots} if mode == "sparse-memory" else {}
    if mode == "lora":
        options["lora_rank"] = args.lora_rank
    config = finetune_config(str(base), str(new_path), mode, overrides, **options)
    trainer = Trainer(
        config, run_dir=workdir / "runs" / (f"{mode}-{lr:g}" + (f"-t{slots}" if slots else "")), progress=False
    )
    every = max(1, s["steps"] // s["points"])
    curve = [{"step": 0, **before}]
    start = time.perf_counter()
    trainer.model.train()
    train_s = 0.0
    for step in range(1, s["steps"] + 1):
        t0 = time.perf_counter()
        trainer.train_step(*trainer.batches.next())
        train_s += time.perf_counter() - t0
        if step % every == 0 or step == s["steps"]:
            curve.append({"step": step, **measure(trainer.model, new, tune, test, seq_len)})
    last = curve[-1]
    row = {
        "mode": mode,
        "lr": lr,
        "slots": slots or "",
        "steps": s["steps"],
        "new_recall": last["new_recall"],
        "retention_tune": last["old_tune"] / max(before["old_tune"], 1e-9),
        "retention_test": last["old_test"] / max(before["old_test"], 1e-9),
        "base_loss": last["base_loss"],
        "base_loss_delta": last["base_loss"] - before["base_loss"],
        "trainable": trainer.finetune.trainable(),
        "train_s_per_step": train_s / s["steps"],
        "wall_s": time.perf_counter() - start,
        "curve": curve,
    }
    print(
        f"{mode:14s} lr {lr:<7g}"
        + (f" t {slots}" if slots else "")
        + f" new {row['new_recall']:.3f} retention tune {row['retention_tune']:.3f} "
        f"test {row['retention_test']:.3f} base loss {row['base_loss']:.3f} ({row['wall_s']:.0f} s)",
        flush=True,
    )
    return row


def at_target(row: dict, target: float, before: dict) -> dict | None:
    """The first evaluation where the run's new-fact recall reaches ``target``: step and forgetting."""
    for point in row["curve"]:
        if point["new_recall"] >= target:
            return {"step": point["step"], "forgetting": 1 - point["old_test"] / max(before["old_test"], 1e-9)}
    return None


def choose(rows: list[dict], target: float) -> dict:
    reached = [r for r in rows if r["new_recall"] >= target]
    if reached:
        return max(reached, key=lambda r: (r["retention_tune"], r["new_recall"]))
    return max(rows, key=lambda r: (r["new_recall"], r["retention_tune"]))


def plot(chosen: list[dict], path: pathlib.Path, target: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for row in chosen:
        before = row["curve"][0]["old_test"]
        xs = [p["new_recall"] for p in row["curve"]]
        ys = [p["old_test"] / max(before, 1e-9) for p in row["curve"]]
        slots = f", t {row['slots']}" if row["slots"] else ""
        ax.plot(xs, ys, marker="o", label=f"{row['mode']} (lr {row['lr']:g}{slots})")
    ax.axvline(target, color="grey", lw=0.8, ls="--")
    ax.axhline(0.9, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("new-fact recall")
    ax.set_ylabel("retention of old-fact recall (test half)")
    ax.set_title("finetuning on new facts, one point per evaluation")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--base", help="a trained base run directory (its data/facts.jsonl are the old facts)")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--new", type=int, help="new facts (default: the setting's)")
    parser.add_argument("--steps", type=int, help="finetuning steps (default: the setting's)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], help="a config override for every finetuning run"
    )
    parser.add_argument("--points", type=int, help="evaluations during finetuning (default: the setting's)")
    parser.add_argument("--lrs", action="append", default=[], metavar="MODE=LR,LR", help="a mode's lr grid")
    parser.add_argument("--slots", help="sparse-memory's grid of rows per pool and step: T,T")
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--target", type=float, default=0.9, help="new-fact recall the lr choice asks for")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default="runs/continual", help="where the base and the finetuned runs go")
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument("--name", help="result files' name (default continual, continual_quick)")
    args = parser.parse_args()

    s = dict(SETTINGS["quick" if args.quick else "full"])
    s["new"] = args.new or s["new"]
    s["steps"] = args.steps or s["steps"]
    s["points"] = args.points or s["points"]
    grids = {mode: GRIDS[mode][:1] if s["grid"] == 1 else GRIDS[mode] for mode in MODES}
    for item in args.lrs:
        mode, _, values = item.partition("=")
        grids[mode] = [{"lr": float(v)} for v in values.split(",")]
    if args.slots or any(item.startswith("sparse-memory=") for item in args.lrs):
        slots = [int(t) for t in (args.slots or "3000").split(",")]
        lrs = sorted({entry["lr"] for entry in grids["sparse-memory"]})
        grids["sparse-memory"] = [{"lr": lr, "slots": t} for t in slots for lr in lrs]
    modes = args.modes.split(",")
    workdir = pathlib.Path(args.workdir) / ("quick" if args.quick else "full")
    workdir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    started = time.perf_counter()

    base = pathlib.Path(args.base) if args.base else train_base(workdir, s)
    base_config = load_run_config(str(find_checkpoint(base) / "config.yaml"))
    old = read_facts(base / "data" / "facts.jsonl")
    d = base_config.data
    new = new_facts(old, s["new"], d.seed + 1000, d.style, d.num_attributes)
    new_path = workdir / "new.jsonl"
    write_facts(new_path, new)
    sample = random.Random(args.seed).sample(old, min(s["sample"], len(old)))
    tune, test = sample[: len(sample) // 2], sample[len(sample) // 2 :]

    from memray.checkpoint.model import load_trained_model

    before = measure(load_trained_model(base).model, new, tune, test, d.seq_len)
    print(f"base: new {before['new_recall']:.3f} old tune {before['old_tune']:.3f} test {before['old_test']:.3f}")

    rows = [
        finetune_run(base, new_path, mode, entry, s, args, workdir, new, tune, test, d.seq_len, before)
        for mode in modes
        for entry in grids[mode]
    ]
    chosen = [choose([r for r in rows if r["mode"] == mode], args.target) for mode in modes]
    for row in rows:
        row["chosen"] = any(row is c for c in chosen)
        hit = at_target(row, args.target, before)
        row["step_at_target"] = hit["step"] if hit else None
        row["forgetting_at_target"] = hit["forgetting"] if hit else None
    by_mode = {row["mode"]: row for row in chosen}
    summary = {
        "benchmark": "continual",
        "base_old_recall_test": before["old_test"],
        "base_loss": before["base_loss"],
        "new_facts": len(new),
        "steps": s["steps"],
        "target": args.target,
    }
    for mode, row in by_mode.items():
        summary[f"{mode}_lr"] = row["lr"]
        if row["slots"]:
            summary[f"{mode}_slots"] = row["slots"]
        summary[f"{mode}_new_recall"] = row["new_recall"]
        summary[f"{mode}_retention"] = row["retention_test"]
        summary[f"{mode}_forgetting_at_target"] = row["forgetting_at_target"]
    full, sparse = by_mode.get("full"), by_mode.get("sparse-memory")
    if full and sparse and full["forgetting_at_target"] and sparse["forgetting_at_target"] is not None:
        summary["sparse_over_full_forgetting"] = sparse["forgetting_at_target"] / full["forgetting_at_target"]
    summary["wall_s"] = time.perf_counter() - started
    summary["machine"] = machine_info()

    name = args.name or ("continual_quick" if args.quick else "continual")
    out = pathlib.Path(args.out)
    fields = [
        "mode",
        "lr",
        "slots",
        "chosen",
        "steps",
        "new_recall",
        "retention_test",
        "retention_tune",
        "step_at_target",
        "forgetting_at_target",
        "base_loss",
        "base_loss_delta",
        "trainable",
        "train_s_per_step",
    ]
    title = (
        f"Finetuning a base model ({len(old):,} facts, old recall {before['old_test']:.3f} on the test half) on "
        f"{len(new)} new facts for {s['steps']} steps in each mode; lr chosen per mode on the tune half "
        f"(target new recall {args.target}); lora: rank {args.lora_rank}"
        + (f"; overrides {' '.join(args.overrides)}." if args.overrides else ".")
    )
    write_table(out, name, rows, fields, title=title, machine=summary["machine"], summary=summary)
    (out / f"{name}_curves.json").write_text(json.dumps([{k: r[k] for k in ("mode", "lr", "curve")} for r in rows]))
    plot(chosen, out / f"{name}_curve.png", args.target)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
