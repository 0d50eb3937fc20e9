"""The report of a macro-iteration, built from the stage manifests in the store only (so any orchestrator, or a
later reader, makes the same one):

    <run>/report/iter-KK.json   counts and acceptance per stage, words of initial vs extended responses, training
                                loss, LonGen scores (and judge quality), collect; lengths of iterations 1..K
    <run>/report/iter-KK.md     the same as Markdown (what `selflengthen run` prints)
    <run>/report/lengths.png    response length per iteration, 1..K (matplotlib, when installed), with the
                                LongWrite-Ruler maximum output length
    <run>/report/loss.png       training loss of both roles, mean per epoch, iterations 1..K
    <run>/report/longbench-write.png   LongBench-Write: required against produced length (log-log), a colour per
                                iteration's Generator

The local runner writes it after each iteration; `selflengthen stage` after every stage it runs, so on a cluster
the last Job of an iteration leaves the complete report. matplotlib is imported only to draw the plot: the
operator image, which lacks it, imports this module fine and skips the PNG.
"""

from __future__ import annotations

import io
import logging
import math

from .artifacts import StageArtifacts
from .config import RunConfig
from .layout import iteration_report_name, report_key
from .stages import RUN_STAGES, STAGES, RunArtifacts
from .store import Store, write_json

log = logging.getLogger("selflengthen.report")

ITERATION_STAGES = tuple(s for s in STAGES if s not in RUN_STAGES)
PLOT = "lengths.png"
LOSS_PLOT = "loss.png"  # the training loss, mean per epoch, of both roles over the iterations
SCATTER = "longbench-write.png"
# The plotted series: (key in a history row, legend label, line style: a colour per kind of response, solid for
# averages, dotted for maxima).
SERIES = (
    ("initialAverage", "initial responses, average", "C0-"),
    ("extendedAverage", "extended responses, average", "C1-"),
    ("initialMax", "initial responses, max", "C0:"),
    ("extendedMax", "extended responses, max", "C1:"),
    ("longenAverage", "LonGen answers, average", "C2--"),
    ("heldoutBefore", "held-out prompts, before training", "C4--"),
    ("heldoutAfter", "held-out prompts, after training", "C4-"),
    ("rulerMax", "LongWrite-Ruler, max output (LongWriter's count)", "C3-."),
)


def expected_stages(config: RunConfig) -> tuple[str, ...]:
    return tuple(s for s in ITERATION_STAGES if s != "evaluate" or config.evaluate.enabled)


def iteration_manifests(store: Store, config: RunConfig, iteration: int) -> dict[str, dict]:
    """The manifests of the iteration's finished stages, in iteration order."""
    found = {}
    for stage in ITERATION_STAGES:
        artifacts = StageArtifacts(store, config.name, iteration, stage)
        if artifacts.done():
            found[stage] = artifacts.manifest()
    return found


def collect_manifest(store: Store, config: RunConfig, iteration: int, stage: str = "collect") -> dict | None:
    """A run-level stage's manifest (collect, the length-following ones) when it ran on this iteration's models."""
    artifacts = RunArtifacts(store, config.name, iteration, stage)
    if not artifacts.done():
        return None
    manifest = artifacts.manifest()
    return manifest if manifest.get("iteration") == iteration and manifest.get("enabled", True) else None


def headline(evaluate: dict | None) -> dict:
    """An evaluation's numbers that the length-following comparison puts side by side."""
    evaluate = evaluate or {}
    scores = evaluate.get("scores") or {}
    lbw = evaluate.get("longbenchWrite") or {}
    return {"longen": scores.get("overall"), "byType": scores.get("byType") or {},
            "byLanguage": scores.get("byLanguage") or {}, "longenAverageWords": evaluate.get("averageWords"),
            "sl": (lbw.get("sl") or {}).get("overall"), "sq": (lbw.get("sq") or {}).get("overall"),
            "maxOutputLength": (evaluate.get("ruler") or {}).get("maxLength")}


