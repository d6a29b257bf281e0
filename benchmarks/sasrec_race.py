"""Time to quality on Amazon Games: trainflow's SASRec (1 and 2 processes) vs the reference
PyTorch SASRec (pmixer/SASRec.pytorch in ``../shared/peers``), same data, machine and threads.

Data: ``../shared/data/sasrec_amazon_games/Video.txt`` (the SASRec paper's Amazon Games, its
protocol: last item eval, second-to-last valid, 100 negatives outside the user's train items).
Each contestant runs in a fresh process, one after the other (never two at once), in the order
trainflow 2 processes, peer, trainflow 1 process, ``--rounds`` times:

- trainflow: ``torchrun -m trainflow.trainers.recommendation`` on the sharded dataset (sharded once
  before the clocks start; the time is reported), SASRec with dropout 0.5 (the paper's for sparse
  data), ``--max-seq-len`` (default 20, chosen on ``valid``: docs/quality.md) and trainflow's
  ML-100K settings (hidden 64, 1 negative, batch 256, lr 0.002) or, with ``--settings games``, the
  Amazon Games settings chosen on ``valid`` (batch 128, 4 negatives, cosine lr, Adam beta2 0.98),
  ``--epochs`` epochs, one torch thread a process. Its clock: from the launch to each epoch's
  ``valid`` line (its per-epoch ``valid`` evaluation over every user and the checkpoints are
  inside the clock); ``eval`` is measured once at the end on the best ``valid`` epoch.
- peer: ``benchmarks/_sasrec_peer.py`` (the peer's own model, sampler, loss and evaluation
  functions; batch 128, lr 0.001, hidden 50, maxlen 50, dropout 0.5: the paper's settings),
  ``--peer-threads`` torch threads (default 1: with 2, each of its one-user ``predict`` calls
  took ~170 ms instead of ~8 ms on the loaded 2-core machine) plus its own 3 sampler
  processes, trained for as many seconds as the trainflow 2-process run took to finish (or
  ``--peer-budget`` seconds),
  evaluated every ``--peer-eval-every`` epochs; its evaluation time is *not* on its clock.

Lines: the seconds each contestant needs to reach ``valid`` HR@10 >= ``--target`` (0.70),
and each one's ``valid`` HR@10 / NDCG@10 at the trainflow 2-process run's wall time, with the
whole curves in ``params``. The ``valid`` metrics are what both sides compute every epoch
(trainflow: every user, fixed negatives; the peer: 10,000 sampled users, fresh negatives
each call): ``eval`` numbers are in ``params`` (trainflow: once at the end; the peer: at each
evaluation).

    python -m benchmarks.sasrec_race                 # full data, 6 epochs, 1 round
    python -m benchmarks.sasrec_race --quick         # 1,500 users, 1 epoch, target 0 (CI smoke run)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import ROOT, child_env, emit, machine, skip

SHARED = Path(os.environ.get("TRAINFLOW_SHARED_DIR") or ROOT.parent / "shared")
DATA = SHARED / "data" / "sasrec_amazon_games" / "Video.txt"
PEER = SHARED / "peers" / "sasrec-pytorch"
VALID_LINE = re.compile(r"epoch (\d+)/(\d+) done: valid (.*)$")
_COMMON = ["--model", "sasrec", "--family.hidden_size=64", "--family.dropout=0.5", "--learning-rate", "0.002",
           "--train.log_to_mlflow=false", "--train.log_every_steps=100"]
SETTINGS = {
    # trainflow's ML-100K SASRec settings with the paper's dropout for sparse data (the first race)
    "ml100k": [*_COMMON, "--family.num_negatives=1", "--batch-size", "256"],
    # the Amazon Games settings chosen on `valid` (docs/quality.md, runs 4-8): batch 128, 4 negatives
    # a position, a cosine learning rate over the run's epochs, Adam beta2 0.98
    "games": [*_COMMON, "--family.num_negatives=4", "--batch-size", "128", "--train.lr_schedule=cosine",
              "--train.adam_beta2=0.98"],
    # the same with the sampled softmax chosen on `valid` later (docs/quality.md, run 12): 256
    # negatives a window instead of BCE with 4 a position
    "games-softmax": [*_COMMON, "--family.num_negatives=256", "--family.loss=softmax", "--batch-size", "128",
                      "--train.lr_schedule=cosine", "--train.adam_beta2=0.98"],
}
TRAINFLOW_SETTINGS = SETTINGS["ml100k"]


def _metrics(text: str) -> dict[str, float]:
    return {k: float(v) for k, v in (kv.split("=", 1) for kv in text.split())}


def subset(path: Path, users: int, out: Path) -> Path:
    """The lines of the first ``users`` user ids (a small file for the quick run)."""
    with open(path) as src, open(out, "w") as dst:
        for line in src:
            if line.strip() and int(line.split()[0]) <= users:
                dst.write(line)
    return out


def shard(data: Path, work: Path) -> tuple[str, float]:
    from trainflow.tasks.settings import Settings
    from trainflow.tasks.sharding import shard_dataset

    started = time.monotonic()
    settings = Settings.from_env({"TRAINFLOW_DATA_DIR": str(work / "store")})
    uri = shard_dataset(str(data), "recommendation", settings=settings)["manifest_uri"]
    return uri, time.monotonic() - started


def run_trainflow(uri: str, nproc: int, epochs: int, run_dir: Path, max_seq_len: int,
                  settings: list[str] = TRAINFLOW_SETTINGS) -> dict:
    """One torchrun launch; the valid curve with the seconds since the launch, and the result."""
    threads = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "-m", "trainflow.trainers.recommendation", "--manifest-uri", uri, "--run-dir", run_dir.as_uri(),
           "--epochs", str(epochs), f"--family.max_seq_len={max_seq_len}", *settings]
    env = child_env(OMP_NUM_THREADS=threads)
    env["OMP_NUM_THREADS"] = threads
    started = time.monotonic()
    curve = []
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tail: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        tail = (tail + [line])[-40:]
        match = VALID_LINE.search(line.rstrip())
        if match:
            m = _metrics(match.group(3).replace(" (best so far)", ""))
            curve.append({"epoch": int(match.group(1)), "wall_s": round(time.monotonic() - started, 2),
                          "valid_hr_at_10": m["hr_at_10"], "valid_ndcg_at_10": m["ndcg_at_10"]})
    if proc.wait() != 0:
        raise RuntimeError(f"trainflow ({nproc} processes) failed:\n{''.join(tail)}")
    result = json.loads((run_dir / "result.json").read_text())
    return {"curve": curve, "wall_s": round(time.monotonic() - started, 2), "train_seconds": result["train_seconds"],
            "eval": result["metrics"]["eval"], "best_epoch": result["best_epoch"],
            "samples_per_s": result["samples_per_s"]}


def run_peer(data: Path, budget: float, eval_every: int, threads: int) -> dict:
    cmd = [sys.executable, "-m", "benchmarks._sasrec_peer", str(PEER), str(data), "--budget", str(budget),
           "--eval-every", str(eval_every), "--threads", str(threads)]
    env = child_env()
    env["OMP_NUM_THREADS"] = str(threads)
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=budget * 4 + 600)
    if out.returncode != 0:
        raise RuntimeError(f"peer failed:\n{out.stderr[-3000:]}")
    # The peer's evaluate() prints progress dots without a newline before each JSON line.
    rows = [json.loads(line[line.index("{"):]) for line in out.stdout.splitlines() if "{" in line]
    done = rows[-1]
    curve = [{"epoch": r["epoch"], "wall_s": r["train_s"] + r["setup_s"], "wall_with_eval_s": r["wall_s"],
              "valid_hr_at_10": r["valid_hr_at_10"], "valid_ndcg_at_10": r["valid_ndcg_at_10"],
              "eval_hr_at_10": r["eval_hr_at_10"], "eval_ndcg_at_10": r["eval_ndcg_at_10"]} for r in rows[:-1]]
    return {"curve": curve, "train_s": done["train_s"], "wall_s": done["wall_s"], "epochs": done["epochs"]}


def _progress(name: str, run: dict) -> dict:
    """Each contestant's run on stderr as it finishes (the result lines come at the end)."""
    print(json.dumps({"contestant": name, "load_1m": round(os.getloadavg()[0], 2), **run}), file=sys.stderr, flush=True)
    return run


