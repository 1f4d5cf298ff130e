"""The paper's claim at small scale: factual recall of memory vs dense vs MoE at matched compute.

A synthetic knowledge base (invented people x attributes -> values; the training sentence form
of each fact, and a paraphrased form that is never trained on) mixed with filler text (sentences
from a small random grammar; a held-out part of it measures validation loss). Every model trains
on the same corpus for the same tokens, with the same optimizer settings, in one process:

* ``dense``: SwiGLU FFNs in every block, widened so its FLOPs per token equal Memory+'s;
* ``memory``: block 2's FFN replaced by a plain product-key memory;
* ``memory_plus``: the same with the SiLU gate and output projection and qk-norm (Memory+);
* ``memory_plus_shared``: Memory+ in blocks 1-3, all reading one pool of the same size;
* ``moe``: a top-2 mixture of experts in every block, its expert width and count solved so its
  active FLOPs per token and total parameters equal Memory+'s.

Reported per model: exact-match recall of greedy answers on the training prompts and on the
paraphrased prompts (a seeded sample of the facts), loss on held-out filler, parameters, FLOPs per
token (``memray.model.flops``), tokens/s; and the floor every recall is to be read against: the
recall of answering each attribute's commonest value, which needs no memory of any fact. Recall
is also measured at several points of training (recall vs tokens), and ``--sweep`` trains
Memory+ at n_keys from 32 to 512 (recall vs memory size, the analogue of the paper's Figure 1).
Results: ``benchmarks/results/<name>.csv`` (+ ``.md``, ``_curve.png``, ``_sizes.png``); the last
line printed is JSON with every figure.

    python benchmarks/factual_recall.py --quick       # 800 facts, 260 steps of 16 x 128 tokens, < 5 min
    python benchmarks/factual_recall.py               # 4,000 facts, 800 steps of 32 x 128 tokens, ~33 min
    python benchmarks/factual_recall.py --sweep --models dense --points 1 --name factual_recall_sizes
    python benchmarks/factual_recall.py --facts F.jsonl   # a given facts file (no paraphrases)
    python benchmarks/factual_recall.py --entities 2500 --filler 5000 --steps 1000   # the 20,000-fact budget
"""

from __future__ import annotations

import argparse
import json
import pathlib
import random
import sys
import tempfile
import time

import torch

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import machine_info, write_table  # noqa: E402

from memray.data import ByteTokenizer, generate_facts, read_facts  # noqa: E402
from memray.data.packing import IGNORE_INDEX, PackedBatches  # noqa: E402
from memray.evaluate import greedy_answers  # noqa: E402
from memray.model import count_parameters  # noqa: E402
from memray.model.flops import flops_per_token  # noqa: E402
from memray.train import Trainer, load_run_config  # noqa: E402
from memray.train.dense import summed_token_loss  # noqa: E402

NAME = "factual_recall"
MODELS = ("dense", "memory", "memory_plus", "memory_plus_shared", "moe")
# Each fact must be seen a few dozen times before any of these models answers it above the floor
# of guessing each attribute's commonest value: 20,000 facts at 4M tokens (about 6 passes) left
# every model at that floor, so the budgets below ask fewer facts, each seen about 20 times.
SETTINGS = {
    "quick": {
        "entities": 100,
        "attributes": 8,
        "filler": 20,
        "steps": 260,
        "batch": 16,
        "n_keys": 64,
        "eval_sample": 400,
        "points": 3,
        "sweep": (32, 64),
    },
    "full": {
        "entities": 500,
        "attributes": 8,
        "filler": 250,
        "steps": 800,
        "batch": 32,
        "n_keys": 256,
        "eval_sample": 1000,
        "points": 4,
        "sweep": (32, 64, 128, 256, 512),
    },
}
BASE = [
    "model.dim=128",
    "model.n_layers=4",
    "model.n_heads=4",
    "model.max_seq_len=128",
    "data.seq_len=128",
    "model.memory.heads=4",
    "model.memory.knn=16",
    "model.memory.k_dim=128",
    "model.memory.value_lr=0.05",
    "optim.lr=0.005",
    "optim.warmup_steps=20",
    "optim.value_optimizer=lazy_adam",
    "train.log_every=1000000",
]