def length_following_section(store: Store, config: RunConfig, iteration: int, before: dict | None) -> dict | None:
    """The length-following step of the last iteration: its training, and its model's evaluation beside the
    iteration's Generator's (LonGen per type and per language, S_l, S_q, maximum output length)."""
    train = collect_manifest(store, config, iteration, "train-length-following")
    if train is None:
        return None
    after = collect_manifest(store, config, iteration, "evaluate-length-following")
    return {"training": {"mode": train.get("mode"), "steps": train.get("steps"),
                         "examples": (train.get("counts") or {}).get("accepted"),
                         "examplesBySource": train.get("examplesBySource") or {}, "firstLoss": train.get("firstLoss"),
                         "finalLoss": train.get("finalLoss"), "trainSeconds": train.get("trainSeconds")},
            "before": headline(before) if before and before.get("enabled", True) else None,
            "after": headline(after) if after else None}


def _rate(accepted: object, requested: object) -> float | None:
    if isinstance(accepted, int | float) and isinstance(requested, int | float) and requested:
        return round(accepted / requested, 4)
    return None


def stage_row(manifest: dict) -> dict:
    counts = manifest.get("counts") or {}
    requested, accepted = counts.get("requested"), counts.get("accepted")
    return {"requested": requested, "accepted": accepted, "acceptance": _rate(accepted, requested),
            "requests": counts.get("requests"), "rejected": dict(counts.get("rejected") or {}),
            "durationSeconds": manifest.get("durationSeconds")}


def lengths_of(manifests: dict[str, dict]) -> dict:
    """Words of the initial responses (respond) and of the extended ones (extend), of the LonGen answers, and of the
    Generator's answers to the held-out prompts before (respond) and after (evaluate) the iteration's training."""
    respond, extend, evaluate = (manifests.get(s) or {} for s in ("respond", "extend", "evaluate"))
    return {
        "initialAverage": respond.get("averageWords"),
        "initialMax": respond.get("maxWords"),
        "extendedAverage": extend.get("averageWords"),
        "extendedMax": extend.get("maxWords"),
        # the initial responses that were extended (drop-short keeps a different subset of them)
        "extendedFromAverage": extend.get("averageWordsInitial"),
        "growth": extend.get("growth"),
        "longenAverage": evaluate.get("averageWords") if evaluate.get("enabled", True) else None,
        "longenScore": ((evaluate.get("scores") or {}).get("overall")) if evaluate.get("enabled", True) else None,
        "heldoutBefore": (respond.get("heldout") or {}).get("averageWords"),
        "heldoutAfter": (evaluate.get("heldout") or {}).get("averageWords"),
    }


def epoch_losses_of(manifests: dict[str, dict]) -> dict:
    """Each trained role's mean loss per epoch (the training manifest's epochLosses)."""
    return {f"{role}EpochLosses": (manifests.get(f"train-{role}") or {}).get("epochLosses")
            for role in ("generator", "extender")}


def benchmarks_of(manifests: dict[str, dict]) -> dict:
    """The headline benchmark numbers of an iteration's evaluation: LonGen, S_l, S_q, maximum output length."""
    evaluate = manifests.get("evaluate") or {}
    if not evaluate.get("enabled", True):
        evaluate = {}
    lbw, ruler = evaluate.get("longbenchWrite") or {}, evaluate.get("ruler") or {}
    return {"longbenchSl": (lbw.get("sl") or {}).get("overall"), "longbenchSq": (lbw.get("sq") or {}).get("overall"),
            "rulerMax": ruler.get("maxLength")}


def longbench_section(evaluate: dict | None) -> tuple[dict | None, dict | None]:
    """The report's LongBench-Write and LongWrite-Ruler sections of an evaluate manifest (without the points)."""
    if not evaluate or not evaluate.get("enabled", True):
        return None, None
    lbw, ruler = evaluate.get("longbenchWrite"), evaluate.get("ruler")
    if lbw:
        lbw = {"model": evaluate.get("model"), **{k: v for k, v in lbw.items() if k != "points"}}
    return lbw or None, ruler or None


