"""
Several arms of the online loop on the same pi0, the same first reward model, the same oracle and the same label
budget, over several seeds, then one table and one figure.

Every arm is `iterate.py` itself with one setting changed (the table ARMS below), so the arms share every other
hyperparameter and the same code path. Within a seed the arms share the cache folder, so they start from the same
pi0 and the same first reward model. The label budget is the same for every arm except `rank-oracle`, which pays one
query per sample it ranks (the upper bound of the enhancer, its cost counted), `labeler-rm`, which spends none
after the first reward model's, `n2`, whose two samples make one pair per prompt where the others make two, and
`m192`, which asks about half as many prompts an iteration.

The table's last column compares each arm's final win-rate with `best-worst` (the default of iterate.py): a
difference counts only when it exceeds the combined standard error of the two means over seeds; else it is a tie.

    python experiments.py --arms offline best-worst uncertainty --seeds 0 1 2    # runs/experiments/results.{md,png}
    python experiments.py --arms offline best-worst -- --iterations 8      # after --: iterate.py flags for all arms
    python experiments.py --arms offline best-worst --jobs 2               # two runs at once, one thread each
"""
import argparse
import json
import multiprocessing
import os
from dataclasses import asdict
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from contextlib import redirect_stderr, redirect_stdout

import numpy as np

import iterate

# arm -> the iterate.py flags that make it; everything else is the shared configuration
ARMS = {
    "best-worst": [],
    "offline": ["--pairs", "offline"],
    "random": ["--pairs", "random"],
    "uncertainty": ["--pairs", "uncertainty"],
    "rank-oracle": ["--rank", "oracle"],
    "hybrid": ["--hybrid"],
    "labeler-rm": ["--labeler", "rm"],
    "reference-previous": ["--reference", "previous"],
    "restart": ["--restart"],
    "n2": ["--samples-per-prompt", "2", "--pairs-per-prompt", "1"],
    "n4": ["--samples-per-prompt", "4"],
    "rpo": ["--nll-weight", "5"],
    "refit-all": ["--rm-refit", "all"],
    "m192": ["--prompts-per-iter", "192"],
}
SUMMARY_KEYS = ("win_rate", "kl", "reward", "proxy_reward", "length", "labels")
DIGITS = {"kl": 2, "reward": 2, "proxy_reward": 2, "length": 1, "labels": 0}  # decimals shown; 3 otherwise


