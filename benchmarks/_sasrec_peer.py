"""Train the reference SASRec (pmixer/SASRec.pytorch, ``../shared/peers/sasrec-pytorch``,
unchanged and never copied here) for a wall-clock budget, evaluating as it goes.

    python -m benchmarks._sasrec_peer PEER_DIR DATA_TXT --budget 600 --eval-every 2 --threads 2

Imports the peer's own ``model.py`` and ``utils.py`` from ``PEER_DIR`` and runs exactly the
training step of its ``main.py`` (its ``WarpSampler`` with 3 sampler processes, xavier-normal
init with zeroed padding rows, Adam(lr, betas 0.9/0.98), BCE on the positive and one negative
at every non-padding position, ``l2_emb`` on the item table): ``main.py`` itself evaluates only
every 20 epochs, too coarse for a time-to-quality curve, so this driver calls the peer's
``evaluate_valid`` / ``evaluate`` every ``--eval-every`` epochs instead. The peer's evaluation
(one user at a time, 10,000 sampled users, fresh random negatives each call) is not counted
in ``train_s`` (``main.py``'s own ``T`` excludes it too) but is in ``wall_s``. One JSON line per
evaluation, then a final one with ``"done": true``. The peer reads ``data/<name>.txt``
relative to its working folder: a temporary folder with a link to ``DATA_TXT``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import types


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("peer_dir")
    parser.add_argument("data_txt")
    parser.add_argument("--budget", type=float, required=True, help="wall seconds of training (evaluations excluded)")
    parser.add_argument("--eval-every", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-epochs", type=int, default=1000)
    # The SASRec paper's settings for the sparse Amazon data (main.py's defaults otherwise).
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.001)
    parser.add_argument("--maxlen", type=int, default=50)
    parser.add_argument("--hidden_units", type=int, default=50)
    parser.add_argument("--num_blocks", type=int, default=2)
    parser.add_argument("--num_heads", type=int, default=1)
    parser.add_argument("--dropout_rate", type=float, default=0.5)
    parser.add_argument("--l2_emb", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    started = time.monotonic()

    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    import random

    random.seed(args.seed)
    work = tempfile.mkdtemp(prefix="sasrec-peer-")
    os.makedirs(os.path.join(work, "data"))
    name = os.path.splitext(os.path.basename(args.data_txt))[0]
    os.symlink(os.path.abspath(args.data_txt), os.path.join(work, "data", f"{name}.txt"))
    os.chdir(work)
    sys.path.insert(0, os.path.abspath(args.peer_dir))
    from model import SASRec  # the peer's files
    from utils import WarpSampler, data_partition, evaluate, evaluate_valid

    peer_args = types.SimpleNamespace(device="cpu", norm_first=False, hidden_units=args.hidden_units,
                                      maxlen=args.maxlen, dropout_rate=args.dropout_rate,
                                      num_blocks=args.num_blocks, num_heads=args.num_heads)
    dataset = data_partition(name)
    user_train, _, _, usernum, itemnum = dataset
    num_batch = (len(user_train) - 1) // args.batch_size + 1
    sampler = WarpSampler(user_train, usernum, itemnum, batch_size=args.batch_size, maxlen=args.maxlen, n_workers=3)
    model = SASRec(usernum, itemnum, peer_args)
    for _, param in model.named_parameters():
        try:
            torch.nn.init.xavier_normal_(param.data)
        except Exception:  # as main.py: 1-d parameters keep their init
            pass
    model.pos_emb.weight.data[0, :] = 0
    model.item_emb.weight.data[0, :] = 0
    model.train()
    bce = torch.nn.BCEWithLogitsLoss()
    adam = torch.optim.Adam(model.parameters(), lr=args.lr, betas=(0.9, 0.98))
    setup_s = time.monotonic() - started
    train_s = 0.0
    epoch = 0
    try:
        while epoch < args.max_epochs and train_s < args.budget:
            epoch += 1
            t0 = time.monotonic()
            for _ in range(num_batch):
                u, seq, pos, neg = sampler.next_batch()
                u, seq, pos, neg = np.array(u), np.array(seq), np.array(pos), np.array(neg)
                pos_logits, neg_logits = model(u, seq, pos, neg)
                pos_labels, neg_labels = torch.ones(pos_logits.shape), torch.zeros(neg_logits.shape)
                adam.zero_grad()
                indices = np.where(pos != 0)
                loss = bce(pos_logits[indices], pos_labels[indices])
                loss += bce(neg_logits[indices], neg_labels[indices])
                for param in model.item_emb.parameters():
                    loss += args.l2_emb * torch.sum(param ** 2)
                loss.backward()
                adam.step()
            train_s += time.monotonic() - t0
            if epoch % args.eval_every == 0 or train_s >= args.budget:
                model.eval()
                e0 = time.monotonic()
                with torch.no_grad():
                    v_ndcg, v_hr = evaluate_valid(model, dataset, peer_args)
                    t_ndcg, t_hr = evaluate(model, dataset, peer_args)
                eval_s = time.monotonic() - e0
                model.train()
                print(json.dumps({"epoch": epoch, "train_s": round(train_s, 2), "setup_s": round(setup_s, 2),
                                  "eval_s": round(eval_s, 2), "wall_s": round(time.monotonic() - started, 2),
                                  "loss": float(loss), "valid_hr_at_10": v_hr, "valid_ndcg_at_10": v_ndcg,
                                  "eval_hr_at_10": t_hr, "eval_ndcg_at_10": t_ndcg}), flush=True)
    finally:
        sampler.close()
    print(json.dumps({"done": True, "epochs": epoch, "train_s": round(train_s, 2),
                      "wall_s": round(time.monotonic() - started, 2), "num_batch": num_batch}), flush=True)


if __name__ == "__main__":
    main()
