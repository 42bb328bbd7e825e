"""The full comparison, every dataset, one command (DESIGN.md section 5).

Run::

  python -m experiments.comparison --out experiments/results \
      --data-dir ../shared/data/planetoid

For each dataset (in priority order: the MLP sets, Cora, then CiteSeer and
the mnist5k CNN) it tunes every tuned method's learning rate on the
validation split (4-point grid, 2 tuning seeds; stored in
``experiments/tuned.json``), trains every method on 10 paired seeds and
writes ``OUT/<dataset>/summary.json``, ``summary.md``, the plots and
``log.txt`` (the progress bars: ``tail -f`` it); then
the cross-dataset tables (``OUT/comparison.md``). Progress bars go to
stderr. Resumable: tuned rates already stored are kept
(``--tune-missing``) and finished methods are read back from
``OUT/<dataset>/runs/`` (not committed); a dataset whose ``summary.json``
already has every method at the requested seed count is skipped.

``--datasets a,b`` restricts the list; ``--jobs 2`` runs two dataset queues
side by side (the graph sets in the second), which on 2 CPU cores shared
with other work finished sooner than one queue.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from experiments import methods as methods_lib

PRIORITY = ("digits", "mnist1d", "mnist5k", "cora", "citeseer", "mnist5k_cnn")
GRAPHS = ("cora", "citeseer")


def done(out: Path, dataset: str, seeds: int, names) -> bool:
  path = out / dataset / "summary.json"
  if not path.exists():
    return False
  s = json.loads(path.read_text())
  return s.get("seeds") == seeds and set(names) <= set(s["methods"])


def run_queue(datasets, args, names) -> None:
  for d in datasets:
    if done(args.out, d, args.seeds, names):
      print(f"[comparison] {d}: done, skipped", file=sys.stderr, flush=True)
      continue
    cmd = [sys.executable, "-m", "experiments.benchmark", "--dataset", d,
           "--seeds", str(args.seeds), "--out", str(args.out / d),
           "--methods", ",".join(names), "--tune", "--tune-missing",
           "--tune-seeds", str(args.tune_seeds)]
    if args.data_dir and d in GRAPHS:
      cmd += ["--data-dir", args.data_dir]
    t0 = time.perf_counter()
    print(f"[comparison] {d}: start", file=sys.stderr, flush=True)
    (args.out / d).mkdir(parents=True, exist_ok=True)
    with open(args.out / d / "log.txt", "a") as log:  # progress bars, table
      rc = subprocess.call(cmd, stdout=log, stderr=log)
    print(f"[comparison] {d}: rc {rc}, {time.perf_counter() - t0:.0f} s",
          file=sys.stderr, flush=True)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", type=Path, default=Path("experiments/results"))
  parser.add_argument("--datasets", default=",".join(PRIORITY))
  parser.add_argument("--seeds", type=int, default=10)
  parser.add_argument("--tune-seeds", type=int, default=2)
  parser.add_argument("--methods", default=",".join(
      methods_lib.DEFAULT_METHODS))
  parser.add_argument("--data-dir", default=None)
  parser.add_argument("--jobs", type=int, default=2, choices=(1, 2))
  args = parser.parse_args(argv)
  names = [m for m in args.methods.split(",") if m]
  datasets = [d for d in args.datasets.split(",") if d]
  t0 = time.perf_counter()
  if args.jobs == 1:
    run_queue(datasets, args, names)
  else:
    import threading  # pylint: disable=import-outside-toplevel
    second = [d for d in datasets if d in GRAPHS]
    first = [d for d in datasets if d not in GRAPHS]
    threads = [threading.Thread(target=run_queue, args=(q, args, names))
               for q in (first, second) if q]
    for t in threads:
      t.start()
    for t in threads:
      t.join()
  from experiments import report  # pylint: disable=import-outside-toplevel
  text = report.comparison_text(args.out)
  (args.out / "comparison.md").write_text(text)
  print(text)
  print(f"[comparison] total wall {time.perf_counter() - t0:.0f} s",
        file=sys.stderr)


if __name__ == "__main__":
  main()
