"""The project against itself: one bench_vs_hf.py measurement from two source trees, interleaved.

A 2-core VM drifts by ±10 % between minutes, more than most single changes are worth, so a change is judged
by timing the tree with it against the tree without it in one run: one worker process per tree (each
imports the package from its own tree), asked in turns (A, B, A, B, ...) for the same work on the same
imported weights. Make the second tree with ``git worktree add /tmp/base <commit>``.

    python benchmarks/bench_ab.py /tmp/base . --kind train --repeats 5
    python benchmarks/bench_ab.py /tmp/base . --kind greedy_bN -- --batch 16     # after --: bench_vs_hf shapes
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    shape_args = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("tree_a", help="source tree A (the baseline)")
    ap.add_argument("tree_b", help="source tree B (the change)")
    ap.add_argument("--kind", default="train", help="a bench_vs_hf.py kind: train, greedy_b1, greedy_bN, mixed, ...")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    import bench_vs_hf

    shapes = bench_vs_hf.parse_args(shape_args + ["--threads", str(args.threads)])
    trees = [os.path.abspath(args.tree_a), os.path.abspath(args.tree_b)]
    for tree in trees:
        if not os.path.exists(os.path.join(tree, "benchmarks", "bench_vs_hf.py")):
            raise SystemExit(f"{tree}: no benchmarks/bench_vs_hf.py there")
    with tempfile.TemporaryDirectory() as root:
        shapes.model_dir = root
        bench_vs_hf.make_models(shapes, root)
        workers = [bench_vs_hf.Worker(shapes, "project", tree=tree) for tree in trees]
        try:
            for w in workers:  # warm-up
                w.ask(args.kind)
            runs: list[list[dict]] = [[], []]
            for _ in range(args.repeats):
                for i, w in enumerate(workers):
                    runs[i].append(w.ask(args.kind))
        finally:
            for w in workers:
                w.close()
    med = []
    for tree, r in zip(trees, runs):
        wall = [x["seconds"] for x in r]
        cpu = [x["cpu_seconds"] for x in r]
        med.append(statistics.median(wall))
        print(f"{tree}: {args.kind} median {statistics.median(wall):.3f} s, min {min(wall):.3f} s, "
              f"CPU {statistics.median(cpu):.3f} s")
    print(f"B is {med[0] / med[1]:.3f}x as fast as A (median wall time; > 1: B faster)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
