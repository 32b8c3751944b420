"""Convert, calibrate and distill a Fashion-MNIST CNN with dsrewrite: the whole story, end to end.

    apt-get install -y dataset-fashion-mnist        # the real data, no download
    pip install -e .
    python examples/finetune_fashion_mnist.py --model resnet --target-macs 0.33

1. train the standard CNN (or load it from --weights if that file exists);
2. convert it: every 3×3 conv but the stem becomes depthwise + pointwise, each layer's rank
   chosen so the model keeps at most --target-macs of its MACs;
3. calibrate: refit each block on 1024 unlabeled training images (no labels, no gradients);
4. distill: one epoch with the original model as teacher;
5. evaluate after each step and save the converted model.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fashion_cnns import MODELS  # noqa: E402

import dsrewrite  # noqa: E402
from dsrewrite.data import fashion_mnist  # noqa: E402


def loader(x, y, batch_size, shuffle, seed=0):
    """A simple in-memory loader (a list of batches); pass your own DataLoader just the same."""
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(len(x))
    return [(x[order[i:i + batch_size]], y[order[i:i + batch_size]]) for i in range(0, len(x), batch_size)]


def train(model, x, y, epochs, batch_size=128, lr=0.1, seed=0, log=print):
    """Plain supervised training: SGD with momentum and a one-cycle schedule."""
    torch.manual_seed(seed)
    steps = epochs * math.ceil(len(x) / batch_size)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    model.train()
    for epoch in range(epochs):
        start = time.perf_counter()
        for xb, yb in loader(x, y, batch_size, shuffle=True, seed=seed + epoch):
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(xb), yb)
            loss.backward()
            opt.step()
            schedule.step()
        log(f"  epoch {epoch + 1}/{epochs}: loss {float(loss):.4f} ({time.perf_counter() - start:.0f}s)")
    return model


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="resnet")
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=3, help="training epochs of the original model")
    parser.add_argument("--weights", default=None, help="trained original weights (loaded if present, else saved)")
    parser.add_argument("--target-macs", type=float, default=0.33, help="fraction of the original MACs to keep")
    parser.add_argument("--calibration-images", type=int, default=1024)
    parser.add_argument("--distill-epochs", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("-o", "--output", default="fashion_ds.pt", help="where to save the converted model")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    x_train, y_train = fashion_mnist("train")
    x_test, y_test = fashion_mnist("test")
    test = loader(x_test, y_test, 1000, shuffle=False)

    torch.manual_seed(0)
    original = MODELS[args.model](args.width)
    weights = Path(args.weights) if args.weights else None
    if weights and weights.exists():
        original.load_state_dict(torch.load(weights, weights_only=True))
        print(f"loaded {weights}")
    else:
        print(f"training the original {args.model} for {args.epochs} epochs ...")
        train(original, x_train, y_train, args.epochs)
        if weights:
            torch.save(original.state_dict(), weights)
    print(f"original: {100 * dsrewrite.evaluate(original, test):.2f}% test accuracy")

    calibration = [x for x, _ in loader(x_train[:args.calibration_images], y_train[:args.calibration_images], 128,
                                        shuffle=False)]
    result = dsrewrite.convert(original, (1, 1, 28, 28), rules="finetune", calibration=calibration,
                               target_macs=args.target_macs)
    converted, report = result.model, result.report
    print(f"converted: {report.ratios()['macs']:.2f}× fewer MACs, {report.ratios()['params']:.2f}× fewer params; "
          f"calibrated on {report.calibration['samples']} unlabeled images "
          f"(output error {report.calibration['before']['relative_error']:.3f} → "
          f"{report.calibration['after']['relative_error']:.3f})")
    print(f"after calibration: {100 * dsrewrite.evaluate(converted, test):.2f}% test accuracy")

    history = dsrewrite.distill(converted, original, loader(x_train, y_train, 128, shuffle=True, seed=7),
                                epochs=args.distill_epochs, eval_loader=test, progress=True)
    print(f"after {args.distill_epochs} epoch(s) of distillation: {100 * history[-1].accuracy:.2f}% test accuracy")
    torch.save(converted, args.output)
    print(f"saved {args.output} (torch.load({args.output!r}, weights_only=False))")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
