"""The folds of one strategy as one vmapped ensemble against one job after the other (issue 15, part 3).

Run: ``python benchmarks/bench_ensemble.py [--members 5] [--size 64] [--batch 2] [--threads 2] [--repeats 5]``;
``--quick``: 3 members, 3 repeats. One process, freshly initialised ResNet-18s (one output, as the grid's binary
jobs), the study's step: ``BCEWithLogitsLoss``, Adam at 1e-4 (:func:`maskaudit.train.adam`, fused), each member its
own batch, optimiser state and BatchNorm statistics. Two ways, each timed ``--repeats`` times in turn (median of
10 steps), after three untimed warm-up steps, the process keeping freed memory as training does
(:func:`maskaudit.processes.keep_freed_memory`):

(a) one after the other: each member's step (forward, backward, Adam) as a training job takes it;
(b) one vmapped step: the members' parameters and buffers stacked (``torch.func.stack_module_state``), the gradient
    of every member in one call (``torch.func.vmap`` over ``torch.func.grad_and_value`` of a ``functional_call``:
    https://pytorch.org/tutorials/intermediate/ensembling.html), then one Adam over the stacked parameters.

Before timing, it checks the issue's condition, that the ensemble's members get the gradients and BatchNorm
statistics they get alone, and prints the largest difference: under vmap a convolution with one weight per member
runs as one grouped convolution, whose sums are ordered differently (not bit for bit). The last line is
``bench_ensemble: <(a)/(b)>x``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
import torchvision
from torch import nn
from torch.func import functional_call, grad_and_value, stack_module_state, vmap

REPO = Path(__file__).resolve().parents[1]
try:
    import maskaudit  # noqa: F401
except ImportError:  # run from a checkout without an installed package
    sys.path.insert(0, str(REPO / "src"))

from maskaudit.processes import keep_freed_memory  # noqa: E402
from maskaudit.train import adam  # noqa: E402

LR = 1e-4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=5)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="3 members, 3 repeats")
    args = parser.parse_args()
    if args.quick:
        args.members, args.repeats = 3, 3
    keep_freed_memory()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cpu = torch.device("cpu")
    members = [torchvision.models.resnet18(weights=None, num_classes=1).train() for _ in range(args.members)]
    images = torch.randn(args.members, args.batch, 3, args.size, args.size)
    labels = torch.randint(0, 2, (args.members, args.batch, 1)).float()
    loss_fn = nn.BCEWithLogitsLoss()

    alone = [copy.deepcopy(m) for m in members]
    alone_adam = [adam(list(m.parameters()), LR, cpu) for m in alone]

    def one_after_the_other() -> None:
        for model, optimiser, x, y in zip(alone, alone_adam, images, labels, strict=True):
            optimiser.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
            optimiser.step()

    skeleton = copy.deepcopy(members[0]).to("meta")
    params, buffers = stack_module_state([copy.deepcopy(m) for m in members])
    params = {name: p.detach() for name, p in params.items()}
    stacked_adam = adam(list(params.values()), LR, cpu)

    def member_loss(p: dict, b: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return loss_fn(functional_call(skeleton, (p, b), (x,)), y)

    gradients = vmap(grad_and_value(member_loss), randomness="different")

    def vmapped() -> None:
        grads, _ = gradients(params, buffers, images, labels)
        for name, p in params.items():
            p.grad = grads[name]
        stacked_adam.step()

    # the condition, on a first step from the same weights: each member's gradients and statistics
    statistics_after = {name: b.clone() for name, b in buffers.items()}
    grads, _ = gradients(params, statistics_after, images, labels)  # updates the running statistics in place
    worst_grad = worst_stat = 0.0
    for i, model in enumerate(copy.deepcopy(m) for m in members):
        loss_fn(model(images[i]), labels[i]).backward()
        worst_grad = max(worst_grad, *((grads[k][i] - p.grad).abs().max().item() for k, p in model.named_parameters()))
        worst_stat = max(worst_stat, *((statistics_after[k][i] - b).abs().max().item()
                                       for k, b in model.named_buffers() if b.is_floating_point()))
    print(f"{args.members} ResNet-18s, batch {args.batch}, {args.size} px, {args.threads} threads; the ensemble "
          f"against each member alone, first step: largest gradient difference {worst_grad:.2e}, "
          f"largest BatchNorm statistic difference {worst_stat:.2e}"
          f" ({'bit for bit' if worst_grad == 0 and worst_stat == 0 else 'not bit for bit'})")

    ways = {"(a) one after the other": one_after_the_other, "(b) one vmapped step": vmapped}
    for step in ways.values():
        for _ in range(3):
            step()
    seconds: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(args.repeats):
        for name, step in ways.items():
            start = time.perf_counter()
            for _ in range(10):
                step()
            seconds[name].append((time.perf_counter() - start) / 10)
    a, b = (statistics.median(seconds[name]) for name in ways)
    for name, s in zip(ways, (a, b), strict=True):
        print(f"{name}: {s * 1000:.1f} ms for one step of every member, "
              f"{args.members * args.batch / s:.0f} images/s")
    print(f"bench_ensemble: {a / b:.2f}x")


if __name__ == "__main__":
    main()
