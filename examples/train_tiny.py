"""A small real training loop on the CPU, marked in phases for ``wattspan run``.

    wattspan run -- python examples/train_tiny.py
    wattspan audit --out audit.html

A two-layer MLP (torch) learns a fixed random teacher network's labels on
synthetic data (made here from a seed: nothing is downloaded). Each epoch is a
phase ("train epoch N"), and so is each evaluation, so the report can split
training from evaluation. Outside ``wattspan run`` the phases do nothing.

Options: ``--epochs`` (default 3), ``--samples`` (default 40000), ``--hidden``
(default 256), ``--threads`` (torch threads, default 1), ``--seed``.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

import wattspan


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--samples", type=int, default=40000)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(max(1, args.threads))

    with wattspan.phase("prepare data"):
        d_in, n_cls = 64, 10
        teacher = nn.Sequential(nn.Linear(d_in, 128), nn.Tanh(), nn.Linear(128, n_cls))
        x = torch.randn(args.samples, d_in)
        with torch.no_grad():
            y = teacher(x).argmax(1)
        n_train = int(0.8 * args.samples)
        xtr, ytr, xte, yte = x[:n_train], y[:n_train], x[n_train:], y[n_train:]

    model = nn.Sequential(nn.Linear(d_in, args.hidden), nn.ReLU(), nn.Linear(args.hidden, args.hidden), nn.ReLU(), nn.Linear(args.hidden, n_cls))
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(1, args.epochs + 1):
        t0 = time.perf_counter()
        with wattspan.phase(f"train epoch {epoch}"):
            model.train()
            perm = torch.randperm(n_train)
            total = 0.0
            for i in range(0, n_train, 128):
                idx = perm[i:i + 128]
                opt.zero_grad()
                loss = loss_fn(model(xtr[idx]), ytr[idx])
                loss.backward()
                opt.step()
                total += loss.item() * idx.shape[0]
        with wattspan.phase("evaluate"):
            model.eval()
            with torch.no_grad():
                acc = float((model(xte).argmax(1) == yte).float().mean())
        print(f"epoch {epoch}: loss {total / n_train:.4f}, test accuracy {acc:.3f} ({time.perf_counter() - t0:.1f} s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