def build_report(store: Store, config: RunConfig, iteration: int, *, history_to: int | None = None) -> dict:
    """The report of one iteration (a JSON document); history covers iterations 1..history_to (default: this
    one), stopping at the first iteration that has not started."""
    manifests = iteration_manifests(store, config, iteration)
    history = []
    for k in range(1, (history_to or iteration) + 1):
        found = manifests if k == iteration else iteration_manifests(store, config, k)
        if not found:
            break
        history.append({"iteration": k, **lengths_of(found), **epoch_losses_of(found), **benchmarks_of(found)})
    training = {}
    for stage in ("train-generator", "train-extender"):
        m = manifests.get(stage)
        if m:
            training[stage.removeprefix("train-")] = {
                "mode": m.get("mode"), "steps": m.get("steps"), "examples": (m.get("counts") or {}).get("accepted"),
                "firstLoss": m.get("firstLoss"), "finalLoss": m.get("finalLoss"), "trainSeconds": m.get("trainSeconds"),
                "epochLosses": m.get("epochLosses"),
                # examples over training.cutoffTokens: the prompt cut, or left out (an answer is never cut)
                "promptCut": (m.get("counts") or {}).get("promptCut"),
                "droppedOverLength": (m.get("counts") or {}).get("droppedOverLength"),
            }
    evaluate = manifests.get("evaluate")
    longen = None
    if evaluate and evaluate.get("enabled", True):
        scores = evaluate.get("scores") or {}
        counts = evaluate.get("counts") or {}
        # evaluate's items are those of all three benchmarks (byBenchmark); a manifest without it had LonGen's only
        longen = {"model": evaluate.get("model"), "items": (counts.get("byBenchmark") or {}).get("longen",
                                                                                              counts.get("accepted")),
                  "overall": scores.get("overall"), "byType": scores.get("byType") or {},
                  "byLanguage": scores.get("byLanguage") or {}, "averageWords": evaluate.get("averageWords"),
                  "maxWords": evaluate.get("maxWords"), "quality": evaluate.get("quality")}
    longbench_write, ruler = longbench_section(evaluate)
    collect = collect_manifest(store, config, iteration)
    stages = {s: stage_row(m) for s, m in manifests.items()}
    if collect:
        stages["collect"] = stage_row(collect)
    for stage in ("train-length-following", "evaluate-length-following"):
        if (found := collect_manifest(store, config, iteration, stage)) is not None:
            stages[stage] = stage_row(found)
    length_following = length_following_section(store, config, iteration, evaluate)
    expected = expected_stages(config)
    return {
        "run": config.name,
        "iteration": iteration,
        "iterations": config.iterations,
        "complete": all(s in manifests for s in expected),
        "pending": [s for s in expected if s not in manifests],
        "stages": stages,
        "lengths": lengths_of(manifests),
        "training": training,
        "longen": longen,
        "longbenchWrite": longbench_write,
        "ruler": ruler,
        "lengthFollowing": length_following,
        "collect": None if collect is None else {
            "requested": (collect.get("counts") or {}).get("requested"),
            "accepted": (collect.get("counts") or {}).get("accepted"),
            "extended": (collect.get("counts") or {}).get("extended"),
            "byType": collect.get("byType") or {}, "byLanguage": collect.get("byLanguage") or {},
            "bySource": collect.get("bySource") or {},
            "averageWordsInitial": collect.get("averageWordsInitial"), "averageWords": collect.get("averageWords"),
            "maxWords": collect.get("maxWords"), "output": collect.get("output"),
        },
        # requests that did not fit the server's context, per stage (their items rejected, the stage went on)
        "contextRejected": {s: r["rejected"]["context"] for s, r in stages.items() if r["rejected"].get("context")},
        "history": history,
    }


# -- Markdown ---------------------------------------------------------------------------------------------------