def time_to(curve: list[dict], target: float) -> float | None:
    return next((c["wall_s"] for c in curve if c["valid_hr_at_10"] >= target), None)


def at_time(curve: list[dict], seconds: float) -> dict | None:
    """The last evaluation done by ``seconds`` (on the contestant's clock)."""
    done = [c for c in curve if c["wall_s"] <= seconds + 1e-6]
    return done[-1] if done else None


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--target", type=float, help="valid HR@10 to reach (default 0.70; --quick: 0, a smoke run)")
    parser.add_argument("--peer-eval-every", type=int, default=4)
    parser.add_argument("--peer-threads", type=int, default=1,
                        help="torch threads of the peer (2 made each of its predict calls ~20x slower on the "
                             "loaded 2-core machine: OpenMP barriers)")
    parser.add_argument("--max-seq-len", type=int, default=20, help="trainflow's SASRec max_seq_len")
    parser.add_argument("--skip-one-process", action="store_true")
    parser.add_argument("--settings", choices=sorted(SETTINGS), default="ml100k",
                        help="trainflow's settings: ml100k (batch 256, 1 negative, constant lr), games (the "
                             "Amazon Games settings chosen on valid: batch 128, 4 negatives, cosine lr, beta2 0.98) "
                             "or games-softmax (the same with a sampled softmax over 256 negatives, chosen later)")
    parser.add_argument("--peer-budget", type=float,
                        help="seconds of training for the peer (default: the trainflow 2-process run's wall time)")
    args = parser.parse_args(argv)
    settings = SETTINGS[args.settings]
    names = ("sasrec_amazon_seconds_to_hr70", "sasrec_amazon_valid_hr_at_equal_time",
             "sasrec_amazon_valid_ndcg_at_equal_time")
    if not DATA.exists():
        return [skip(n, "s", f"Amazon Games data not found at {DATA} (../shared absent)") for n in names]
    epochs = args.epochs or (1 if args.quick else 6)
    if args.target is None:
        args.target = 0.0 if args.quick else 0.70
    work = Path(tempfile.mkdtemp(prefix="sasrec-race-"))
    data = subset(DATA, 1500, work / "Video.txt") if args.quick else DATA
    uri, shard_s = shard(data, work)
    peers = os.environ.get("TRAINFLOW_BENCH_PEERS", "1") != "0"
    peer_missing = None if PEER.exists() else f"peer not found at {PEER} (../shared absent)"
    if not peers:
        peer_missing = "peers disabled (TRAINFLOW_BENCH_PEERS=0)"
    common = {"data": str(data), "epochs": epochs, "target_valid_hr_at_10": args.target, "shard_s": round(shard_s, 2),
              "settings": args.settings,
              "trainflow_settings": " ".join(settings) + f" --family.max_seq_len={args.max_seq_len}",
              "torch_threads": {"trainflow": "1 per process", "peer": args.peer_threads}}
    lines = []
    for rnd in range(args.rounds):
        load_before = os.getloadavg()
        two = _progress("trainflow_2proc",
                        run_trainflow(uri, 2, epochs, work / f"tf2-{rnd}", args.max_seq_len, settings))
        peer = None if peer_missing else _progress(
            "peer", run_peer(data, args.peer_budget or two["wall_s"], args.peer_eval_every, args.peer_threads))
        one = None if args.skip_one_process else _progress(
            "trainflow_1proc", run_trainflow(uri, 1, epochs, work / f"tf1-{rnd}", args.max_seq_len, settings))
        load_after = os.getloadavg()
        params = {**common, "round": rnd, "machine": machine(), "load_1m_5m_15m_before": [round(x, 2) for x in load_before],
                  "load_1m_5m_15m_after": [round(x, 2) for x in load_after],
                  "trainflow_2proc": two, "trainflow_1proc": one, "peer": peer, "peer_skipped": peer_missing}
        budget = two["wall_s"]
        reach = {"trainflow_2proc": time_to(two["curve"], args.target),
                 "trainflow_1proc": time_to(one["curve"], args.target) if one else None,
                 "peer": time_to(peer["curve"], args.target) if peer else None}
        at = {"trainflow_2proc": at_time(two["curve"], budget),
              "trainflow_1proc": at_time(one["curve"], budget) if one else None,
              "peer": at_time(peer["curve"], budget) if peer else None}
        params = {**params, "seconds_to_target": reach, "at_equal_time": at, "equal_time_s": budget}
        base = reach["peer"]
        lines.append(emit(names[0], reach["trainflow_2proc"], "s", base, params)
                     if reach["trainflow_2proc"] is not None else
                     skip(names[0], "s", f"trainflow (2 processes) did not reach valid HR@10 {args.target} "
                                         f"in {epochs} epochs", params))
        for name, key in ((names[1], "valid_hr_at_10"), (names[2], "valid_ndcg_at_10")):
            value = (at["trainflow_2proc"] or {}).get(key)
            baseline = (at["peer"] or {}).get(key)
            lines.append(emit(name, value, "fraction", baseline, {"round": rnd, "equal_time_s": budget})
                         if value is not None else skip(name, "fraction", "no trainflow evaluation in the budget"))
    return lines


if __name__ == "__main__":
    main()
