"""When does pseudo-labeling pay? The recipe on real faces at several labeled:pool ratios.

One fixed, identity-disjoint test set; the gains of distillation and self-training, each
run's with its 95 % paired bootstrap interval, against pool faces per label.

    python benchmarks/label_ratio_sweep.py --plan-only          # the splits, no work
    python benchmarks/label_ratio_sweep.py --seeds 0 1          # build, run, plot
    python benchmarks/label_ratio_sweep.py --no-run             # summarise what has finished

A regime ``L:P`` is ``L`` labeled_train faces and a pool of ``P`` unlabeled ones, split
equally between unlabeled_1 and unlabeled_2. Each regime is a `real_face_quality.py build`
of the real faces with the same build seed and the same test and labeled_val sizes, so the
same whole identities, the same source images and (a sample is a function of seed, split
and source) the same bytes go to test and labeled_val in every regime; the sweep checks the
plan before it builds and the shards after. The rest is drawn from the remaining identities,
each source face used once per regime. The defaults, 250:8000, 500:8000, 1600:6400 and
4000:4000, are 32, 16, 4 and 1 pool faces per label within the 10,240 faces.

Each regime is run with `real_face_quality`'s `run_seed` (``fiqa run CONFIG`` on its data,
into ``RUNS/lL-pP/seed-S``), seed by seed over all regimes, so a sweep cut short has whole
curves. A rerun resumes: a build whose dataset.json matches is kept, and the pipeline skips
finished stages. What is drawn comes from each run's ``evaluate/report.json``, its paired
bootstrap intervals over the test images (``intervals.deltas``):

    distillation   student - student_labeled_only (the same optimizer steps), test SRCC
    self_training  teacher_plus - teacher, test SRCC

Outputs: a table (stdout; ``--markdown`` writes it for benchmarks/RESULTS.md), ``--json``
(every figure) and a PNG (``--out``): gain against pool faces per label, log scale, each
seed's value with its 95 % interval, the mean over seeds, and 0 dashed.

Licence: the real faces are research-only (see real_face_quality.py): builds go to --data,
never into the repository.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import real_face_quality as rfq

from fiqa.report import DELTAS  # the names report.json gives the paired differences

DEFAULT_REGIMES = ("250:8000", "500:8000", "1600:6400", "4000:4000")
GAINS = {
    "distillation": "distilled student - labeled-only student",
    "self_training": "teacher-plus - teacher",
}
HELD_OUT = ("test", "labeled_val")  # the splits every regime shares, byte for byte
PLOT_NAME = "label_ratio_sweep.png"


# Regimes and the plan ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Regime:
    """``labeled`` labeled_train faces and a pool of ``pool`` unlabeled ones."""

    labeled: int
    pool: int

    @property
    def name(self) -> str:
        return f"l{self.labeled}-p{self.pool}"

    @property
    def pool_per_label(self) -> float:
        return self.pool / self.labeled

    @property
    def ratio(self) -> str:
        return f"1:{self.pool_per_label:.3g}"

    def sizes(self, test: int, labeled_val: int) -> dict[str, int]:
        u1 = self.pool // 2  # an odd pool gives unlabeled_2 the extra face
        return {
            "labeled_train": self.labeled,
            "labeled_val": labeled_val,
            "test": test,
            "unlabeled_1": u1,
            "unlabeled_2": self.pool - u1,
        }


def parse_regime(text: str) -> Regime:
    """``"250:8000"`` -> Regime(250, 8000); both counts positive integers."""
    labeled, sep, pool = text.partition(":")
    if not sep or not labeled.isdigit() or not pool.isdigit() or not int(labeled) * int(pool):
        raise ValueError(f"regime {text!r}: expected LABELED:POOL, two positive integers")
    return Regime(int(labeled), int(pool))


def parse_regimes(texts: list[str]) -> list[Regime]:
    regimes = [parse_regime(t) for t in texts]
    if len({r.name for r in regimes}) < len(regimes):
        raise ValueError(f"regimes {texts}: one is given twice")
    return regimes


def plan_sweep(
    sources: list[rfq.Source], regimes: list[Regime], seed: int, test: int, labeled_val: int
) -> dict:
    """Each regime's split plan (`real_face_quality.plan_splits`), checked to hold the same
    test and labeled_val images in every regime, with identities no other split has."""
    held: dict[str, list[str]] | None = None
    out: dict = {"regimes": {}}
    for regime in regimes:
        try:
            plan, identities = rfq.plan_splits(sources, regime.sizes(test, labeled_val), seed)
        except ValueError as e:
            raise ValueError(f"regime {regime.name}: {e}") from None
        names = {split: [s.name for s in plan[split]] for split in HELD_OUT}
        if held is None:
            held = names
            out.update({f"{s}_identities": identities[s] for s in HELD_OUT})
        elif names != held:  # the comparison across regimes needs one test set
            raise ValueError(f"regime {regime.name}: its test or labeled_val differs")
        for split in HELD_OUT:
            others = {i for s, ids in identities.items() if s != split for i in ids}
            if set(identities[split]) & others:
                raise ValueError(f"regime {regime.name}: {split} shares identities")
        own = {i for s in HELD_OUT for i in identities[s]}
        left = sum(1 for s in sources if s.identity not in own)
        used = [s.name for split in plan.values() for s in split]
        if len(used) != len(set(used)):
            raise ValueError(f"regime {regime.name}: a source face is used twice")
        out["regimes"][regime.name] = {
            "sizes": regime.sizes(test, labeled_val),
            "faces_left": left,  # after test and labeled_val took whole identities
            "unused": left - regime.labeled - regime.pool,
        }
    return out


def plan_text(plan: dict, n_sources: int) -> str:
    lines = [
        f"faces: {n_sources}; test identities {', '.join(plan['test_identities'])}; "
        f"labeled_val identities {', '.join(plan['labeled_val_identities'])}"
    ]
    for name, r in plan["regimes"].items():
        lines.append(
            f"  {name}: {r['sizes']}, {r['faces_left']} faces left after test and "
            f"labeled_val, {r['unused']} unused"
        )
    return "\n".join(lines)


# Builds -----------------------------------------------------------------------------------------
def ensure_build(
    faces: Path, data: Path, seed: int, sizes: dict[str, int], workers: int | None
) -> None:
    """`real_face_quality.build` unless ``data`` holds a finished build of the same faces,
    seed and sizes (dataset.json is written last); another build there is refused."""
    meta_path = data / "dataset.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        want = {"seed": seed, "sizes": sizes, "faces": str(faces.resolve())}
        got = {k: meta.get(k) for k in want}
        if got == want:
            print(f"{data}: built, kept", flush=True)
            return
        # runs over it would resume stages trained on the other build
        raise SystemExit(f"{data} holds another build ({got}, want {want}): remove it")
    rfq.build(
        faces.resolve(),
        data,
        seed=seed,
        sizes=sizes,
        workers=workers,
        log=lambda line: print(line, flush=True),
    )


def check_same_splits(builds: list[Path]) -> None:
    """Every build's test and labeled_val shards byte for byte the first one's."""

    def digests(data: Path) -> dict[str, str]:
        return {
            str(p.relative_to(data)): hashlib.sha256(p.read_bytes()).hexdigest()
            for split in HELD_OUT
            for p in sorted((data / split).glob("*.tar"))
        }

    first = digests(builds[0]) if builds else {}
    for data in builds[1:]:
        if digests(data) != first:
            raise SystemExit(f"{data}: test or labeled_val differs from {builds[0]}'s")


# Figures ----------------------------------------------------------------------------------------
def run_dir(runs: str, regime: Regime, seed: int) -> str:
    return f"{runs.rstrip('/')}/{regime.name}/seed-{seed}"


def gain(per_seed: dict, name: str) -> dict | None:
    """A run's gain: the report's paired interval of the difference, or with no interval
    (a report written before them) the difference of the two models' SRCC."""
    got = per_seed["intervals"].get(name, {}).get("srcc")
    if got:
        return {k: got[k] for k in ("value", "low", "high")}
    a, b = DELTAS[name]
    models = per_seed["models"]
    if a in models and b in models:
        return {"value": models[a]["srcc"] - models[b]["srcc"], "low": None, "high": None}
    return None