def _fmt(value: object, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "-" if not math.isfinite(value) else f"{value:.{digits}f}"
    return str(value)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def render_markdown(report: dict) -> str:
    k, n = report["iteration"], report["iterations"]
    lines = [f"# Run {report['run']}: iteration {k} of {n}"
             + ("" if report["complete"] else f" (in progress: {', '.join(report['pending'])} to do)"), ""]
    lines += ["| stage | requested | accepted | acceptance | requests | rejected tries | seconds |",
              "|---|---:|---:|---:|---:|---|---:|"]
    for stage, row in report["stages"].items():
        rejected = ", ".join(f"{r} {c}" for r, c in sorted(row["rejected"].items())) or "-"
        lines.append(f"| {stage} | {_fmt(row['requested'])} | {_fmt(row['accepted'])} | {_pct(row['acceptance'])} "
                     f"| {_fmt(row['requests'])} | {rejected} | {_fmt(row['durationSeconds'])} |")
    over = report.get("contextRejected") or {}
    if over:
        lines += ["", "Requests that did not fit the server's context (their items rejected, counted above): "
                  + ", ".join(f"{s} {n}" for s, n in over.items()) + "."]
    ln = report["lengths"]
    lines += ["", "## Response length (words)", "", "| responses | average | max |", "|---|---:|---:|",
              f"| initial | {_fmt(ln['initialAverage'])} | {_fmt(ln['initialMax'])} |",
              f"| extended | {_fmt(ln['extendedAverage'])} | {_fmt(ln['extendedMax'])} |"]
    if ln["growth"] is not None:
        lines += ["", f"Extension grew the responses it kept {ln['growth']:.2f}x "
                      f"({_fmt(ln['extendedFromAverage'])} -> {_fmt(ln['extendedAverage'])} words on average)."]
    if report["training"]:
        lines += ["", "## Training", "",
                  "| model | mode | steps | examples | epochs | mean loss, first epoch -> last epoch | seconds |",
                  "|---|---|---:|---:|---:|---|---:|"]
        for role, t in report["training"].items():
            epochs = t.get("epochLosses") or []
            loss = f"{_fmt(epochs[0], 3)} -> {_fmt(epochs[-1], 3)}" if epochs else "-"
            lines.append(f"| {role} | {_fmt(t['mode'])} | {_fmt(t['steps'])} | {_fmt(t['examples'])} "
                         f"| {len(epochs) or '-'} | {loss} | {_fmt(t['trainSeconds'])} |")
        over = [f"{role} {t.get('promptCut') or 0} with the prompt cut, {t.get('droppedOverLength') or 0} left out"
                for role, t in report["training"].items() if t.get("promptCut") or t.get("droppedOverLength")]
        if over:
            lines += ["", "Examples over `training.cutoffTokens` (no answer is ever cut): " + "; ".join(over) + "."]
    lg = report["longen"]
    if lg:
        by_type = ", ".join(f"{t} {_fmt(v, 3)}" for t, v in lg["byType"].items()) or "-"
        lines += ["", "## LonGen", "", f"Length-following score **{_fmt(lg['overall'], 3)}** on {_fmt(lg['items'])} "
                  f"items (by type: {by_type}); answers average {_fmt(lg['averageWords'])} words, max "
                  f"{_fmt(lg['maxWords'])}."]
        q = lg.get("quality")
        if q:
            lines.append("")
            lines.append(f"Judge quality ({q['model']}): mean **{_fmt(q['mean'], 2)}** / 10 on {q['scored']} answers"
                         + (f" ({q['unparsed']} without a readable score)." if q["unparsed"] else "."))
    lines += longbench_markdown(report.get("longbenchWrite"), report.get("ruler"))
    lines += length_following_markdown(report.get("lengthFollowing"))
    c = report["collect"]
    if c:
        types = ", ".join(f"{t} {v}" for t, v in sorted(c["byType"].items())) or "-"
        lines += ["", "## Collect", "", f"{_fmt(c['accepted'])} of {_fmt(c['requested'])} pairs kept "
                  f"({_fmt(c['extended'])} extended), average {_fmt(c['averageWords'])} words, max "
                  f"{_fmt(c['maxWords'])}; length demands: {types}"
                  + (f"; sources: {', '.join(f'{s} {n}' for s, n in c['bySource'].items())}"
                     if c.get("bySource") else "") + f". SFT data: `{c['output']}`."]
    if ln.get("heldoutBefore") is not None or ln.get("heldoutAfter") is not None:
        lines += ["", f"Held-out prompts (never trained on): the Generator answered with {_fmt(ln['heldoutBefore'])} "
                      f"words on average before this iteration's training, {_fmt(ln['heldoutAfter'])} after it."]
    # growth: the kept extensions' average over the average of the initial responses they were made from
    lines += ["", "## Lengths per iteration (words)", "",
              "| iteration | initial avg | initial max | extended avg | extended max | accepted growth "
              "| held-out before | held-out after | LonGen avg | LonGen score |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for h in report["history"]:
        growth = "-" if h.get("growth") is None else f"x{h['growth']:.2f}"
        lines.append(f"| {h['iteration']} | {_fmt(h['initialAverage'])} | {_fmt(h['initialMax'])} "
                     f"| {_fmt(h['extendedAverage'])} | {_fmt(h['extendedMax'])} | {growth} "
                     f"| {_fmt(h.get('heldoutBefore'))} | {_fmt(h.get('heldoutAfter'))} | {_fmt(h['longenAverage'])} "
                     f"| {_fmt(h['longenScore'], 3)} |")
    if any(h.get(key) is not None for h in report["history"] for key in ("longbenchSl", "rulerMax")):
        lines += ["", "## Benchmarks per iteration", "",
                  "| iteration | LonGen score | LongBench-Write S_l | S_q | max output length |",
                  "|---:|---:|---:|---:|---:|"]
        for h in report["history"]:
            lines.append(f"| {h['iteration']} | {_fmt(h['longenScore'], 3)} | {_fmt(h.get('longbenchSl'))} "
                         f"| {_fmt(h.get('longbenchSq'))} | {_fmt(h.get('rulerMax'))} |")
    if report.get("plot"):
        lines += ["", f"![Response length per iteration]({PLOT})"]
    if report.get("lossPlot"):
        lines += ["", f"![Training loss per epoch]({LOSS_PLOT})"]
    if report.get("scatter"):
        lines += ["", f"![LongBench-Write: required against produced length]({SCATTER})"]
    return "\n".join(lines) + "\n"


def length_following_markdown(lf: dict | None) -> list[str]:
    if not lf:
        return []
    tr = lf["training"]
    sources = ", ".join(f"`{s}` {n}" for s, n in tr["examplesBySource"].items()) or "-"
    lines = ["", "## Length following", "",
             f"The last Generator fine-tuned on collect's length demands mixed with its Generator set: "
             f"{_fmt(tr['examples'])} examples ({sources}), {_fmt(tr['steps'])} steps ({_fmt(tr['mode'])}), loss "
             f"{_fmt(tr['firstLoss'], 3)} -> {_fmt(tr['finalLoss'], 3)}, {_fmt(tr['trainSeconds'])} s."]
    before, after = lf["before"] or {}, lf["after"] or {}
    if not after:
        return lines + ["", "Its evaluation has not run (evaluate.enabled, evaluate-length-following)."]
    rows = [("LonGen score", "longen", None, 3)]
    rows += [(f"LonGen {k}", "byType", k, 3) for k in dict.fromkeys([*before.get("byType", {}), *after["byType"]])]
    rows += [(f"LonGen {k}", "byLanguage", k, 3)
             for k in dict.fromkeys([*before.get("byLanguage", {}), *after["byLanguage"]])]
    rows += [("LonGen answers, average words", "longenAverageWords", None, 1),
             ("LongBench-Write S_l", "sl", None, 1), ("LongBench-Write S_q", "sq", None, 1),
             ("max output length (LongWriter's count)", "maxOutputLength", None, 1)]
    lines += ["", "| | before (last iteration's Generator) | after (length-following) |", "|---|---:|---:|"]
    for label, key, sub, digits in rows:
        b, a = before.get(key), after.get(key)
        if sub is not None:
            b, a = (b or {}).get(sub), (a or {}).get(sub)
        if b is None and a is None:
            continue
        lines.append(f"| {label} | {_fmt(b, digits)} | {_fmt(a, digits)} |")
    return lines


def longbench_markdown(lbw: dict | None, ruler: dict | None) -> list[str]:
    lines = []
    if lbw:
        sl = lbw.get("sl") or {}
        langs = ", ".join(f"{k} {_fmt(v)}" for k, v in (sl.get("byLanguage") or {}).items()) or "-"
        lines += ["", "## LongBench-Write", "",
                  f"Length score S_l **{_fmt(sl.get('overall'))}** / 100 on {_fmt(lbw.get('items'))} items (by "
                  f"language: {langs}); answers average {_fmt(lbw.get('averageLength'))}, max "
                  f"{_fmt(lbw.get('maxLength'))}. Lengths are LongWriter's count (Chinese characters + English "
                  "words), not the word count of the other sections.", ""]
        buckets = sl.get("byBucket") or {}
        lines += ["| required length | " + " | ".join(buckets) + " |", "|---|" + "---:|" * len(buckets),
                  "| S_l | " + " | ".join(_fmt(v) for v in buckets.values()) + " |"]
        sq = lbw.get("sq")
        if sq:
            dims = ", ".join(f"{k} {_fmt(v, 2)}" for k, v in (sq.get("dimensions") or {}).items()) or "-"
            lines += ["", f"Quality S_q ({sq['model']}, six dimensions rated 1-5, x20): **{_fmt(sq['overall'])}** "
                          f"on {sq['scored']} answers ({dims}); S = (S_l + S_q) / 2 = **{_fmt(lbw.get('s'))}**."]
    if ruler:
        per = ", ".join(f"{k}: {_fmt(v['max'])}" for k, v in (ruler.get("byRequired") or {}).items()) or "-"
        lines += ["", "## LongWrite-Ruler", "",
                  f"Maximum output length **{_fmt(ruler.get('maxLength'))}** (LongWriter's count) over "
                  f"{_fmt(ruler.get('items'))} prompts; the longest answer per length asked for: {per}."]
    return lines


# -- plot -----------------------------------------------------------------------------------------------------


def plot_series(history: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """The points drawn: per series, (iteration, words) where the iteration has that value."""
    return {key: [(h["iteration"], float(h[key])) for h in history if isinstance(h.get(key), int | float)]
            for key, _, _ in SERIES}


def _axes(size: tuple[float, float]):
    """A Figure on an Agg canvas (no pyplot state) and its one Axes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=100)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _finish(fig, ax, xlabel: str, ylabel: str, title: str, grid: str = "major"):
    """Labels, title, grid and (when anything was drawn) the legend, as every report figure has them."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3, which=grid)
    if ax.get_lines() or ax.collections:
        ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def length_figure(history: list[dict]):
    """A matplotlib Figure (Agg canvas, no pyplot state) of response length per iteration."""
    fig, ax = _axes((7, 4.2))
    for key, label, style in SERIES:
        points = plot_series(history)[key]
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], style, marker="o", label=label, gid=key)
    for h in history:  # the accepted growth, written at each extended average
        if isinstance(h.get("growth"), int | float) and isinstance(h.get("extendedAverage"), int | float):
            ax.annotate(f"x{h['growth']:.2f}", (h["iteration"], h["extendedAverage"]), textcoords="offset points",
                        xytext=(6, 4), fontsize="small", color="C1")
    ax.set_xticks([h["iteration"] for h in history] or [1])
    return _finish(fig, ax, "macro-iteration", "words", "Response length per iteration")


def loss_series(history: list[dict]) -> dict[str, list[tuple[float, float]]]:
    """The training curve drawn: per role, (position, mean loss) for each epoch of each iteration, the epochs of
    iteration k spread over (k-1, k] so that the iterations follow one another."""
    series = {}
    for role in ("generator", "extender"):
        points = []
        for h in history:
            epochs = h.get(f"{role}EpochLosses") or []
            points += [(h["iteration"] - 1 + (e + 1) / len(epochs), float(v)) for e, v in enumerate(epochs)]
        series[role] = points
    return series


def loss_figure(history: list[dict]):
    """A matplotlib Figure of the mean training loss per epoch of both roles over the iterations."""
    fig, ax = _axes((7, 4.2))
    for (role, points), style in zip(loss_series(history).items(), ("C0-", "C1-"), strict=True):
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], style, marker="o", label=role, gid=role)
    ax.set_xticks([h["iteration"] for h in history] or [1])
    return _finish(fig, ax, "macro-iteration (each point: one epoch's mean)", "training loss",
                   "Training loss per epoch")


