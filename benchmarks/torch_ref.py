"""Optional PyTorch references: LeNet-5 and ResNet-20 training steps, PGD-40.

Only imported when ``torch`` is installed (it is not a dependency of the
project: ``pip install torch`` into your own environment to enable it). The
cases run in a worker process (``benchmarks._harness.WorkerCase``), so that
torch's thread pool and XLA's never share a process, and are interleaved
with the JAX cases, which makes "JAX vs PyTorch" a same-run ratio.

The network mirrors ``gce_jax.models.LeNet5`` (conv6@5x5 pad 2, pool,
conv16@5x5, pool, 120, 84, K; ReLU) in PyTorch's NCHW layout; the optimiser is
the authors' Adam(1e-3, betas (0.9, 0.99)); inputs are synthetic. ResNet-20
mirrors ``gce_jax.models.CifarResNet(depth=20)`` (He et al.'s CIFAR ResNet,
option-A shortcuts, BatchNorm momentum 0.1 = flax's 0.9, eps 1e-5), trained
with SGD(0.1, momentum 0.9) in train mode.
"""

from __future__ import annotations

from benchmarks._harness import FnCase


def _lenet(num_classes: int = 10):
    import torch.nn as tnn

    return tnn.Sequential(
        tnn.Conv2d(1, 6, 5, padding=2), tnn.ReLU(), tnn.MaxPool2d(2),
        tnn.Conv2d(6, 16, 5), tnn.ReLU(), tnn.MaxPool2d(2), tnn.Flatten(),
        tnn.Linear(400, 120), tnn.ReLU(), tnn.Linear(120, 84), tnn.ReLU(),
        tnn.Linear(84, num_classes))


def _step_case(name: str, model, make_opt, shape: tuple[int, ...], batch: int,
               threads: int | None) -> FnCase:
    """Repeated training steps on a fixed synthetic batch (one unit = one step)."""
    import torch
    import torch.nn.functional as F

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = model()
    opt = make_opt(model.parameters())
    x = torch.rand(batch, *shape)
    y = torch.randint(0, 10, (batch,))

    def run(n: int) -> None:
        for _ in range(n):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()

    case = FnCase(name, run, items_per_unit=batch)
    case.info = {"threads": torch.get_num_threads(), "torch": torch.__version__}
    return case


def train_case(name: str = "pytorch", batch: int = 64, threads: int | None = None) -> FnCase:
    """LeNet-5, Adam(1e-3, betas (0.9, 0.99)), MNIST shapes."""
    import torch

    return _step_case(name, _lenet, lambda p: torch.optim.Adam(p, lr=1e-3, betas=(0.9, 0.99)),
                      (1, 28, 28), batch, threads)


def pgd_case(name: str = "pytorch pgd", batch: int = 500, steps: int = 40, eps: float = 0.3,
             step_size: float = 0.01, threads: int | None = None) -> FnCase:
    """One L-inf PGD attack (random start, cross-entropy) on a batch (unit = attack)."""
    import torch
    import torch.nn.functional as F

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = _lenet().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    x = torch.rand(batch, 1, 28, 28)
    y = model(x).argmax(1)

    def attack() -> torch.Tensor:
        xa = (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0, 1)
        for _ in range(steps):
            xa.requires_grad_(True)
            loss = F.cross_entropy(model(xa), y, reduction="sum")
            (g,) = torch.autograd.grad(loss, xa)
            with torch.no_grad():
                xa = torch.min(torch.max(xa + step_size * g.sign(), x - eps), x + eps)
                xa = xa.clamp(0, 1)
        return xa

    def run(n: int) -> None:
        for _ in range(n):
            attack()

    case = FnCase(name, run, items_per_unit=batch)
    case.info = {"threads": torch.get_num_threads(), "torch": torch.__version__}
    return case


def _resnet20(num_classes: int = 10):
    import torch.nn as tnn
    import torch.nn.functional as F

    class Block(tnn.Module):
        def __init__(self, cin: int, cout: int, stride: int):
            super().__init__()
            self.c1 = tnn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.b1 = tnn.BatchNorm2d(cout)
            self.c2 = tnn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.b2 = tnn.BatchNorm2d(cout)
            self.stride, self.extra = stride, cout - cin

        def forward(self, x):
            y = self.b2(self.c2(F.relu(self.b1(self.c1(x)))))
            s = x[:, :, ::self.stride, ::self.stride]
            if self.extra:  # option A: zero-padded extra channels
                s = F.pad(s, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))
            return F.relu(y + s)

    layers, cin = [tnn.Conv2d(3, 16, 3, 1, 1, bias=False), tnn.BatchNorm2d(16), tnn.ReLU()], 16
    for stage, cout in enumerate((16, 32, 64)):
        for block in range(3):
            layers.append(Block(cin, cout, 2 if stage > 0 and block == 0 else 1))
            cin = cout
    layers += [tnn.AdaptiveAvgPool2d(1), tnn.Flatten(), tnn.Linear(64, num_classes)]
    return tnn.Sequential(*layers)


def resnet20_train_case(name: str = "pytorch resnet20", batch: int = 128,
                        threads: int | None = None) -> FnCase:
    """ResNet-20 in train mode, SGD(0.1, momentum 0.9), CIFAR shapes."""
    import torch

    return _step_case(name, lambda: _resnet20().train(),
                      lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), (3, 32, 32), batch,
                      threads)