def collect(regimes: list[Regime], seeds: list[int], runs: str) -> list[dict]:
    """Per regime: the figures of each seed's finished run (`real_face_quality.read_run`),
    the mean and std over seeds of each model, and each gain per seed and over seeds."""
    out = []
    for regime in regimes:
        per_seed = {}
        for seed in seeds:
            path = run_dir(runs, regime, seed)
            if Path(path, "evaluate", "report.json").is_file():
                per_seed[seed] = rfq.read_run(path)
        gains = {}
        for name in GAINS:
            got = {s: g for s, r in per_seed.items() if (g := gain(r, name))}
            mean, std = rfq._mean_std([g["value"] for g in got.values()]) if got else (None, None)
            gains[name] = {"per_seed": got, "mean": mean, "std": std, "n": len(got)}
        out.append(
            {
                "regime": regime.name,
                "labeled": regime.labeled,
                "pool": regime.pool,
                "pool_per_label": regime.pool_per_label,
                "ratio": regime.ratio,
                "seeds_done": sorted(per_seed),
                "seeds_missing": [s for s in seeds if s not in per_seed],
                "per_seed": per_seed,
                "models": rfq.summarise(per_seed)["models"] if per_seed else {},
                "gains": gains,
            }
        )
    return out


def _ci(g: dict | None) -> str:
    if not g:
        return "n/a"
    if g["low"] is None:
        return f"{g['value']:+.4f} (no interval)"
    return f"{g['value']:+.4f} [{g['low']:+.4f}, {g['high']:+.4f}]"


