"""Property tests (hypothesis) of the access policy: random rule sets, callers, repositories.

Rule sets are generated as data, rendered to TOML (with random layout: comments, blank lines,
arrays over several lines) and parsed, so the parser is exercised too. The oracle below is
the specification of docs/policy.md written out directly (recursive segment matching, no
regexes, no indexes), not imported from addons.decisions.policy.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from addons.decisions.policy import (
    ACTIONS,
    EMPTY,
    Decision,
    Policy,
    PolicyError,
    granted_scopes,
    parse,
)

PROPS = settings(
    max_examples=200,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
F = "policy.toml"

# Small alphabets so that rules, callers and repositories actually meet. `acmex` and `acme`
# share a prefix; `globex` is both a tenant and a subject.
TENANTS = ["acme", "acmex", "globex", "a"]
SUBJECTS = ["alice", "bob@acme", "ci", "globex"]
SEGMENTS = ["acme", "acmex", "globex", "a", "base", "app"]
TAGS = ["v1", "v1.2", "latest", "stable", "v", "rc-1"]
TAG_PATTERNS = ["v*", "*", "latest", "v*.*", "*-*", "stable", "x*"]


@dataclass(frozen=True)
class Rule:
    kind: str  # grant | restrict | immutable
    repositories: tuple[str, ...] | None = None
    tenants: tuple[str, ...] | None = None
    subjects: tuple[str, ...] | None = None
    actions: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()


def lists(items: list[str], max_size: int = 3) -> st.SearchStrategy[tuple[str, ...]]:
    return st.lists(st.sampled_from(items), min_size=1, max_size=max_size).map(tuple)


repositories = st.lists(st.sampled_from(SEGMENTS), min_size=1, max_size=4).map("/".join)
globs = (
    st.lists(st.sampled_from([*SEGMENTS, "*", "**"]), min_size=1, max_size=4)
    .filter(lambda segments: segments.count("**") <= 1)
    .map("/".join)
)
glob_lists = st.lists(globs, min_size=1, max_size=3).map(tuple)
callers = st.tuples(st.none() | lists([*TENANTS, "*"]), st.none() | lists([*SUBJECTS, "*"])).filter(
    lambda c: c != (None, None)
)
actions = lists(list(ACTIONS))


@st.composite
def grants(draw: st.DrawFn) -> Rule:
    tenants, subjects = draw(callers)
    return Rule("grant", draw(glob_lists), tenants, subjects, draw(actions))


@st.composite
def restricts(draw: st.DrawFn) -> Rule:
    tenants, subjects = draw(callers)
    return Rule("restrict", draw(st.none() | glob_lists), tenants, subjects, draw(actions))


@st.composite
def immutables(draw: st.DrawFn) -> Rule:
    return Rule("immutable", draw(glob_lists), tags=draw(lists(TAG_PATTERNS)))


rule_sets = st.lists(grants() | restricts() | immutables(), max_size=8)
callers_asking = st.tuples(st.sampled_from(TENANTS), st.none() | st.sampled_from(SUBJECTS))
queries = st.lists(
    st.tuples(callers_asking, repositories, st.sampled_from(ACTIONS)).map(
        lambda q: (*q[0], q[1], q[2])
    ),
    min_size=1,
    max_size=12,
)


@st.composite
def instance(draw: st.DrawFn, glob: str) -> str:
    """A repository name that `glob` matches."""
    segments = []
    for segment in glob.split("/"):
        if segment == "*":
            segments.append(draw(st.sampled_from(SEGMENTS)))
        elif segment == "**":
            segments.extend(draw(st.lists(st.sampled_from(SEGMENTS), min_size=1, max_size=2)))
        else:
            segments.append(segment)
    return "/".join(segments)


open_grants = st.builds(lambda globs: Rule("grant", globs, ("*",), None, ACTIONS), glob_lists)


@st.composite
def cases(
    draw: st.DrawFn, overlapping: bool = False
) -> tuple[list[Rule], list[tuple[str, str | None, str, str]]]:
    """A rule set and queries, half of them on repositories its globs match, so that rules
    meet requests (and each other) far more often than random names would. `overlapping`:
    mostly grants to any caller, so that several grants match the same request."""
    if overlapping:
        rules = draw(st.lists(open_grants | restricts(), min_size=2, max_size=8))
    else:
        rules = draw(rule_sets)
    globs = [g for r in rules for g in r.repositories or ()]
    asked = draw(queries)
    for i in range(len(asked)) if globs else ():
        if draw(st.booleans()):
            tenant, subject, _, action = asked[i]
            asked[i] = (tenant, subject, draw(instance(draw(st.sampled_from(globs)))), action)
    return rules, asked


layouts = st.randoms(use_true_random=False)


def render(rules: list[Rule], rng: random.Random | None = None) -> tuple[str, list[dict[str, int]]]:
    """TOML text for `rules`, and per rule the line of its header ("") and of each key."""
    out: list[str] = []
    where: list[dict[str, int]] = []
    for rule in rules:
        if rng and rng.random() < 0.3:
            out.append("# a comment with [[grant]] and key = value in it")
        if rng and rng.random() < 0.3:
            out.append("")
        out.append(f"[[{rule.kind}]]")
        lines = {"": len(out)}
        fields = {
            "repositories": rule.repositories,
            "tenants": rule.tenants,
            "subjects": rule.subjects,
            "actions": rule.actions or None,
            "tags": rule.tags or None,
        }
        for key, value in fields.items():
            if value is None:
                continue
            lines[key] = len(out) + 1
            if rng and rng.random() < 0.3:  # an array over several lines
                out.append(f"{key} = [")
                out.extend(f"  {json.dumps(v)},  # [x]" for v in value)
                out.append("]")
            else:
                out.append(f"{key} = {json.dumps(list(value))}")
        where.append(lines)
    return "\n".join(out) + "\n", where


def policy_of(rules: list[Rule]) -> Policy:
    return parse(render(rules)[0], F)


# --- the oracle: docs/policy.md written out ----------------------------------------------------


def glob_matches(glob: list[str], name: list[str]) -> bool:
    """`*` one segment, `**` one or more, anything else literally."""
    if not glob:
        return not name
    head, rest = glob[0], glob[1:]
    if head == "**":
        return any(glob_matches(rest, name[i:]) for i in range(1, len(name) + 1))
    return bool(name) and head in ("*", name[0]) and glob_matches(rest, name[1:])


def covers(globs: tuple[str, ...], repository: str) -> bool:
    return any(glob_matches(g.split("/"), repository.split("/")) for g in globs)


def applies(rule: Rule, tenant: str, subject: str | None) -> bool:
    tenant_ok = rule.tenants is None or "*" in rule.tenants or tenant in rule.tenants
    subject_ok = (
        rule.subjects is None
        or "*" in rule.subjects
        or (subject is not None and subject in rule.subjects)
    )
    return tenant_ok and subject_ok


def justifies(rule: Rule, tenant: str, subject: str | None, repo: str, action: str) -> bool:
    return (
        rule.kind == "grant"
        and applies(rule, tenant, subject)
        and action in rule.actions
        and covers(rule.repositories or (), repo)
    )


def blocks(restrict: Rule, repo: str, action: str) -> bool:
    """A restrict that applies allows only its actions, only within its repositories."""
    within = restrict.repositories is None or covers(restrict.repositories, repo)
    return action not in restrict.actions or not within


def oracle(rules: list[Rule], tenant: str, subject: str | None, repo: str, action: str) -> bool:
    owner = repo.startswith(tenant + "/")
    granted = owner or any(justifies(r, tenant, subject, repo, action) for r in rules)
    return granted and not any(
        blocks(r, repo, action)
        for r in rules
        if r.kind == "restrict" and applies(r, tenant, subject)
    )


def oracle_rule(rules: list[Rule], tenant: str, subject: str | None, repo: str, action: str):
    """The full decision, rule name included: owner, else the first justifying grant in the
    file; then the first restrict in the file that blocks."""
    lines = [w[""] for w in render(rules)[1]]
    if repo.startswith(tenant + "/"):
        decision = Decision(True, "owner")
    else:
        first = next(
            (i for i, r in enumerate(rules) if justifies(r, tenant, subject, repo, action)), None
        )
        if first is None:
            return Decision(False, "no rule")
        decision = Decision(True, f"grant {F}:{lines[first]}")
    for i, r in enumerate(rules):
        if r.kind == "restrict" and applies(r, tenant, subject) and blocks(r, repo, action):
            return Decision(False, f"restrict {F}:{lines[i]}")
    return decision


def rule_at(rules: list[Rule], name: str) -> Rule:
    """The generated rule a decision names (`grant policy.toml:<line>`)."""
    _, where = render(rules)
    line = int(name.rsplit(":", 1)[1])
    return rules[[w[""] for w in where].index(line)]


# --- properties --------------------------------------------------------------------------------


@PROPS
@given(cases())
def test_decisions_follow_the_specification(case):
    rules, asked = case
    p = policy_of(rules)
    for tenant, subject, repo, action in asked:
        decision = p.decide(tenant, subject, repo, action)
        assert decision.allowed == oracle(rules, tenant, subject, repo, action), decision
        assert decision == oracle_rule(rules, tenant, subject, repo, action)


@PROPS
@given(cases(overlapping=True))
def test_the_deciding_rule_is_the_first_in_the_file(case):
    """Many grants to any caller whose globs overlap (literal and wildcard first segments):
    the decision names the first grant in the file that matches, and the first restrict that
    blocks."""
    rules, asked = case
    p = policy_of(rules)
    for query in asked:
        assert p.decide(*query) == oracle_rule(rules, *query)


@PROPS
@given(cases())
def test_no_right_in_another_namespace_without_a_grant_naming_it(case):
    """(a) Outside its own namespace a caller is allowed only by a grant that matches it, the
    repository and the action, and the decision names the first such grant in the file."""
    rules, asked = case
    p = policy_of(rules)
    for tenant, subject, repo, action in asked:
        decision = p.decide(tenant, subject, repo, action)
        if decision.allowed and not repo.startswith(tenant + "/"):
            assert decision.rule.startswith("grant ")
            named = rule_at(rules, decision.rule)
            assert justifies(named, tenant, subject, repo, action)
            earlier = rules[: rules.index(named)]  # and it is the first that does
            assert not any(justifies(r, tenant, subject, repo, action) for r in earlier)
        if decision.allowed and repo.startswith(tenant + "/"):
            assert decision.rule == "owner"


@PROPS
@given(cases(), restricts())
def test_a_restrict_only_narrows(case, restrict: Rule):
    """(b) Adding any restrict never adds a right; what it takes away it names."""
    rules, asked = case
    before, after = policy_of(rules), policy_of([*rules, restrict])
    for query in asked:
        old, new = before.decide(*query), after.decide(*query)
        assert not new.allowed or old.allowed
        if old.allowed and not new.allowed:
            assert new.rule.startswith("restrict ")


@PROPS
@given(queries)
def test_the_empty_policy_is_the_owner_rule(asked):
    """(c) No file, or a file without rules: tenant t has everything in t/** and nothing else."""
    for p in (EMPTY, parse("", F), parse("# nothing\n", F)):
        for tenant, subject, repo, action in asked:
            owner = repo.startswith(tenant + "/")
            assert p.decide(tenant, subject, repo, action) == Decision(
                owner, "owner" if owner else "no rule"
            )


@PROPS
@given(cases(), layouts)
def test_rule_order_and_layout_change_only_the_rule_names(case, rng):
    """(d) Shuffled rules, comments, blank lines, arrays over several lines: same decisions."""
    rules, asked = case
    shuffled = rules[:]
    rng.shuffle(shuffled)
    p, q = policy_of(rules), parse(render(shuffled, rng)[0], F)
    for tenant, subject, repo, action in asked:
        assert p.decide(tenant, subject, repo, action).allowed == (
            q.decide(tenant, subject, repo, action).allowed
        )
    for _, _, repo, _ in asked:
        for tag in TAGS:
            assert (p.is_immutable(repo, tag) is None) == (q.is_immutable(repo, tag) is None)


@PROPS
@given(rule_sets, layouts)
def test_parse_render_round_trip(rules: list[Rule], rng):
    """(e) Every generated rule comes back as written, on the line it was written."""
    text, where = render(rules, rng)
    p = parse(text, F)
    back = sorted(p.grants + p.restricts + p.immutables, key=lambda r: r.line)
    assert [r.line for r in back] == [w[""] for w in where]
    for mine, theirs in zip(rules, back, strict=True):
        assert theirs.kind == mine.kind
        assert theirs.repositories == mine.repositories
        if mine.kind == "immutable":
            assert theirs.tags == mine.tags  # type: ignore[union-attr]
        else:
            assert theirs.tenants == mine.tenants  # type: ignore[union-attr]
            assert theirs.subjects == mine.subjects  # type: ignore[union-attr]
            assert set(theirs.actions) == set(mine.actions)  # type: ignore[union-attr]


@PROPS
@given(rule_sets, layouts, st.data())
def test_an_error_names_the_line_of_the_bad_key(rules: list[Rule], rng, data):
    """One bad value anywhere: the error names exactly that key's line."""
    grants_at = [i for i, r in enumerate(rules) if r.kind != "immutable"]
    if not grants_at:
        return
    index = data.draw(st.sampled_from(grants_at))
    broken = rules[:]
    broken[index] = Rule(**{**rules[index].__dict__, "actions": ("pull", "write")})
    text, where = render(broken, rng)
    with pytest.raises(PolicyError) as info:
        parse(text, F)
    assert str(info.value).startswith(f"{F}:{where[index]['actions']}: "), (info.value, text)


@PROPS
@given(rule_sets, repositories, st.sampled_from(TAGS))
def test_immutable_follows_the_specification(rules: list[Rule], repo: str, tag: str):
    p = policy_of(rules)
    expected = any(
        r.kind == "immutable"
        and covers(r.repositories or (), repo)
        and any(_tag_matches(pattern, tag) for pattern in r.tags)
        for r in rules
    )
    assert (p.is_immutable(repo, tag) is not None) == expected


def _tag_matches(pattern: str, tag: str) -> bool:
    """`*` = any run of characters, by recursion (the oracle, not the product's search)."""
    if not pattern:
        return not tag
    if pattern[0] == "*":
        return any(_tag_matches(pattern[1:], tag[i:]) for i in range(len(tag) + 1))
    return bool(tag) and pattern[0] == tag[0] and _tag_matches(pattern[1:], tag[1:])


@PROPS
@given(
    rule_sets,
    st.sampled_from(TENANTS),
    st.none() | st.sampled_from(SUBJECTS),
    st.lists(st.tuples(repositories, st.lists(st.sampled_from([*ACTIONS, "*"]), min_size=1))),
)
def test_granted_scopes_are_requested_scopes_intersected_with_the_policy(
    rules: list[Rule], tenant: str, subject: str | None, requested
):
    p = policy_of(rules)
    scopes = [f"repository:{repo}:{','.join(acts)}" for repo, acts in requested]
    granted = granted_scopes(p, tenant, subject, scopes)
    expected: dict[str, set[str]] = {}
    for repo, acts in requested:
        wanted = set(ACTIONS) if "*" in acts else set(acts)
        allowed = {a for a in wanted if oracle(rules, tenant, subject, repo, a)}
        expected.setdefault(repo, set()).update(allowed)
    got = {}
    for scope in granted:
        _, repo, acts = scope.split(":")
        got[repo] = set(acts.split(","))
        assert acts.split(",") == [a for a in ACTIONS if a in got[repo]]  # canonical order
    assert got == {repo: acts for repo, acts in expected.items() if acts}
    assert len(granted) == len(got)  # one scope per repository