_NOUNS = (
    "river",
    "garden",
    "window",
    "market",
    "letter",
    "mountain",
    "kitchen",
    "village",
    "engine",
    "forest",
    "library",
    "harbor",
    "bridge",
    "lantern",
    "meadow",
    "tower",
    "carpet",
    "island",
    "station",
    "orchard",
)
_ADJECTIVES = ("quiet", "old", "small", "bright", "narrow", "distant", "wooden", "green", "cold", "busy", "empty")
_VERBS = ("follows", "faces", "crosses", "hides", "reaches", "passes", "guards", "joins", "circles", "overlooks")
_PLACES = ("near", "behind", "beyond", "under", "beside", "above")


def filler(count: int, seed: int) -> list[str]:
    """Paragraphs of 2-4 sentences from a small grammar: text with structure but no facts."""
    rng = random.Random(f"filler-{seed}")

    def phrase():
        return f"the {rng.choice(_ADJECTIVES)} {rng.choice(_NOUNS)}"

    out = []
    for _ in range(count):
        sentences = [
            f"{phrase()} {rng.choice(_VERBS)} {phrase()} {rng.choice(_PLACES)} {phrase()}."
            for _ in range(rng.randint(2, 4))
        ]
        out.append(" ".join(s.capitalize() for s in sentences))
    return out


def model_overrides(name: str, n_keys: int) -> list[str]:
    memory = [f"model.memory.n_keys={n_keys}"]
    plus = ["model.memory.swilu=true", "model.memory.qk_norm=true"]
    plain = ["model.memory.swilu=false", "model.memory.qk_norm=false"]
    return {
        "dense": ["model.memory_layers=[]"],
        "memory": ["model.memory_layers=[2]", *memory, *plain],
        "memory_plus": ["model.memory_layers=[2]", *memory, *plus],
        "memory_plus_shared": ["model.memory_layers=[1,2,3]", "model.memory_pools={shared: [1,2,3]}", *memory, *plus],
        "moe": ["model.memory_layers=[]", "model.ffn=moe", "model.moe.top_k=2"],
    }[name]


def matched(name: str, config, target_flops: float, target_params: int, seq_len: int) -> list[str]:
    """Overrides that match ``dense`` to Memory+'s FLOPs and ``moe`` to its FLOPs and parameters."""
    from memray.model import Transformer

    def measure(extra):
        c = load_run_config("demo", [*config, *extra])
        with torch.device("meta"):
            params = count_parameters(Transformer(c.model))["total"]
        return flops_per_token(c.model, seq_len)["total"], params

    if name == "dense":
        lo, hi = 8, 4096
        while measure([f"model.ffn_hidden={hi}"])[0] < target_flops:  # wide models need wider FFNs
            lo, hi = hi, 2 * hi
        while hi - lo > 8:  # FLOPs grow with the FFN width: bisect it
            mid = (lo + hi) // 2 // 8 * 8
            lo, hi = (mid, hi) if measure([f"model.ffn_hidden={mid}"])[0] < target_flops else (lo, mid)
        return [f"model.ffn_hidden={lo}"]
    if name == "moe":
        experts, hidden = 8, 64
        for _ in range(20):  # width from the FLOPs, count from the parameters, until both settle
            lo, hi = 8, 4096
            while hi - lo > 8:
                mid = (lo + hi) // 2 // 8 * 8
                flops, _ = measure([f"model.moe.num_experts={experts}", f"model.moe.hidden={mid}"])
                lo, hi = (mid, hi) if flops < target_flops else (lo, mid)
            hidden = lo
            _, params = measure([f"model.moe.num_experts={experts}", f"model.moe.hidden={hidden}"])
            _, one_more = measure([f"model.moe.num_experts={experts + 1}", f"model.moe.hidden={hidden}"])
            new = max(2, experts + round((target_params - params) / max(one_more - params, 1)))
            if new == experts:
                break
            experts = new
        return [f"model.moe.num_experts={experts}", f"model.moe.hidden={hidden}"]
    return []


