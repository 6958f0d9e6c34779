"""Throughput of every attack on LeNet-5 / MNIST-shaped inputs, vs its passes.

    python benchmarks/attacks.py            # paper settings, batch 500
    python benchmarks/attacks.py --quick    # smaller batch and budgets
    python benchmarks/attacks.py --model resnet20 --quick --only fgsm pgd
                                            # CIFAR ResNet-20, both input gradients

For each attack the table shows images/s and the ratio

    attack time / (n_fb x one jitted forward+backward + n_f x one jitted forward)

measured in the same run on the same batch (random LeNet-5 weights; labels are
the model's own predictions so every example starts "correct"). ``n_fb`` and
``n_f`` are the passes the algorithm needs (column ``passes``): gradient steps
for the gradient attacks (APGD: steps + 1 per run), forward passes for Square
(one per query), and for FAB one gradient (FAB-T) or the K-logit Jacobian
(counted as one fwd+bwd, so its ratio is ~K/2 by construction) per iteration
plus one at the start of each run, and one forward per iteration.
Compilation is excluded (one warm-up call), every call
ends in ``block_until_ready``, and times are medians over ``--repeats`` rounds
through all attacks; each call is paired with references timed just before
it. Rows at eps 0 never stop early (nothing is misclassified), so they cost
their full passes: APGD-T, FAB, Square and AutoAttack's worst case. For
attacks that stop early (JSMA, C&W, Square at eps > 0; marked '*') the ratio
is against the *maximum* passes, only a fraction of the worst case. Target
for the fixed-length iterative attacks: ratio <= ~1.2. The rows ``[fwd+bwd in
fori_loop]`` and ``[fwd in fori_loop]`` are bare 40-step loops of the same
passes: on XLA:CPU a loop costs less than the same steps as separate jitted
calls (XLA hoists work out of it), so compare the attacks' ratios with them.
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
from gce_jax.models import get_model, logits_fn  # noqa: E402


def once(fn) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - t0


def timed(fn, repeats: int) -> float:
    jax.block_until_ready(fn())  # warm-up: compilation excluded
    return statistics.median(once(fn) for _ in range(repeats))


def configs(quick: bool, eps: float):
    """(label, attack name, kwargs, (fwd+bwd passes, forward passes), stops early)."""
    if quick:
        cw = dict(binary_steps=2, steps=100)
        sq, gamma, it, nt = 500, 0.1, 20, 3
    else:
        cw = dict(binary_steps=9, steps=1000)
        sq, gamma, it, nt = 5000, 0.25, 100, 9
    n_pixels = 28 * 28
    # AutoAttack at eps 0: every component runs in full on every example.
    aa_passes = ((it + 1) + 2 * nt * (it + 1), nt * it + sq)
    return [
        ("fgsm", "fgsm", dict(eps=eps), (1, 0), False),
        ("bim (10)", "bim", dict(eps=eps), (10, 0), False),
        ("pgd (40)", "pgd", dict(eps=eps), (40, 0), False),
        ("mim (40)", "mim", dict(eps=eps), (40, 0), False),
        ("pgd_l2 (40)", "pgd_l2", dict(eps=2.0), (40, 0), False),
        ("apgd-ce (100)", "apgd", dict(eps=eps), (101, 0), False),
        ("apgd-dlr (100)", "apgd", dict(eps=eps, loss="dlr"), (101, 0), False),
        (f"apgd-t ({nt}x{it}, eps 0)", "apgd",
         dict(eps=0.0, steps=it, targeted=True, n_target_classes=nt), (nt * (it + 1), 0), False),
        (f"fab-t ({nt}x{it}, eps 0)", "fab",
         dict(eps=0.0, steps=it, targeted=True, n_target_classes=nt, final_search_steps=0),
         (nt * (it + 1), nt * it), False),
        (f"fab ({it}, K-Jacobian, eps 0)", "fab", dict(eps=0.0, steps=it, final_search_steps=0),
         (it + 1, it), False),
        (f"square ({sq} q)", "square", dict(eps=eps, n_queries=sq), (0, sq), True),
        (f"square ({sq} q, eps 0)", "square", dict(eps=0.0, n_queries=sq), (0, sq), False),
        (f"autoattack (eps 0, {it} it, {sq} q)", "autoattack",
         dict(eps=0.0, steps=it, n_queries=sq, n_target_classes=nt), aa_passes, False),
        (f"jsma (gamma {gamma})", "jsma", dict(gamma=gamma),
         (int(gamma * n_pixels / 2), 0), True),
        (f"cw-l2 ({cw['binary_steps']}x{cw['steps']})", "carlini_wagner_l2", cw,
         (cw["binary_steps"] * cw["steps"], 0), True),
    ]


def _passes(p: tuple[int, int]) -> str:
    fb, f = p
    return " + ".join(s for s in (f"{fb} fb" if fb else "", f"{f} f" if f else "") if s)


# Rows that take minutes per call at full settings: timed in the first round only.
_ONCE = ("cw-l2", "autoattack", "apgd-t", "fab", "square (5000 q, eps 0)")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller batch and budgets")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--eps", type=float, default=0.3)
    parser.add_argument("--only", nargs="*", default=None, help="attack labels to run")
    parser.add_argument("--model", choices=("lenet5", "resnet20"), default="lenet5",
                        help="resnet20 (CIFAR shapes) adds each attack with XLA's native "
                             "conv input gradient beside the default (gce_jax.models.conv_grad)")
    args = parser.parse_args(argv)
    batch = args.batch or (128 if args.quick else 500)
    repeats = args.repeats or (3 if args.quick else 5)

    model = get_model(args.model, num_classes=10,
                      **({"dataset": "cifar10"} if args.model == "resnet20" else {}))
    shape = (28, 28, 1) if args.model == "lenet5" else (32, 32, 3)
    x = jax.random.uniform(jax.random.key(0), (batch, *shape))
    variables = model.init(jax.random.key(1), x[:1])
    fn = logits_fn(model, variables)
    # The same weights with XLA's own input gradient (CIFAR ResNets only).
    variants = [("", fn)]
    if args.model == "resnet20":
        variants.append((" [native input grad]",
                         logits_fn(model.clone(input_grad="native"), variables)))
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

    @jax.jit
    def bare_fwd_loop(v, xb):
        def body(_, c):
            xa, acc = c
            z = model.apply(v, xa, train=False)
            return jnp.clip(xa + 1e-6 * jnp.sign(z[:, :1, None, None]), 0.0, 1.0), acc + z[:, 0]
        return jax.lax.fori_loop(0, 40, body, (xb, jnp.zeros(xb.shape[0])))

    # Rows: (label, thunk, (fwd+bwd passes, forward passes), stops early).
    rows = [("[fwd+bwd in fori_loop]", lambda: bare_loop(variables, x), (40, 0), False),
            ("[fwd in fori_loop]", lambda: bare_fwd_loop(variables, x), (0, 40), False)]
    for label, name, kw, passes, early in configs(args.quick, args.eps):
        if args.only and not any(o in label for o in args.only):
            continue
        attack = A.ATTACKS[name]
        for suffix, f in variants:
            rows.append((label + suffix,
                         lambda attack=attack, kw=kw, f=f: attack(f, x, y, key=key, **kw),
                         passes, early))
    for _, thunk, _, _ in rows:
        jax.block_until_ready(thunk())  # compile everything first

    # Rounds over all rows, each attack timing paired with a fwd+bwd reference
    # taken just before it: on a shared machine the load drifts over minutes,
    # and pairing keeps the ratio honest where absolute times are not.
    times = {label: [] for label, *_ in rows}
    ratios = {label: [] for label, *_ in rows}
    for r in range(repeats):
        for label, thunk, (n_fb, n_f), _ in rows:
            if label.startswith(_ONCE) and not args.quick and r > 0:
                continue  # minutes per call at the paper's settings: once is enough
            ref_fb = statistics.median(once(lambda: fwd_bwd(variables, x)) for _ in range(5))
            ref_f = statistics.median(once(lambda: fwd(variables, x)) for _ in range(5))
            t = once(thunk)
            times[label].append(t)
            ratios[label].append(t / (n_fb * ref_fb + n_f * ref_f))

    print(f"device: {jax.devices()[0].device_kind}  batch {batch}  eps {args.eps}  "
          f"repeats {repeats}{'  (quick)' if args.quick else ''}")
    print(f"reference: fwd+bwd {t_fb * 1e3:.2f} ms   fwd {t_f * 1e3:.2f} ms   "
          f"({batch / t_fb:,.0f} img/s fwd+bwd)")
    header = (f"{'attack':<56}{'passes':>20}{'time (s)':>11}{'img/s':>11}{'ratio':>8}")
    print(header)
    print("-" * len(header))
    for label, _, passes, early in rows:
        t = statistics.median(times[label])
        ratio = statistics.median(ratios[label])
        print(f"{label:<56}{_passes(passes):>20}{t:>11.3f}{batch / t:>11,.1f}"
              f"{ratio:>7.2f}{'*' if early else ' '}")
    print("ratio = attack time / (fb x fwd+bwd + f x fwd, each timed just before it), "
          "median over rounds")
    print("* stops early per example: ratio against the maximum passes")


if __name__ == "__main__":
    main()
