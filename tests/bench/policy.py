"""Per-decision cost of the access policy: no policy vs a policy of 1 000 rules, in ONE run.

    .venv/bin/python -m tests.bench.policy [--decisions 200000] [--rounds 5]

The 1 000 rules (500 grants, 300 restricts, 200 immutable; 100 tenants, 10 subjects each)
are rendered to TOML and parsed, as the gateway loads them. Callers, repositories and actions
are drawn at random, about a third in the caller's own namespace. Reported: µs per decision
(best round) with the caller's compiled view cached, as it is on the hot path; the one-time
cost of compiling a caller's view; parse time; `is_immutable`; and, to show that the cost
does not depend on how many repositories exist, the same decisions over 1 000 vs 1 000 000
distinct repository names. The worst case is also measured: 1 000 grants to any caller, so
every caller's view holds all of them.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Callable

from addons.decisions.policy import ACTIONS, EMPTY, Policy, parse

TENANTS = [f"t{i:03d}" for i in range(100)]
SUBJECTS = [f"u{j}@{t}" for t in TENANTS for j in range(10)]


def toml(kind: str, **keys: object) -> str:
    return f"[[{kind}]]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in keys.items())


def thousand_rules(rng: random.Random) -> str:
    tables = []
    for _ in range(500):
        owner = rng.choice(TENANTS)
        glob = rng.choice(
            [f"{owner}/shared/**", f"{owner}/app{rng.randrange(10)}/*", f"{owner}/*/n000000"]
        )
        who = (
            {"tenants": ["*"]}
            if rng.random() < 0.02
            else {"subjects": rng.sample(SUBJECTS, 2)}
            if rng.random() < 0.3
            else {"tenants": rng.sample(TENANTS, rng.randint(1, 3))}
        )
        actions = rng.sample(ACTIONS, rng.randint(1, 3))
        tables.append(toml("grant", repositories=[glob], **who, actions=actions))
    for _ in range(300):
        subject = rng.choice(SUBJECTS)
        tenant = subject.split("@")[1]
        keys: dict[str, object] = {"subjects": [subject], "actions": ["pull"]}
        if rng.random() < 0.5:
            keys["repositories"] = [f"{tenant}/ci/**", f"{tenant}/shared/**"]
        tables.append(toml("restrict", **keys))
    for _ in range(200):
        tables.append(
            toml("immutable", repositories=[f"{rng.choice(TENANTS)}/releases/**"], tags=["v*"])
        )
    rng.shuffle(tables)
    return "\n".join(tables)


def all_to_anyone(rng: random.Random) -> str:
    return "\n".join(
        toml(
            "grant",
            repositories=[f"{rng.choice(TENANTS)}/app{i % 10}/**", f"*/x{i}/*"],
            tenants=["*"],
            actions=["pull"],
        )
        for i in range(1000)
    )


Query = tuple[str, str, str, str]


def queries(rng: random.Random, n: int, names: int) -> list[Query]:
    """`n` decisions over about `names` distinct repository names."""
    paths = ["shared", "app7", "app3", "ci", "releases", "lib"]
    out = []
    for _ in range(n):
        subject = rng.choice(SUBJECTS)
        tenant = subject.split("@")[1]
        owner = tenant if rng.random() < 0.33 else rng.choice(TENANTS)
        serial = rng.randrange(max(1, names // (len(TENANTS) * len(paths))))
        repo = f"{owner}/{rng.choice(paths)}/n{serial:06d}"  # same length however many names
        out.append((tenant, subject, repo, rng.choice(ACTIONS)))
    return out


def per_call_us(call: Callable[[Query], object], qs: list[Query], rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for q in qs:
            call(q)
        best = min(best, time.perf_counter() - start)
    return best / len(qs) * 1e6


def decide_us(policy: Policy, qs: list[Query], rounds: int) -> float:
    for q in qs:  # warm: every caller's view compiled
        policy.decide(*q)
    return per_call_us(lambda q: policy.decide(*q), qs, rounds)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--decisions", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    rng = random.Random(13)
    text = thousand_rules(rng)

    start = time.perf_counter()
    big = parse(text, "bench.toml")
    parse_ms = (time.perf_counter() - start) * 1e3
    qs = queries(rng, args.decisions, 1000)
    allowed = sum(big.decide(*q).allowed for q in qs) / len(qs)

    none_us = decide_us(EMPTY, qs, args.rounds)
    big_us = decide_us(big, qs, args.rounds)
    fresh = [parse(text, "bench.toml") for _ in range(3)]
    callers = list(dict.fromkeys((q[0], q[1]) for q in qs))[:300]
    view_us = min(
        per_call_us(lambda c, p=p: p.decide(c[0], c[1], "x/y", "pull"), callers, 1)  # type: ignore[misc]
        for p in fresh
    )
    immutable_us = per_call_us(lambda q: big.is_immutable(q[2], "v1.2.3"), qs, args.rounds)
    many_names = queries(rng, args.decisions, 1_000_000)
    many_us = decide_us(big, many_names, args.rounds)
    worst = parse(all_to_anyone(rng), "worst.toml")
    worst_us = decide_us(worst, qs, args.rounds)

    counts = ", ".join(f"{n} {k}" for k, n in big.counts().items() if n)
    print(f"policy: {counts}; parsed in {parse_ms:.0f} ms; {allowed:.0%} of decisions allow")
    print(f"{'':44}µs/decision")
    print(f"{'no policy (owner rule only)':44}{none_us:8.2f}")
    print(f"{'1 000 rules':44}{big_us:8.2f}   ratio {big_us / none_us:.2f}x")
    print(f"{'1 000 rules, 1 000 000 repository names':44}{many_us:8.2f}")
    print(f"{'1 000 grants to any caller (worst case)':44}{worst_us:8.2f}")
    print(f"{'is_immutable, 1 000 rules':44}{immutable_us:8.2f}")
    print(f"{'first decision of a caller (view compile)':44}{view_us:8.2f}")


if __name__ == "__main__":
    main()