@torch.no_grad()
def heldout_loss(model, documents, seq_len: int, pad_id: int) -> float:
    batches = PackedBatches(documents, seq_len, 16, pad_id, seed=1)
    was = model.training
    model.eval()
    total, count = 0.0, 0
    for _ in range(batches.batches_per_epoch):
        inputs, targets = batches.next()
        total += float(summed_token_loss(model(inputs), targets))
        count += int((targets != IGNORE_INDEX).sum())
    model.train(was)
    return total / max(count, 1)


def recall(model, facts) -> float:
    tokenizer = ByteTokenizer()
    longest = max(len(tokenizer.encode(" " + f.answer)) for f in facts) + 1
    answers = greedy_answers(model, tokenizer, [f.prompt for f in facts], longest)
    return sum(a.strip() == f.answer.strip() for a, f in zip(answers, facts)) / len(facts)


MAX_ENTITY_WORDS = 4  # the longest entity name a facts file's prompts are searched for
KNOWN_SHARE = 0.9  # the floor is reported only when this share of the asked facts has a known attribute


def attributes(facts) -> list[str | None]:
    """Each fact's attribute: its ``attribute`` field when it has one, else the relation its
    prompt asks about, inferred as the template its prompt shares with the most others once one
    span of up to ``MAX_ENTITY_WORDS`` words (the entity) is taken out — "The headquarters of
    <entity> is in", wherever the name stands and however many words it has (ties: the template
    keeping more words). None when no other prompt shares any template: nothing to group with."""
    from collections import Counter

    def templates(prompt: str) -> set[str]:
        words = prompt.split()
        return {
            " ".join([*words[:i], "\0", *words[j:]])
            for i in range(len(words))
            for j in range(i + 1, min(len(words), i + MAX_ENTITY_WORDS) + 1)
            if j - i < len(words)  # some words of the relation stay
        }

    unlabelled = {f.prompt: templates(f.prompt) for f in facts if not f.meta.get("attribute")}
    shared = Counter(t for ts in unlabelled.values() for t in ts)
    out = []
    for f in facts:
        if f.meta.get("attribute"):
            out.append(str(f.meta["attribute"]))
            continue
        best = max(unlabelled[f.prompt], key=lambda t: (shared[t], len(t.split())), default=None)
        out.append(best if best is not None and shared[best] > 1 else None)
    return out


def prior_recall(facts, asked) -> float | None:
    """Recall of a model that knows no fact: the commonest answer of each attribute (the floor to
    beat), over the asked facts whose attribute is known (:func:`attributes`); None (the floor
    cannot be known) when fewer than ``KNOWN_SHARE`` of the asked facts have one."""
    from collections import Counter

    labels = attributes(facts)
    by_prompt = {f.prompt: a for f, a in zip(facts, labels)}
    counts: dict[str, Counter] = {}
    for f, a in zip(facts, labels):
        if a is not None:
            counts.setdefault(a, Counter())[f.answer] += 1
    known = [(f, by_prompt.get(f.prompt)) for f in asked]
    known = [(f, a) for f, a in known if a is not None]
    if not asked or len(known) < KNOWN_SHARE * len(asked):
        return None
    return sum(counts[a].most_common(1)[0][0] == f.answer for f, a in known) / len(known)