def scatter_figure(points: dict[str, list[list]]):
    """LongBench-Write as LongWriter draws it: required against produced length, both axes logarithmic, with the
    line y = x; a colour per model (label -> [required, produced, language] points; zero lengths left out)."""
    fig, ax = _axes((6, 5))
    low, high = 100.0, 1000.0
    for i, (label, pts) in enumerate(points.items()):
        drawn = [(p[0], p[1]) for p in pts if p[0] > 0 and p[1] > 0]
        if not drawn:
            continue
        ax.scatter([p[0] for p in drawn], [p[1] for p in drawn], s=14, alpha=0.7, color=f"C{i % 10}", label=label,
                   gid=label)
        low = min(low, *(min(p) for p in drawn))
        high = max(high, *(max(p) for p in drawn))
    ax.plot([low, high], [low, high], "k--", linewidth=0.8, label="produced = required")
    ax.set_xscale("log")
    ax.set_yscale("log")
    return _finish(fig, ax, "required length", "produced length (LongWriter's count)",
                   "LongBench-Write: required vs produced length", grid="both")


def _png(make, *args) -> bytes | None:
    """The PNG of a figure; None when matplotlib is not installed (the operator image)."""
    try:
        fig = make(*args)
    except ImportError:
        log.info("matplotlib is not installed: the report has no plot (pip install 'selflengthen[train]')")
        return None
    out = io.BytesIO()
    fig.savefig(out, format="png")
    return out.getvalue()