def table_rows(results: list[dict]) -> list[list[str]]:
    """A header, then per regime a row per seed and one of the mean ± std over seeds."""
    rows = [
        ["labeled:pool", "pool/label", "seed"]
        + [f"{n.replace('_', '-')} gain [95 % CI]" for n in GAINS]
        + ["teacher", "teacher-plus", "student", "labeled-only"]
    ]
    for r in results:
        head = [f"{r['labeled']}:{r['pool']}", f"{r['pool_per_label']:.3g}"]
        for seed, run in r["per_seed"].items():
            models = [run["models"].get(m, {}).get("srcc") for m in rfq.MODELS]
            rows.append(
                head
                + [str(seed)]
                + [_ci(r["gains"][n]["per_seed"].get(seed)) for n in GAINS]
                + ["n/a" if v is None else f"{v:.4f}" for v in models]
            )
            head = ["", ""]  # the regime once, on its first row
        if not r["per_seed"]:
            rows.append(head + ["none done"] + ["n/a"] * (len(GAINS) + len(rfq.MODELS)))
            continue
        mean = [
            f"{g['mean']:+.4f} ± {g['std']:.4f}" if g["n"] else "n/a"
            for g in (r["gains"][n] for n in GAINS)
        ]
        models = [r["models"].get(m) for m in rfq.MODELS]
        rows.append(
            head
            + [f"mean ± std ({len(r['per_seed'])})"]
            + mean
            + ["n/a" if m is None else f"{m['srcc']:.4f} ± {m['srcc_std']:.4f}" for m in models]
        )
    return rows