def train_and_measure(name, overrides, corpus, facts, paraphrased, heldout, s, points, workdir):
    config = load_run_config(
        "demo",
        [
            *BASE,
            *overrides,
            "data.source=text",
            f"data.path={corpus}",
            f"train.steps={s['steps']}",
            f"train.batch_size={s['batch']}",
        ],
    )
    trainer = Trainer(config, run_dir=workdir / name, progress=False)
    counts = count_parameters(trainer.model)
    curve, seconds, tokens = [], 0.0, 0
    per_step = config.train.batch_size * config.data.seq_len
    while trainer.step < config.train.steps:
        inputs, targets = trainer.batches.next()
        start = time.perf_counter()
        trainer.train_step(inputs, targets)
        seconds += time.perf_counter() - start
        tokens += per_step
        if trainer.step in points:
            point = {"model": name, "step": trainer.step, "tokens": tokens, "recall": recall(trainer.model, facts)}
            curve.append(point)
            print(f"  {name} step {trainer.step}: recall {curve[-1]['recall']:.3f}", flush=True)
    row = {
        "model": name,
        "params_total": counts["total"],
        "params_memory": counts["memory"],
        "flops_per_token": flops_per_token(config.model, config.data.seq_len)["total"],
        "tokens": tokens,
        "recall": curve[-1]["recall"],
        "recall_paraphrase": recall(trainer.model, paraphrased) if paraphrased else None,
        "heldout_loss": heldout_loss(trainer.model, heldout, config.data.seq_len, trainer.tokenizer.pad_id),
        "tokens_per_s": tokens / seconds,
        "n_keys": config.model.memory.n_keys if config.model.memory_layers else None,
    }
    return row, curve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--facts", help="train and evaluate on this facts JSONL instead of the generated facts")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--sweep", action="store_true", help="also train Memory+ at each memory size")
    parser.add_argument("--steps", type=int, help="override the setting's training steps")
    parser.add_argument("--entities", type=int, help="override the number of invented people (8 facts each)")
    parser.add_argument("--filler", type=int, help="override the number of filler paragraphs")
    parser.add_argument("--batch", type=int, help="override the batch size (sequences of 128 tokens)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config override applied to every model (repeatable), e.g. model.memory.value_lr=0.05",
    )
    parser.add_argument("--eval-sample", type=int, help="override the number of facts asked")
    parser.add_argument("--points", type=int, help="override the number of recall measurements during training")
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument(
        "--name", help=f"file name stem of the results (CSV, Markdown, PNGs); default {NAME}, {NAME}_quick with --quick"
    )
    args = parser.parse_args()
    s = dict(SETTINGS["quick" if args.quick else "full"])
    args.name = args.name or (f"{NAME}_quick" if args.quick else NAME)
    for key in ("steps", "eval_sample", "points", "entities", "filler", "batch"):
        if getattr(args, key):
            s[key] = getattr(args, key)
    torch.manual_seed(0)
    if args.facts:
        facts, paraphrased = read_facts(args.facts), None
    else:
        facts = generate_facts(s["entities"], s["attributes"], seed=0)
        paraphrased = generate_facts(s["entities"], s["attributes"], seed=0, template=1)
    sample = random.Random(0).sample(range(len(facts)), min(s["eval_sample"], len(facts)))
    eval_facts = [facts[i] for i in sample]
    eval_paraphrased = [paraphrased[i] for i in sample] if paraphrased else None
    tokenizer = ByteTokenizer()
    heldout = [tokenizer.encode(t, bos=True, eos=True) for t in filler(max(200, s["filler"] // 10), seed=1)]
    points = {round(s["steps"] * (k + 1) / s["points"]) for k in range(s["points"])}
    rows, curves = [], []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = pathlib.Path(tmp)
        corpus = workdir / "corpus.txt"
        paragraphs = [f.text for f in facts] + filler(s["filler"], seed=0)
        corpus.write_text("\n\n".join(p.replace("\n", " ") for p in paragraphs) + "\n")
        reference = [*BASE, *args.set, *model_overrides("memory_plus", s["n_keys"])]
        ref_config = load_run_config("demo", reference)
        from memray.model import Transformer

        with torch.device("meta"):
            target_params = count_parameters(Transformer(ref_config.model))["total"]
        target_flops = flops_per_token(ref_config.model, 128)["total"]
        for name in filter(None, args.models.split(",")):
            overrides = [*args.set, *model_overrides(name, s["n_keys"])]
            overrides += matched(name, [*BASE, *overrides], target_flops, target_params, 128)
            print(f"{name}: {' '.join(overrides) or 'base'}", flush=True)
            row, curve = train_and_measure(
                name, overrides, corpus, eval_facts, eval_paraphrased, heldout, s, points, workdir
            )
            rows.append(row)
            curves += curve
            print(json.dumps(row), flush=True)
        sizes = []
        if args.sweep:
            for n_keys in s["sweep"]:
                overrides = [*args.set, *model_overrides("memory_plus", n_keys)]
                row, _ = train_and_measure(
                    f"memory_plus_{n_keys}", overrides, corpus, eval_facts, None, heldout, s, {s["steps"]}, workdir
                )
                sizes.append(row)
                print(json.dumps(row), flush=True)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fields = [
        "model",
        "n_keys",
        "params_total",
        "params_memory",
        "flops_per_token",
        "tokens",
        "recall",
        "recall_paraphrase",
        "heldout_loss",
        "tokens_per_s",
    ]
    write_table(
        out,
        args.name,
        rows + sizes,
        fields,
        title=f"Factual recall at equal tokens ({len(facts):,} facts, {s['steps']} steps x {s['batch']} x 128 "
        f"tokens{', quick' if args.quick else ''})",
        machine=machine_info(),
    )
    prior = prior_recall(facts, eval_facts)
    if prior is None:
        print(
            f"the floor cannot be known: fewer than {KNOWN_SHARE:.0%} of the evaluated facts share a relation "
            'template with another fact (give each an "attribute" field)',
            file=sys.stderr,
        )
    by = {r["model"]: r for r in rows}
    plot(out, args.name, curves, sizes, prior, by.get("dense"))
    summary = {
        "benchmark": NAME,
        "facts": len(facts),
        "tokens": rows[0]["tokens"] if rows else 0,
        "recall": {m: by[m]["recall"] for m in by},
        "recall_paraphrase": {m: by[m]["recall_paraphrase"] for m in by},
        "heldout_loss": {m: by[m]["heldout_loss"] for m in by},
        "flops_per_token": {m: by[m]["flops_per_token"] for m in by},
        "params": {m: by[m]["params_total"] for m in by},
        "recall_by_n_keys": {r["n_keys"]: r["recall"] for r in sizes},
        "recall_prior": prior,
    }
    if "dense" in by and "memory_plus" in by:
        summary["memory_plus_over_dense"] = by["memory_plus"]["recall"] / max(by["dense"]["recall"], 1e-9)
    print(json.dumps(summary))


def plot(
    out: pathlib.Path, name: str, curves: list[dict], sizes: list[dict], prior: float | None, dense: dict | None
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if curves:
        fig, ax = plt.subplots(figsize=(6, 4))
        for model in dict.fromkeys(c["model"] for c in curves):
            points = [c for c in curves if c["model"] == model]
            ax.plot([p["tokens"] / 1e6 for p in points], [p["recall"] for p in points], marker="o", label=model)
        if prior is not None:
            ax.axhline(prior, color="grey", linestyle="--", label="commonest answer (no memory)")
        ax.set(xlabel="training tokens (millions)", ylabel="exact-match recall", title="Recall vs training tokens")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / f"{name}_curve.png", dpi=100)
        plt.close(fig)
    if sizes:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot([r["params_memory"] / 1e6 for r in sizes], [r["recall"] for r in sizes], marker="o")
        for r in sizes:
            ax.annotate(
                f"{r['n_keys']}², {r['flops_per_token'] / 1e6:.2f}M",
                (r["params_memory"] / 1e6, r["recall"]),
                fontsize=8,
            )
        if dense is not None:
            flops = dense["flops_per_token"] / 1e6
            ax.axhline(dense["recall"], color="black", label=f"dense, {flops:.2f}M FLOPs/token")
        if prior is not None:
            ax.axhline(prior, color="grey", linestyle="--", label="commonest answer (no memory)")
        ax.legend()
        ax.set(
            xscale="log",
            xlabel="memory parameters (millions)",
            ylabel="exact-match recall",
            title="Memory+ recall vs memory size (labels: slots, FLOPs/token)",
        )
        fig.tight_layout()
        fig.savefig(out / f"{name}_sizes.png", dpi=100)
        plt.close(fig)


if __name__ == "__main__":
    main()