def plot_png(history: list[dict], figure=None) -> bytes | None:
    """The PNG of length_figure (or `figure`) of the history; None without matplotlib."""
    return _png(figure or length_figure, history)


def scatter_points(store: Store, config: RunConfig, last: int) -> dict[str, list[list]]:
    """The LongBench-Write points of every evaluated iteration 1..last, by model label."""
    points = {}
    for k in range(1, last + 1):
        evaluate = StageArtifacts(store, config.name, k, "evaluate")
        if evaluate.done():
            found = (evaluate.manifest().get("longbenchWrite") or {}).get("points")
            if found:
                points[f"iteration {k}"] = found
    final = RunArtifacts(store, config.name, last, "evaluate-length-following")
    if last == config.iterations and final.done():
        found = (final.manifest().get("longbenchWrite") or {}).get("points")
        if found:
            points["length-following"] = found
    return points


# -- writing ----------------------------------------------------------------------------------------------------


def _last_started(store: Store, config: RunConfig, iteration: int) -> int:
    """The last iteration with a finished stage, at least `iteration` (the plot covers all of them)."""
    last = iteration
    for k in range(iteration + 1, config.iterations + 1):
        if not StageArtifacts(store, config.name, k, ITERATION_STAGES[0]).done():
            break
        last = k
    return last


