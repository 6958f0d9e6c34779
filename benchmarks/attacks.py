"""Throughput of every attack on LeNet-5 / MNIST-shaped inputs, vs fwd+bwd.

    python benchmarks/attacks.py            # paper settings, batch 500
    python benchmarks/attacks.py --quick    # smaller batch and budgets

For each attack the table shows images/s and the ratio

    attack time / (iterations x time of one jitted forward+backward pass)

measured in the same run on the same batch (random LeNet-5 weights; labels are
the model's own predictions so every example starts "correct"). Compilation
is excluded (one warm-up call), every call ends in ``block_until_ready``, and
times are medians over ``--repeats`` rounds through all attacks; each attack
call is paired with a fwd+bwd reference timed just before it. Iterations are model evaluations:
gradient steps for the gradient attacks (APGD: steps + 1), forward passes for
Square (its ratio is against fwd+bwd, so < 1 is expected), and the *maximum*
iteration count for attacks that stop early (JSMA, C&W, Square; marked '*'):
their ratio is not a per-iteration overhead, only a fraction of the worst
case. Target for the fixed-length iterative attacks: ratio <= ~1.2. The row
``[fwd+bwd in fori_loop]`` is a bare 40-step sign-gradient loop: on XLA:CPU a
while loop alone costs noticeably more than the same steps as separate jitted
calls, so compare the attacks' ratios with it too.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from gce_jax import attacks as A  # noqa: E402
from gce_jax.losses import cross_entropy  # noqa: E402
from gce_jax.models import get_model  # noqa: E402


def once(fn) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - t0


def timed(fn, repeats: int) -> float:
    jax.block_until_ready(fn())  # warm-up: compilation excluded
    return statistics.median(once(fn) for _ in range(repeats))


def configs(quick: bool, eps: float):
    """(label, attack name, kwargs, nominal iterations, stops early)."""
    if quick:
        cw = dict(binary_steps=2, steps=100)
        sq, gamma = 500, 0.1
    else:
        cw = dict(binary_steps=9, steps=1000)
        sq, gamma = 5000, 0.25
    n_pixels = 28 * 28
    return [
        ("fgsm", "fgsm", dict(eps=eps), 1, False),
        ("bim (10)", "bim", dict(eps=eps), 10, False),
        ("pgd (40)", "pgd", dict(eps=eps), 40, False),
        ("mim (40)", "mim", dict(eps=eps), 40, False),
        ("pgd_l2 (40)", "pgd_l2", dict(eps=2.0), 40, False),
        ("apgd-ce (100)", "apgd", dict(eps=eps), 101, False),
        ("apgd-dlr (100)", "apgd", dict(eps=eps, loss="dlr"), 101, False),
        (f"square ({sq} q)", "square", dict(eps=eps, n_queries=sq), sq, True),
        (f"jsma (gamma {gamma})", "jsma", dict(gamma=gamma),
         int(gamma * n_pixels / 2), True),
        (f"cw-l2 ({cw['binary_steps']}x{cw['steps']})", "carlini_wagner_l2", cw,
         cw["binary_steps"] * cw["steps"], True),
    ]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller batch and budgets")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--eps", type=float, default=0.3)
    parser.add_argument("--only", nargs="*", default=None, help="attack labels to run")
    args = parser.parse_args(argv)
    batch = args.batch or (128 if args.quick else 500)
    repeats = args.repeats or (3 if args.quick else 5)

    model = get_model("lenet5", num_classes=10)
    x = jax.random.uniform(jax.random.key(0), (batch, 28, 28, 1))
    variables = model.init(jax.random.key(1), x[:1])
    fn = A.inference_logits_fn(model, variables)
    y = jnp.argmax(fn(x), axis=-1)
    key = jax.random.key(2)

    fwd_bwd = jax.jit(jax.grad(lambda v, xb: jnp.sum(cross_entropy(
        model.apply(v, xb, train=False), y)), argnums=1))
    fwd = jax.jit(lambda v, xb: model.apply(v, xb, train=False))
    t_fb = timed(lambda: fwd_bwd(variables, x), max(repeats, 20))
    t_f = timed(lambda: fwd(variables, x), max(repeats, 20))

    # Second reference: the same fwd+bwd, 40 times inside one lax.fori_loop
    # (a bare sign-gradient loop). It separates what the loop itself costs on
    # this backend from what the attack adds on top.
    @jax.jit
    def bare_loop(v, xb):
        def body(_, xa):
            g = jax.grad(lambda z: jnp.sum(cross_entropy(model.apply(v, z, train=False), y)))(xa)
            return jnp.clip(xa + 1e-3 * jnp.sign(g), 0.0, 1.0)
        return jax.lax.fori_loop(0, 40, body, xb)

    # Rows: (label, thunk, iterations, stops early).
    rows = [("[fwd+bwd in fori_loop]", lambda: bare_loop(variables, x), 40, False)]
    for label, name, kw, iters, early in configs(args.quick, args.eps):
        if args.only and not any(o in label for o in args.only):
            continue
        attack = A.ATTACKS[name]
        rows.append((label, lambda attack=attack, kw=kw: attack(fn, x, y, key=key, **kw),
                     iters, early))
    for _, thunk, _, _ in rows:
        jax.block_until_ready(thunk())  # compile everything first

    # Rounds over all rows, each attack timing paired with a fwd+bwd reference
    # taken just before it: on a shared machine the load drifts over minutes,
    # and pairing keeps the ratio honest where absolute times are not.
    times = {label: [] for label, *_ in rows}
    ratios = {label: [] for label, *_ in rows}
    for r in range(repeats):
        for label, thunk, iters, _ in rows:
            if label.startswith("cw-l2") and not args.quick and r > 0:
                continue  # minutes per call at the paper's settings: once is enough
            ref = statistics.median(once(lambda: fwd_bwd(variables, x)) for _ in range(5))
            t = once(thunk)
            times[label].append(t)
            ratios[label].append(t / (iters * ref))

    print(f"device: {jax.devices()[0].device_kind}  batch {batch}  eps {args.eps}  "
          f"repeats {repeats}{'  (quick)' if args.quick else ''}")
    print(f"reference: fwd+bwd {t_fb * 1e3:.2f} ms   fwd {t_f * 1e3:.2f} ms   "
          f"({batch / t_fb:,.0f} img/s fwd+bwd)")
    header = f"{'attack':<24}{'iters':>7}{'time (s)':>11}{'img/s':>11}{'ratio':>8}"
    print(header)
    print("-" * len(header))
    for label, _, iters, early in rows:
        t = statistics.median(times[label])
        ratio = statistics.median(ratios[label])
        print(f"{label:<24}{iters:>7}{t:>11.3f}{batch / t:>11,.0f}"
              f"{ratio:>7.2f}{'*' if early else ' '}")
    print("ratio = attack time / (iters x fwd+bwd time measured just before it), median "
          "over rounds")
    print("* stops early per example: ratio against the maximum iteration count "
          "(Square: forward passes vs fwd+bwd)")


if __name__ == "__main__":
    main()