def run_arms(arms, seeds, out, shared_flags, jobs=1):
    """Run every arm for every seed; a run whose metrics.jsonl is complete and whose settings match is reused.
    With jobs > 1, runs go to that many worker processes, each with an equal share of the CPU threads (unless
    --threads is among the shared flags) and its output in its run folder's log.txt. A seed's first run builds its cache (pi0 and the first reward model)
    before that seed's other runs start, so no two runs write one cache."""
    pending = {}  # seed -> [(name, argv)], in arm order
    for seed in seeds:
        for arm in arms:
            folder = os.path.join(out, arm, f"seed{seed}")
            argv = shared_flags + ARMS[arm] + ["--seed", str(seed), "--out", folder,
                                               "--cache", os.path.join(out, f"cache-seed{seed}")]
            state = run_state(folder, argv)
            if state == "finished":
                print(f"{arm} seed {seed}: reusing {folder}")
            else:  # an interrupted run of these settings continues; one of other settings is started again
                flag = {"interrupted": ["--resume"], "other settings": ["--overwrite"]}.get(state, [])
                pending.setdefault(seed, []).append((f"{arm} seed {seed}", argv + flag))
    if jobs == 1:
        for name, argv in (run for runs in pending.values() for run in runs):
            print(f"=== {name}: python iterate.py {' '.join(argv)}")
            iterate.main(argv)
        return
    # each worker gets an equal share of the cores, unless the shared flags set --threads themselves
    threads = [] if "--threads" in shared_flags else ["--threads", str(max(1, (os.cpu_count() or 1) // jobs))]
    context = multiprocessing.get_context("spawn")  # a fresh interpreter per worker: no forked torch state
    with ProcessPoolExecutor(jobs, mp_context=context) as pool:
        submit = lambda seed, name, argv: {pool.submit(run_logged, argv + threads): (seed, name)}
        submitted = {}
        for seed, runs in pending.items():  # each seed's first run alone: it builds the seed's cache
            submitted.update(submit(seed, *runs[0]))
        try:
            while submitted:
                done, _ = wait(submitted, return_when=FIRST_COMPLETED)
                for future in done:
                    seed, name = submitted.pop(future)
                    print(f"{name}: {future.result()}", flush=True)  # re-raises a failed run's error
                    if name == pending[seed][0][0]:  # the seed's cache exists now: its other runs may start
                        for other in pending[seed][1:]:
                            submitted.update(submit(seed, *other))
        except BaseException:  # a failed or interrupted run: let the running ones finish, start no more
            pool.shutdown(wait=True, cancel_futures=True)
            raise


def run_logged(argv) -> str:
    """iterate.main(argv) in a worker process, its output (progress bars included) in the run's log.txt."""
    folder = argv[argv.index("--out") + 1]
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "log.txt"), "w") as log, redirect_stdout(log), redirect_stderr(log):
        metrics = iterate.main(argv)
    return f"final win-rate {metrics[-1]['win_rate']:.3f} ({os.path.join(folder, 'log.txt')})"


def run_state(folder, argv) -> str:
    """What the folder holds: "none", "finished" (a complete run made with exactly these settings, its paths
    aside), "interrupted" (a run of these settings to --resume) or "other settings"."""
    try:
        with open(os.path.join(folder, "config.json")) as f:
            config = json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return "none"
    wanted = asdict(iterate.parse_args(argv))
    config = {**asdict(iterate.Settings()), **config}  # a setting added since the run: its default, which it ran
    # where a run lives and how many CPU threads it used are not what it ran: a moved folder still counts, and so
    # does a run made with --jobs (threads change only the order of float sums; see README, Results)
    settings = lambda c: {k: v for k, v in c.items() if k not in ("out", "cache", "threads", "resume", "overwrite")}
    if settings(config) != settings(wanted):
        return "other settings"
    try:
        rows = read_metrics(folder)
    except (FileNotFoundError, json.JSONDecodeError):
        return "interrupted"
    return "finished" if len(rows) == wanted["iterations"] + 1 else "interrupted"


def read_metrics(folder) -> list[dict]:
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def collect(out, arms, seeds) -> dict:
    """arm -> key -> array [seeds, evaluations]."""
    table = {}
    for arm in arms:
        runs = [read_metrics(os.path.join(out, arm, f"seed{seed}")) for seed in seeds]
        table[arm] = {key: np.array([[row[key] for row in rows] for rows in runs], dtype=float)
                      for key in SUMMARY_KEYS}
    return table


def compare(final, baseline) -> str:
    """The final win-rate's difference from the baseline arm's, called a difference only when it exceeds the
    combined standard error of the two means over seeds; otherwise a tie."""
    diff = final.mean() - baseline.mean()
    if len(final) < 2 or len(baseline) < 2:
        return f"{diff:+.3f} (one seed: no spread to compare with)"
    se = np.sqrt(final.var(ddof=1) / len(final) + baseline.var(ddof=1) / len(baseline))
    return f"{diff:+.3f} ± {se:.3f} ({'differ' if abs(diff) > se else 'tie'})"


def summary_table(table, seeds, baseline="best-worst") -> str:
    """Markdown: the last evaluation of each arm, mean ± standard deviation over seeds, and the win-rate against
    the baseline arm's (when it ran)."""
    keys = SUMMARY_KEYS + ((f"win_rate vs {baseline}",) if baseline in table else ())
    lines = [f"| arm | {' | '.join(keys)} |", "|" + " --- |" * (len(keys) + 1)]
    for arm, series in table.items():
        cells = [f"{series[k][:, -1].mean():.{DIGITS.get(k, 3)}f} ± "
                 f"{series[k][:, -1].std(ddof=1) if len(seeds) > 1 else 0:.{DIGITS.get(k, 3)}f}" for k in SUMMARY_KEYS]
        if baseline in table:
            cells.append("-" if arm == baseline else compare(series["win_rate"][:, -1],
                                                               table[baseline]["win_rate"][:, -1]))
        lines.append(f"| {arm} | {' | '.join(cells)} |")
    return "\n".join(lines)


def plot(table, path):
    """Win-rate against labels spent and against KL, gold against proxy reward over iterations, and length over
    iterations: the mean over seeds with a band of one standard deviation."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    panels = [("labels", "win_rate"), ("kl", "win_rate"), ("iteration", "reward"), ("iteration", "length")]
    for arm, series in table.items():
        iterations = np.arange(series["win_rate"].shape[1])
        for ax, (x_key, y_key) in zip(axes, panels):
            x = iterations if x_key == "iteration" else series[x_key].mean(0)
            y, spread = series[y_key].mean(0), series[y_key].std(0)
            line, = ax.plot(x, y, marker="o", label=arm)
            ax.fill_between(x, y - spread, y + spread, color=line.get_color(), alpha=0.15)
            if y_key == "reward":  # the reward model's score beside the gold one: over-optimisation shows as parting
                ax.plot(x, series["proxy_reward"].mean(0), ls="--", color=line.get_color())
    titles = ["win-rate vs labels spent", "win-rate vs KL(pi || pi0)", "gold r* (solid) and proxy (dashed)",
              "response length (tokens)"]
    for ax, (x_key, y_key), title in zip(axes, panels, titles):
        if x_key == "iteration":
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel(x_key)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arms", nargs="+", default=["offline", "random", "best-worst", "uncertainty"],
                        help=f"arms to run: {', '.join(ARMS)}")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds (each its own pi0)")
    parser.add_argument("--out", default="runs/experiments", help="folder for every run, the table and the figure")
    parser.add_argument("--name", default="results", help="the table and figure go to OUT/NAME.md and OUT/NAME.png")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once, in worker processes that split the CPU "
                        "threads (on 2 cores, --jobs 2 made the README's tables in 56 min against 65)")
    parser.add_argument("iterate_flags", nargs="*", help="after --: iterate.py flags shared by every arm")
    args = parser.parse_args(argv)
    unknown = [arm for arm in args.arms if arm not in ARMS]
    if unknown:
        parser.error(f"--arms: unknown arm {unknown[0]!r}; choose from {', '.join(ARMS)}")
    iterate.parse_args(args.iterate_flags)  # refuse bad shared flags before any run starts
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    run_arms(args.arms, args.seeds, args.out, args.iterate_flags, args.jobs)
    table = collect(args.out, args.arms, args.seeds)
    text = summary_table(table, args.seeds)
    with open(os.path.join(args.out, f"{args.name}.md"), "w") as f:
        f.write(text + "\n")
    plot(table, os.path.join(args.out, f"{args.name}.png"))
    print(text)
    return table


if __name__ == "__main__":
    main()