def write_report(store: Store, config: RunConfig, iteration: int) -> dict:
    """Write <run>/report/iter-KK.{json,md} and lengths.png; returns the report with `markdown` and the keys."""
    report = build_report(store, config, iteration)
    history = report["history"]
    last = _last_started(store, config, iteration)
    if last > iteration:  # a stage of an earlier iteration was rerun: the plot still covers every iteration
        history = build_report(store, config, last)["history"]
    png = plot_png(history)
    report["plot"] = report_key(config.name, PLOT) if png is not None else None
    has_loss = any(loss_series(history).values())
    loss_png = plot_png(history, loss_figure) if png is not None and has_loss else None
    report["lossPlot"] = report_key(config.name, LOSS_PLOT) if loss_png is not None else None
    points = scatter_points(store, config, last)
    scatter = _png(scatter_figure, points) if points else None
    report["scatter"] = report_key(config.name, SCATTER) if scatter is not None else None
    markdown = render_markdown(report)
    write_json(store, report_key(config.name, iteration_report_name(iteration, "json")), report)
    store.write(report_key(config.name, iteration_report_name(iteration, "md")), markdown.encode())
    if png is not None:
        store.write(report_key(config.name, PLOT), png)
    if loss_png is not None:
        store.write(report_key(config.name, LOSS_PLOT), loss_png)
    if scatter is not None:
        store.write(report_key(config.name, SCATTER), scatter)
    return {**report, "markdown": markdown,
            "keys": [report_key(config.name, iteration_report_name(iteration, ext)) for ext in ("json", "md")]
            + ([report["plot"]] if png is not None else []) + ([report["lossPlot"]] if loss_png is not None else [])
            + ([report["scatter"]] if scatter is not None else [])}


def refresh_report(store: Store, config: RunConfig, iteration: int) -> dict | None:
    """write_report, but a report that cannot be written only logs a warning: it never fails the stage."""
    try:
        return write_report(store, config, iteration)
    except Exception as err:  # the report is a by-product: the stage's own result stands
        log.warning("report of iteration %d not written: %s: %s", iteration, type(err).__name__, err)
        return None


def read_markdown(store: Store, config: RunConfig, iteration: int) -> str | None:
    key = report_key(config.name, iteration_report_name(iteration, "md"))
    return store.read(key).decode() if store.exists(key) else None