def table_text(results: list[dict]) -> str:
    rows = table_rows(results)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "test SRCC per run; gains with the report's 95 % paired bootstrap interval over the "
        "test images; mean ± std over seeds (ddof 1; 0 for one seed)",
        "",
    ]
    for r in rows:
        cells = [
            c.ljust(w) if i < 3 else c.rjust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    missing = [f"{r['regime']} seed(s) {r['seeds_missing']}" for r in results if r["seeds_missing"]]
    if missing:
        lines.append("not finished: " + "; ".join(missing))
    return "\n".join(lines)


def table_markdown(results: list[dict]) -> str:
    rows = table_rows(results)
    lines = ["| " + " | ".join(rows[0]) + " |", "|---" * len(rows[0]) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    return "\n".join(lines) + "\n"


def plot(results: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, NullLocator

    fig, axes = plt.subplots(1, len(GAINS), figsize=(5.5 * len(GAINS), 4.2), sharey=True)
    seeds = sorted({s for r in results for s in r["per_seed"]})
    xs = sorted({r["pool_per_label"] for r in results})
    for ax, (name, label) in zip(axes, GAINS.items(), strict=True):
        for k, seed in enumerate(seeds):
            pts = [(r, r["gains"][name]["per_seed"].get(seed)) for r in results]
            pts = [(r, g) for r, g in pts if g]
            if not pts:
                continue
            # seeds side by side at a regime, not on top of each other (log x: a factor)
            x = [r["pool_per_label"] * 1.07 ** (k - (len(seeds) - 1) / 2) for r, _ in pts]
            y = [g["value"] for _, g in pts]
            err = [
                [0.0 if g["low"] is None else g["value"] - g["low"] for _, g in pts],
                [0.0 if g["high"] is None else g["high"] - g["value"] for _, g in pts],
            ]
            ax.errorbar(x, y, yerr=err, fmt="o", ms=4, capsize=3, alpha=0.8, label=f"seed {seed}")
        means = sorted(
            (r["pool_per_label"], r["gains"][name]["mean"])
            for r in results
            if r["gains"][name]["n"]
        )
        if means:
            ax.plot(*zip(*means, strict=True), "k-", lw=1.5, label="mean over seeds")
        ax.axhline(0.0, color="grey", ls="--", lw=1)
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(FixedLocator(xs))
        ax.xaxis.set_minor_locator(NullLocator())
        by_x = {r["pool_per_label"]: f"{r['labeled']}:{r['pool']}" for r in results}
        ax.set_xticklabels([f"{x:.3g}\n{by_x[x]}" for x in xs])
        ax.set(
            title=f"{name.replace('_', '-')}: {label}", xlabel="pool faces per label (labeled:pool)"
        )
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    axes[0].set_ylabel("gain in test SRCC (95 % paired bootstrap interval)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_path(out: str) -> Path:
    """``--out``: a folder (existing, or named with a trailing /) gets PLOT_NAME, else a file."""
    p = Path(out)
    return p / PLOT_NAME if out.endswith("/") or p.is_dir() else p


def held_out(data: str, regimes: list[Regime]) -> dict | None:
    """The test and labeled_val identities, from the first finished build's dataset.json."""
    for regime in regimes:
        meta_path = Path(data) / regime.name / "dataset.json"
        if meta_path.is_file():
            ids = json.loads(meta_path.read_text())["identities"]
            return {f"{s}_identities": ids[s] for s in HELD_OUT}
    return None


def write_outputs(
    args: argparse.Namespace, regimes: list[Regime], plan: dict | None, log: Callable = print
) -> dict:
    """Collect the finished runs and write the JSON, the PNG and (if asked) the markdown."""
    results = collect(regimes, args.seeds, args.runs)
    held = plan or held_out(args.data, regimes)  # --no-run: no plan, but maybe the builds
    of = f" of {len(held['test_identities'])} identities" if held else ""
    figures = {
        "benchmark": "label_ratio_sweep",
        "faces": str(args.faces),
        "build_seed": args.build_seed,
        "test": args.test,
        "labeled_val": args.labeled_val,
        "data": args.data,
        "runs": args.runs,
        "config": args.config,
        "sets": args.set,
        "seeds": args.seeds,
        "plan": plan,
        "held_out": held and {k: held[k] for k in (f"{s}_identities" for s in HELD_OUT)},
        "gains": GAINS,
        "regimes": results,
    }
    png = plot_path(args.out)
    json_path = Path(args.json) if args.json else png.with_suffix(".json")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(figures, indent=2))
    title = (
        f"when pseudo-labeling pays: real faces, {args.test} test faces{of}, {args.config}"
        f"{' ' + ' '.join(args.set) if args.set else ''}, seeds {args.seeds}"
    )
    plot(results, png, title)
    written = [str(json_path), str(png)]
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(table_markdown(results))
        written.append(args.markdown)
    log(f"wrote {', '.join(written)}")
    return figures


# main -------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    from harness import REAL_FACES

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--faces", default=str(REAL_FACES), help="folder of *.tar face shards")
    p.add_argument("--data", default="data/sweep", help="builds go to DATA/lL-pP")
    p.add_argument("--build-seed", type=int, default=0, help="the builds' seed (one test set)")
    p.add_argument("--test", type=int, default=1000, help="test faces, every regime")
    p.add_argument("--labeled-val", type=int, default=150, help="labeled_val faces, every regime")
    p.add_argument(
        "--regimes",
        nargs="+",
        default=list(DEFAULT_REGIMES),
        metavar="LABELED:POOL",
        help="labeled_train faces : unlabeled faces (halved into unlabeled_1 and unlabeled_2)",
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="run seeds")
    p.add_argument("--config", default="configs/demo.yaml", help="the run config")
    p.add_argument(
        "--set", action="extend", nargs="+", default=[], metavar="KEY=VALUE", help="overrides"
    )
    p.add_argument("--runs", default="runs/sweep", help="runs go to RUNS/lL-pP/seed-S")
    p.add_argument("--out", default="docs/", help=f"the plot: a file, or a folder for {PLOT_NAME}")
    p.add_argument("--json", default=None, help="the figures (default: the plot's name, .json)")
    p.add_argument("--markdown", default=None, help="write the table as markdown here")
    p.add_argument("--workers", type=int, default=None, help="build processes (default: all)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--plan-only", action="store_true", help="print the splits, build nothing")
    mode.add_argument("--no-run", action="store_true", help="only summarise the finished runs")
    args = p.parse_args(argv)
    try:
        regimes = parse_regimes(args.regimes)
    except ValueError as e:
        raise SystemExit(f"--regimes: {e}") from None

    plan = None
    if not args.no_run:
        faces = Path(args.faces)
        try:
            sources = rfq.scan_faces(faces)
            plan = plan_sweep(sources, regimes, args.build_seed, args.test, args.labeled_val)
        except (ValueError, FileNotFoundError) as e:  # before any build: say what does not fit
            raise SystemExit(f"plan: {e}") from None
        print(plan_text(plan, len(sources)), flush=True)
        if args.plan_only:
            return 0
        builds = [Path(args.data) / r.name for r in regimes]
        for regime, data in zip(regimes, builds, strict=True):
            ensure_build(
                faces,
                data,
                args.build_seed,
                regime.sizes(args.test, args.labeled_val),
                args.workers,
            )
        check_same_splits(builds)
        for seed in args.seeds:
            for regime, data in zip(regimes, builds, strict=True):
                print(f"\n{regime.name} ({regime.ratio}), seed {seed}", flush=True)
                rfq.run_seed(
                    data.resolve(), seed, args.config, run_dir(args.runs, regime, seed), args.set
                )
                write_outputs(args, regimes, plan, log=lambda _: None)  # a cut sweep leaves a plot
    figures = write_outputs(args, regimes, plan)
    print("\n" + table_text(figures["regimes"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
