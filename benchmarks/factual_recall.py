"""The paper's claim at small scale: factual recall of memory vs dense vs MoE at matched compute.

A synthetic knowledge base (invented people x attributes -> values; the training sentence form
of each fact, and a paraphrased form that is never trained on; ``--style`` names, syllables or
numbers, or any facts file with ``--facts``) mixed with filler text (sentences from a small
random grammar; a held-out part of it measures validation loss). Every model trains on the same
corpus for the same tokens (the setting's passes over it), with the same optimizer settings, in
one process, once per seed:

* ``dense``: SwiGLU FFNs in every block, widened so its FLOPs per token equal Memory+'s;
* ``memory``: the FFN of one block past the middle replaced by a plain product-key memory;
* ``memory_plus``: the same with the SiLU gate and output projection and qk-norm (Memory+);
* ``memory_plus_shared``: Memory+ in up to three blocks (from block 1; every block of a model of
  fewer than 4), all reading one pool of the same size (more key scoring: more FLOPs);
* ``moe``: a top-2 mixture of experts in every block, its expert width and count solved so its
  active FLOPs per token and total parameters equal Memory+'s.

Reported per model (mean over seeds, and recall's standard error): exact-match recall of greedy
answers on the training prompts and on the paraphrased prompts (a seeded sample of the facts),
loss on held-out filler, parameters, FLOPs per token (``memray.model.flops``), tokens/s; the
floor every recall is to be read against (answering each attribute's commonest value, which
needs no memory of any fact); and the diagnosis of the memory: recall with the memory output
zeroed, how its slots are used by the facts, its score entropy, its queries' rank, and its
value-gradient norm over the dense one. Recall is measured at several points of training (recall
vs tokens); ``--sweep`` trains Memory+ at four memory sizes (the paper's Figure 1),
``--facts-sweep`` every model on knowledge bases of several sizes at the same passes (where
each saturates), ``--ablate`` Memory+ with one knob changed at a time. Results:
``benchmarks/results/<name>.csv`` (+ ``.md``, ``_curve.png``, ``_sizes.png``, ``_facts.png``);
the last line printed is JSON with every figure.

    python benchmarks/factual_recall.py --quick        # 1,000 facts, dense/Memory+/MoE, < 6 min
    python benchmarks/factual_recall.py                # 1,250 facts, five models x 2 seeds, < 30 min
    python benchmarks/factual_recall.py --style numbers            # the same with numeric answers
    python benchmarks/factual_recall.py --sweep --models dense --seeds 1   # recall vs memory size
    python benchmarks/factual_recall.py --facts-sweep --models dense,memory_plus,moe --seeds 1
    python benchmarks/factual_recall.py --quick --ablate --passes 30 --entities 250   # the recipe's knobs
    python benchmarks/factual_recall.py --facts F.jsonl   # any facts file of >= 1,000 facts
    python benchmarks/factual_recall.py --setting cuda --style numbers --device cuda   # a GPU, 40,000 facts
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import pathlib
import random
import statistics
import sys
import tempfile
import time

import torch

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import machine_info, synchronize, write_table  # noqa: E402

from memray.data import ByteTokenizer, generate_facts, read_facts  # noqa: E402
from memray.data.packing import IGNORE_INDEX, PackedBatches  # noqa: E402
from memray.data.synthetic import style_attributes  # noqa: E402
from memray.errors import InputError  # noqa: E402
from memray.evaluate import greedy_answers  # noqa: E402
from memray.model import count_parameters  # noqa: E402
from memray.model.flops import flops_per_token  # noqa: E402
from memray.train import Trainer, load_run_config  # noqa: E402
from memray.train.dense import summed_token_loss  # noqa: E402

NAME = "factual_recall"
MODELS = ("dense", "memory", "memory_plus", "memory_plus_shared", "moe")
MIN_FACTS = 1000  # a --facts file smaller than this is no test of capacity
SMALL = ["model.dim=64", "model.n_layers=2", "model.memory.k_dim=64"]
SETTINGS = {
    "quick": {
        "model": SMALL,
        "entities": 200,
        "attributes": 5,
        "filler": 10,
        "passes": 50,
        "batch": 32,
        "n_keys": 256,
        "eval_sample": 400,
        "points": 3,
        "seeds": 1,
        "models": ("dense", "memory_plus", "moe"),
        "sweep": (64, 128),
        "facts_sweep": (500,),
    },
    "full": {
        "model": SMALL,
        "entities": 250,
        "attributes": 5,
        "filler": 20,
        "passes": 60,
        "batch": 32,
        "n_keys": 256,
        "eval_sample": 1000,
        "points": 4,
        "seeds": 2,
        "models": MODELS,
        "sweep": (64, 128, 256, 512),
        "facts_sweep": (500, 2500),
    },
    # a GPU (--device cuda): the 2 x 64 backbone of "full" (0.18M dense parameters) against 32x
    # the facts at 100 passes, where the dense model's capacity should bind (2 bits per parameter,
    # the most a dense model stores, is ~360K bits: 40,000 facts of the numbers style)
    "cuda": {
        "model": SMALL,
        "entities": 8000,
        "attributes": 5,
        "filler": 200,
        "passes": 100,
        "batch": 256,
        "n_keys": 512,
        "eval_sample": 2000,
        "points": 4,
        "seeds": 1,
        "models": ("dense", "memory_plus", "moe"),
        "sweep": (128, 256, 512, 1024),
        "facts_sweep": (10000, 20000),
    },
    # the small-model comparison of earlier releases: 4 blocks of 128 dims, 4,000 facts, 800 steps
    "wide": {
        "model": [],
        "entities": 500,
        "attributes": 8,
        "filler": 250,
        "steps": 800,
        "batch": 32,
        "n_keys": 256,
        "eval_sample": 1000,
        "points": 4,
        "seeds": 1,
        "models": MODELS,
        "sweep": (32, 64, 128, 256, 512),
        "facts_sweep": (1000, 2000, 4000),
    },
}
# --ablate: Memory+ with one thing changed at a time (the memory's FLOPs change with heads, knn,
# k_dim and placement; each row reports its own)
ABLATIONS = {
    "base": [],
    "value_lr=0.01": ["model.memory.value_lr=0.01"],
    "value_lr=0.2": ["model.memory.value_lr=0.2"],
    "rowwise_adagrad": ["optim.value_optimizer=rowwise_adagrad"],
    "paper_adamw_1e-3": ["optim.value_optimizer=adamw", "model.memory.value_lr=0.001"],
    "heads=1,knn=32": ["model.memory.heads=1", "model.memory.knn=32"],
    "heads=8,knn=8": ["model.memory.heads=8", "model.memory.knn=8"],
    "k_dim=32": ["model.memory.k_dim=32"],
    "k_dim=128": ["model.memory.k_dim=128"],
    "no_qk_norm": ["model.memory.qk_norm=false"],
    "block_0": ["model.memory_layers=[0]"],
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


def memory_blocks(n_layers: int) -> tuple[int, list[int]]:
    """Where the memory sits in an ``n_layers`` model: one layer past the middle (block 2 of 4),
    and, for the shared pool, up to three blocks from block 1 on (the paper's best: 3 layers)."""
    one = min(n_layers // 2, n_layers - 1)
    shared = list(range(1, n_layers))[:3] if n_layers > 3 else list(range(n_layers))
    return one, shared


def model_overrides(name: str, n_keys: int, n_layers: int = 4) -> list[str]:
    one, shared = memory_blocks(n_layers)
    memory = [f"model.memory.n_keys={n_keys}"]
    plus = ["model.memory.swilu=true", "model.memory.qk_norm=true"]
    plain = ["model.memory.swilu=false", "model.memory.qk_norm=false"]
    return {
        "dense": ["model.memory_layers=[]"],
        "memory": [f"model.memory_layers=[{one}]", *memory, *plain],
        "memory_plus": [f"model.memory_layers=[{one}]", *memory, *plus],
        "memory_plus_shared": [
            f"model.memory_layers={shared}".replace(" ", ""),
            f"model.memory_pools={{shared: {shared}}}".replace(" ", ""),
            *memory,
            *plus,
        ],
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

    def width(flops_at) -> int:
        """The width whose FLOPs per token are closest to the target (FLOPs grow with width)."""
        lo, hi = 1, 64
        while flops_at(hi) < target_flops:
            lo, hi = hi, 2 * hi
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if flops_at(mid) < target_flops else (lo, mid)
        return min((lo, hi), key=lambda w: abs(flops_at(w) - target_flops))

    if name == "dense":
        return [f"model.ffn_hidden={width(lambda w: measure([f'model.ffn_hidden={w}'])[0])}"]
    if name == "moe":
        experts, hidden = 8, 64
        for _ in range(20):  # width from the FLOPs, count from the parameters, until both settle
            hidden = width(lambda w: measure([f"model.moe.num_experts={experts}", f"model.moe.hidden={w}"])[0])
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


def memory_layers(model) -> list:
    from memray.model.memory import ProductKeyMemory

    return [m for m in model.modules() if isinstance(m, ProductKeyMemory)]


@contextlib.contextmanager
def memory_zeroed(model):
    """Every memory layer's output replaced by zeros (the block keeps its attention and residual)."""
    hooks = [m.register_forward_hook(lambda _m, _i, out: torch.zeros_like(out)) for m in memory_layers(model)]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


def effective_rank(x: torch.Tensor) -> float:
    """exp(entropy) of the normalised singular values of ``x`` [n, d] (1: rank one, d: isotropic)."""
    s = torch.linalg.svdvals(x.double() - x.double().mean(0))
    p = s / s.sum().clamp_min(1e-30)
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


@torch.no_grad()
def memory_reads(model, facts) -> dict:
    """How the memory layers read the facts: at each prompt's last position (where the answer's
    first token is predicted), per layer then averaged: ``slots_used`` (share of the pool any of
    these facts selects), ``facts_per_slot`` (facts selecting a slot, over the slots selected),
    ``score_entropy`` (entropy of the softmax over the selected slots, over log(heads x knn)) and
    ``query_rank`` (effective rank of each head's queries over the facts, over k_dim)."""
    layers = memory_layers(model)
    if not layers:
        return {}
    tokenizer = ByteTokenizer()
    inputs = {id(m): [] for m in layers}
    hooks = [m.register_forward_pre_hook(lambda mod, args: inputs[id(mod)].append(args[0][:, -1])) for m in layers]
    was = model.training
    model.eval()
    try:
        encoded = [tokenizer.encode(f.prompt + tokenizer.prompt_suffix, bos=True) for f in facts]
        device = model.embed.weight.device
        for length in sorted({len(e) for e in encoded}):
            same = [e for e in encoded if len(e) == length]
            for start in range(0, len(same), 256):
                model(torch.tensor(same[start : start + 256], device=device))
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was)
    out = {"slots_used": [], "facts_per_slot": [], "score_entropy": [], "query_rank": []}
    for m in layers:
        x = torch.cat(inputs[id(m)]).float()
        c = m.config
        rows, scores = m.topk(x)  # [facts, heads, knn]
        weights = torch.softmax(scores.float(), -1).flatten(1) / c.heads
        slots = rows.flatten().unique()
        out["slots_used"].append(slots.numel() / c.num_slots)
        out["facts_per_slot"].append(rows.numel() / slots.numel())
        entropy = -(weights * weights.clamp_min(1e-30).log()).sum(-1).mean()
        out["score_entropy"].append(float(entropy) / math.log(c.heads * c.knn))
        queries = m._queries(x).flatten(2)  # [facts, heads, k_dim]
        out["query_rank"].append(sum(effective_rank(queries[:, h]) for h in range(c.heads)) / c.heads / c.k_dim)
    return {k: sum(v) / len(v) for k, v in out.items()}


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


def train_and_measure(name, overrides, corpus, facts, paraphrased, heldout, s, points, workdir, seed=0, device="cpu"):
    """Train one model on ``corpus`` for the setting's steps; recall of ``facts`` at ``points``.

    Returns (row, recall-vs-tokens curve). The row carries the diagnosis as well: recall with the
    memory output zeroed (does the memory hold the facts?), how the memory reads them
    (:func:`memory_reads`), and the value-gradient norm over the dense one (median of the last
    quarter of steps)."""
    config = load_run_config(
        "demo",
        [
            *BASE,
            *overrides,
            "data.source=text",
            f"data.path={corpus}",
            f"train.steps={s['steps']}",
            f"train.batch_size={s['batch']}",
            f"train.device={device}",
            f"seed={seed}",
        ],
    )
    trainer = Trainer(config, run_dir=workdir / f"{name}-{seed}", progress=False)
    counts = count_parameters(trainer.model)
    curve, seconds, tokens, ratios = [], 0.0, 0, []
    per_step = config.train.batch_size * config.data.seq_len
    while trainer.step < config.train.steps:
        inputs, targets = trainer.batches.next()
        start = time.perf_counter()
        metrics = trainer.train_step(inputs, targets)
        synchronize(trainer.device)
        seconds += time.perf_counter() - start
        tokens += per_step
        if trainer.step > 0.75 * config.train.steps and metrics.get("value_grad_norm"):
            ratios.append(metrics["value_grad_norm"] / max(metrics["grad_norm"], 1e-30))
        if trainer.step in points:
            point = {"model": name, "seed": seed, "step": trainer.step, "tokens": tokens}
            point["recall"] = recall(trainer.model, facts)
            curve.append(point)
            print(f"  {name} seed {seed} step {trainer.step}: recall {point['recall']:.3f}", flush=True)
    model = trainer.model
    row = {
        "model": name,
        "seed": seed,
        "params_total": counts["total"],
        "params_memory": counts["memory"],
        "flops_per_token": flops_per_token(config.model, config.data.seq_len)["total"],
        "tokens": tokens,
        "recall": curve[-1]["recall"],
        "recall_memory_off": None,
        "recall_paraphrase": recall(model, paraphrased) if paraphrased else None,
        "heldout_loss": heldout_loss(model, heldout, config.data.seq_len, trainer.tokenizer.pad_id),
        "tokens_per_s": tokens / seconds,
        "n_keys": config.model.memory.n_keys if config.model.memory_layers else None,
        "value_grad_ratio": statistics.median(ratios) if ratios else None,
    }
    if memory_layers(model):
        with memory_zeroed(model):
            row["recall_memory_off"] = recall(model, facts)
        row.update(memory_reads(model, facts))
    return row, curve


def mean_se(values: list[float]) -> tuple[float, float | None]:
    """Mean and standard error of the mean (None for a single value)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, statistics.stdev(values) / math.sqrt(len(values))


AGGREGATED = ("recall", "recall_memory_off", "recall_paraphrase", "heldout_loss", "tokens_per_s", "value_grad_ratio",
              "slots_used", "facts_per_slot", "score_entropy", "query_rank")  # fmt: skip


def aggregate(rows: list[dict]) -> list[dict]:
    """One row per model: the mean over its seeds of each measure, and the standard error of recall."""
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        runs = [r for r in rows if r["model"] == model]
        row = {k: v for k, v in runs[0].items() if k not in AGGREGATED and k != "seed"}
        row["seeds"] = len(runs)
        for key in AGGREGATED:
            values = [r[key] for r in runs if r.get(key) is not None]
            row[key], se = mean_se(values) if values else (None, None)
            if key == "recall":
                row["recall_se"] = se
        out.append(row)
    return out


def corpus(facts, s) -> tuple[str, int]:
    """The training text (every fact's sentence and the filler paragraphs) and its tokens."""
    paragraphs = [f.text for f in facts] + filler(s["filler"], seed=0)
    text = "\n\n".join(p.replace("\n", " ") for p in paragraphs) + "\n"
    return text, len(text.encode()) + 2 * len(paragraphs)  # bytes, and BOS + EOS per paragraph


def steps_for(s, corpus_tokens: int) -> int:
    """Steps of the setting: fixed, or enough for ``passes`` over a corpus of ``corpus_tokens``."""
    if s.get("passes"):
        return max(1, math.ceil(s["passes"] * corpus_tokens / (s["batch"] * 128)))
    return s["steps"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--setting", choices=sorted(SETTINGS), help="a named setting (default: full; quick with --quick)"
    )
    parser.add_argument("--facts", help="train and evaluate on this facts JSONL instead of the generated facts")
    parser.add_argument("--style", default="names", help="generated facts: names, syllables or numbers")
    parser.add_argument("--models", help=f"comma-separated, of {', '.join(MODELS)} (default: the setting's)")
    parser.add_argument("--seeds", type=int, help="training seeds per model (default: the setting's)")
    parser.add_argument("--sweep", action="store_true", help="also train Memory+ at each memory size")
    parser.add_argument(
        "--ablate",
        action="store_true",
        help=f"train Memory+ with each of these changes instead of the models: {', '.join(ABLATIONS)}",
    )
    parser.add_argument(
        "--facts-sweep",
        action="store_true",
        help="train each model on each fact count of the setting (recall vs facts)",
    )
    parser.add_argument("--steps", type=int, help="override the setting's training steps (no longer set by passes)")
    parser.add_argument("--passes", type=float, help="override the setting's passes over the corpus")
    parser.add_argument("--entities", type=int, help="override the number of invented people")
    parser.add_argument("--filler", type=int, help="override the number of filler paragraphs")
    parser.add_argument("--batch", type=int, help="override the batch size (sequences of 128 tokens)")
    parser.add_argument("--n-keys", type=int, help="override the memory's n_keys (the size every model is matched to)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config override applied to every model (repeatable), e.g. model.memory.value_lr=0.05",
    )
    parser.add_argument("--eval-sample", type=int, help="override the number of facts asked")
    parser.add_argument("--points", type=int, help="override the number of recall measurements during training")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument(
        "--name", help=f"file name stem of the results (CSV, Markdown, PNGs); default {NAME}_<setting>[_<style>]"
    )
    args = parser.parse_args()
    setting = args.setting or ("quick" if args.quick else "full")
    s = dict(SETTINGS[setting])
    if args.facts:
        style = pathlib.Path(args.facts).stem
    else:
        style = args.style
    args.name = args.name or f"{NAME}_{setting}" + ("" if style == "names" else f"_{style}")
    for key in ("steps", "passes", "eval_sample", "points", "entities", "filler", "batch", "n_keys", "seeds"):
        if getattr(args, key):
            s[key] = getattr(args, key)
    if args.steps:
        s["passes"] = None
    models = [m for m in (args.models or ",".join(s["models"])).split(",") if m]
    for m in models:
        if m not in MODELS:
            parser.error(f"unknown model {m!r}; one of {', '.join(MODELS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    torch.manual_seed(0)
    if args.facts:
        try:
            facts, paraphrased = read_facts(args.facts), None
        except InputError as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(2)
        if len(facts) < MIN_FACTS:
            print(
                f"error: {args.facts}: {len(facts)} facts, the benchmark needs at least {MIN_FACTS:,}", file=sys.stderr
            )
            sys.exit(2)
        counts, every_fact = [len(facts)], facts
    else:
        attrs = min(s["attributes"], len(style_attributes(style)))
        counts = sorted({*(s["facts_sweep"] if args.facts_sweep else ()), s["entities"] * attrs})
        # one knowledge base for every size: generated facts are entity-major and the first n
        # entities do not depend on how many are drawn, so each size is a prefix of the largest
        entities = max(s["entities"], math.ceil(counts[-1] / attrs))
        every_fact = generate_facts(entities, attrs, seed=0, style=style)
        paraphrased = generate_facts(entities, attrs, seed=0, template=1, style=style)
        facts = every_fact[: s["entities"] * attrs]
    tokenizer = ByteTokenizer()
    heldout = [tokenizer.encode(t, bos=True, eos=True) for t in filler(max(200, s["filler"] // 10), seed=1)]
    reference = [*BASE, *s["model"], *args.set, "model.memory_layers=[]"]
    n_layers = load_run_config("demo", reference).model.n_layers
    base = [*BASE, *s["model"], *args.set]
    ref_config = load_run_config("demo", [*base, *model_overrides("memory_plus", s["n_keys"], n_layers)])
    from memray.model import Transformer

    with torch.device("meta"):
        target_params = count_parameters(Transformer(ref_config.model))["total"]
    target_flops = flops_per_token(ref_config.model, 128)["total"]
    plan = {}
    for name in models:
        overrides = [*s["model"], *args.set, *model_overrides(name, s["n_keys"], n_layers)]
        plan[name] = overrides + matched(name, [*BASE, *overrides], target_flops, target_params, 128)
    if args.ablate:
        plus = [*s["model"], *args.set, *model_overrides("memory_plus", s["n_keys"], n_layers)]
        dense = [*s["model"], *args.set, *model_overrides("dense", s["n_keys"], n_layers)]
        dense += matched("dense", [*BASE, *dense], target_flops, target_params, 128)
        plan = {"dense": dense}  # the reference every change is read against
        plan.update({f"memory_plus[{k}]" if k != "base" else "memory_plus": plus + v for k, v in ABLATIONS.items()})
        plan["memory_plus_shared"] = [
            *s["model"],
            *args.set,
            *model_overrides("memory_plus_shared", s["n_keys"], n_layers),
        ]
        plan["memory"] = [*s["model"], *args.set, *model_overrides("memory", s["n_keys"], n_layers)]
        models = list(plan)
    for name in models:
        print(f"{name}: {' '.join(plan[name])}", flush=True)
    rows, curves, sizes, by_count = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = pathlib.Path(tmp)

        def run(name, overrides, kb, asked, asked_paraphrased, points_wanted, seed):
            path = workdir / f"corpus-{len(kb)}.txt"
            text, tokens = corpus(kb, s)
            path.write_text(text)
            setting = dict(s, steps=steps_for(s, tokens))
            points = {round(setting["steps"] * (k + 1) / points_wanted) for k in range(points_wanted)}
            row, curve = train_and_measure(
                name, overrides, path, asked, asked_paraphrased, heldout, setting, points, workdir, seed, args.device
            )
            row["facts"] = len(kb)
            print(json.dumps(row), flush=True)
            return row, curve

        for count in counts:
            kb = every_fact[:count]
            sample = random.Random(0).sample(range(len(kb)), min(s["eval_sample"], len(kb)))
            asked = [kb[i] for i in sample]
            asked_paraphrased = [paraphrased[i] for i in sample] if paraphrased else None
            main_run = count == len(facts)
            for name in models:
                for seed in range(s["seeds"] if main_run else 1):
                    row, curve = run(
                        name, plan[name], kb, asked, asked_paraphrased, s["points"] if main_run else 1, seed
                    )
                    (rows if main_run else by_count).append(row)
                    if main_run:
                        curves += curve
            if main_run:
                eval_facts = asked
                by_count += [r for r in rows if r["seed"] == 0]
        if args.sweep:
            for n_keys in s["sweep"]:
                overrides = [*s["model"], *args.set, *model_overrides("memory_plus", n_keys, n_layers)]
                for seed in range(s["seeds"]):
                    row, _ = run(f"memory_plus_{n_keys}", overrides, facts, eval_facts, None, 1, seed)
                    sizes.append(row)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary_rows = aggregate(rows)
    size_rows = aggregate(sizes)
    fields = [
        "model", "n_keys", "seeds", "params_total", "params_memory", "flops_per_token", "tokens", "recall", "recall_se",
        "recall_memory_off", "recall_paraphrase", "heldout_loss", "tokens_per_s", "value_grad_ratio", "slots_used",
        "facts_per_slot", "score_entropy", "query_rank",
    ]  # fmt: skip
    prior = prior_recall(facts, eval_facts)
    if prior is None:
        print(
            f"the floor cannot be known: fewer than {KNOWN_SHARE:.0%} of the evaluated facts share a relation "
            'template with another fact (give each an "attribute" field)',
            file=sys.stderr,
        )
    steps = steps_for(s, corpus(facts, s)[1])
    write_table(
        out,
        args.name,
        summary_rows + size_rows,
        fields,
        title=f"Factual recall at equal tokens ({len(facts):,} {style} facts, {steps} steps x {s['batch']} x 128 "
        f"tokens, setting {setting}, floor {'unknown' if prior is None else f'{prior:.3f}'}; recall: mean of "
        f"{s['seeds']} seed(s), recall_se its standard error)",
        machine=machine_info(torch.device(args.device)),
    )
    if args.facts_sweep:
        write_table(out, f"{args.name}_facts", by_count, ["model", "facts", "tokens", "recall", "recall_memory_off"],
                    title=f"Recall vs number of facts ({style}, {s.get('passes')} passes over each corpus, seed 0)",
                    machine=machine_info(torch.device(args.device)))  # fmt: skip
    by = {r["model"]: r for r in summary_rows}
    plot(out, args.name, curves, size_rows, prior, by.get("dense"), by_count if args.facts_sweep else [])
    summary = {
        "benchmark": NAME,
        "setting": setting,
        "style": style,
        "facts": len(facts),
        "seeds": s["seeds"],
        "tokens": summary_rows[0]["tokens"] if summary_rows else 0,
        "recall": {m: by[m]["recall"] for m in by},
        "recall_se": {m: by[m]["recall_se"] for m in by},
        "recall_memory_off": {m: by[m]["recall_memory_off"] for m in by if by[m]["recall_memory_off"] is not None},
        "recall_paraphrase": {m: by[m]["recall_paraphrase"] for m in by},
        "heldout_loss": {m: by[m]["heldout_loss"] for m in by},
        "flops_per_token": {m: by[m]["flops_per_token"] for m in by},
        "params": {m: by[m]["params_total"] for m in by},
        "recall_by_n_keys": {r["n_keys"]: r["recall"] for r in size_rows},
        "recall_by_facts": {f"{r['model']}@{r['facts']}": r["recall"] for r in by_count} if args.facts_sweep else {},
        "recall_prior": prior,
    }
    if "dense" in by and "memory_plus" in by and prior is not None:
        gain = by["dense"]["recall"] - prior
        summary["memory_plus_gain_over_dense"] = (by["memory_plus"]["recall"] - prior) / gain if gain > 0 else None
    print(json.dumps(summary))


def plot(
    out: pathlib.Path,
    name: str,
    curves: list[dict],
    sizes: list[dict],
    prior: float | None,
    dense: dict | None,
    by_count: list[dict] = (),
) -> None:
    """``_curve.png`` (recall vs tokens, mean over seeds), ``_sizes.png`` (Memory+ recall vs memory
    size), ``_facts.png`` (recall vs number of facts per model)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def save(fig, ax, suffix: str, **labels) -> None:
        if prior is not None:
            ax.axhline(prior, color="grey", linestyle="--", label="commonest answer (no memory)")
        ax.set(ylabel="exact-match recall", **labels)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / f"{name}_{suffix}.png", dpi=100)
        plt.close(fig)

    if curves:
        fig, ax = plt.subplots(figsize=(6, 4))
        for model in dict.fromkeys(c["model"] for c in curves):
            steps = sorted({c["tokens"] for c in curves if c["model"] == model})
            means = [mean_se([c["recall"] for c in curves if c["model"] == model and c["tokens"] == t]) for t in steps]
            ax.errorbar(
                [t / 1e6 for t in steps],
                [m for m, _ in means],
                yerr=[se or 0.0 for _, se in means],
                marker="o",
                capsize=3,
                label=model,
            )
        save(fig, ax, "curve", xlabel="training tokens (millions)", title="Recall vs training tokens")
    if sizes:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.errorbar(
            [r["params_memory"] / 1e6 for r in sizes],
            [r["recall"] for r in sizes],
            yerr=[r["recall_se"] or 0.0 for r in sizes],
            marker="o",
            capsize=3,
        )
        for r in sizes:
            ax.annotate(
                f"{r['n_keys']}², {r['flops_per_token'] / 1e6:.2f}M",
                (r["params_memory"] / 1e6, r["recall"]),
                fontsize=8,
            )
        if dense is not None:
            flops = dense["flops_per_token"] / 1e6
            ax.axhline(dense["recall"], color="black", label=f"dense, {flops:.2f}M FLOPs/token")
        save(
            fig,
            ax,
            "sizes",
            xscale="log",
            xlabel="memory parameters (millions)",
            title="Memory+ recall vs memory size (labels: slots, FLOPs/token)",
        )
    if by_count:
        fig, ax = plt.subplots(figsize=(6, 4))
        for model in dict.fromkeys(r["model"] for r in by_count):
            points = sorted((r["facts"], r["recall"]) for r in by_count if r["model"] == model)
            ax.plot([f for f, _ in points], [r for _, r in points], marker="o", label=model)
        save(
            fig,
            ax,
            "facts",
            xscale="log",
            xlabel="facts in the knowledge base",
            title="Recall vs number of facts (same passes over each)",
        )


if __name__ == "__main__":
    main()
