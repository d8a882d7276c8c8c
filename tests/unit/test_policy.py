"""decisions/policy/ (contract §7, §8): every error message with its file:line, every rule type,
glob and tag-pattern edge cases, decisions and the rule that makes them, token scopes.

Random rule sets are in test_policy_properties.py; the reloader in test_policy_store.py.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed25519, rsa

from addons.decisions import policy
from addons.decisions.policy import (
    EMPTY,
    Decision,
    Grant,
    PolicyError,
    ScopeError,
    glob_error,
    glob_matches,
    granted_scopes,
    parse,
    scope_actions,
    tag_matches,
    tag_pattern_error,
)

ROOT = Path(__file__).resolve().parents[2]
F = "p.toml"


def pem(key: object) -> str:
    return key.public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


P256 = pem(ec.generate_private_key(ec.SECP256R1()).public_key())


def refused(text: str, line: int, *words: str, source: str = F) -> str:
    """parse refuses `text` with one line naming file and `line`, containing `words`."""
    with pytest.raises(PolicyError) as info:
        parse(text, source)
    message = str(info.value)
    assert "\n" not in message, message
    assert message.startswith(f"{source}:{line}: "), message
    for word in words:
        assert word in message, message
    return message


def grant(repos: str = '["acme/**"]', who: str = 'tenants = ["globex"]', actions: str = '["pull"]'):
    return f"[[grant]]\nrepositories = {repos}\n{who}\nactions = {actions}\n"


# --- errors: one line, file and line -----------------------------------------------------------


def test_syntax_error_names_the_line():
    refused('[[grant]]\nrepositories = ["a/**"\nactions = 1\n', 3, "invalid TOML")
    refused("a = \n", 1, "invalid TOML", "Invalid value")
    refused('[[grant]]\nactions = ["pull"]\nactions = ["push"]\n', 3, "invalid TOML")


def test_syntax_error_at_end_of_document_names_the_last_line():
    refused('# c\n[[grant]]\nrepositories = ["a/**",\n\n', 3, "invalid TOML")


def test_unknown_table_and_top_level_key():
    refused(grant() + "\n[[grants]]\nx = 1\n", 6, "unknown table or key 'grants'")
    refused("[policy]\nx = 1\n", 1, "'policy'")
    refused("# top\nversion = 2\n", 2, "'version'")


def test_rules_must_be_arrays_of_tables():
    refused("\n[grant]\nrepositories = []\n", 2, "[[grant]]")
    refused('grant = [{repositories = ["a/**"], tenants = ["b"], actions = ["pull"]}]\n', 1)


def test_unknown_key_names_its_line_and_the_expected_keys():
    text = (
        grant()
        + grant()
        + '[[restrict]]\nsubjects = ["x"]\nactions = ["pull"]\nrepository = ["a/*"]\n'
    )
    refused(text, 12, "[[restrict]]", "unknown key 'repository'", "repositories")
    refused(grant().replace("actions", "action"), 4, "unknown key 'action'")
    refused('[[quota]]\ntenants = ["a"]\nsubjects = ["x"]\nbytes = 1\n', 3, "'subjects'")


def test_unknown_key_in_a_sub_table_or_a_dotted_key():
    refused(grant() + "[grant.extra]\nx = 1\n", 5, "unknown key 'extra'")
    refused(grant() + "tenants2.x = 1\n", 5, "unknown key 'tenants2'")


def test_missing_keys_name_the_header_line():
    refused('\n\n[[grant]]\ntenants = ["a"]\nactions = ["pull"]\n', 3, "needs 'repositories'")
    refused(
        '[[grant]]\nrepositories = ["a/**"]\nactions = ["pull"]\n', 1, "'tenants' or 'subjects'"
    )
    refused('[[restrict]]\nactions = ["pull"]\n', 1, "'tenants' or 'subjects'")
    refused('[[restrict]]\ntenants = ["a"]\n', 1, "needs 'actions'")
    refused('[[immutable]]\nrepositories = ["a/**"]\n', 1, "needs 'tags'")
    refused('[[require_signature]]\nrepositories = ["a/**"]\n', 1, "needs 'keys'")
    refused('[[retention]]\nrepositories = ["a/**"]\n', 1, "'keep_last' or 'untagged_after'")
    refused("[[retention]]\nkeep_last = 1\n", 1, "needs 'repositories'")
    refused('[[quota]]\ntenants = ["a"]\n', 1, "needs 'bytes'")
    refused("[[quota]]\nbytes = 1\n", 1, "needs 'tenants'")


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ('"acme/**"', ["must be a list of strings"]),
        ('["acme/**", 1]', ["must be a list of strings"]),
        ("[]", ["must not be empty"]),
        ('["acme/*x"]', ["whole segments"]),
        ('["acme/x**"]', ["whole segments"]),
        ('["Acme/**"]', ["'Acme' is not a repository name component"]),
        ('["acme//x"]', ["'' is not"]),
        ('["/acme"]', ["'' is not"]),
        ('["acme/"]', ["'' is not"]),
        ('["acme/-x"]', ["'-x'"]),
        ('["**/x/**"]', ["at most one '**'"]),
        ('[""]', ["'' is not"]),
    ],
)
def test_bad_repository_globs(value: str, words: list[str]):
    refused(grant(repos=value), 2, "'repositories'", *words)


@pytest.mark.parametrize(
    ("who", "words"),
    [
        ('tenants = ["Acme"]', ["'Acme'", "tenant"]),
        ('tenants = ["acme/x"]', ["'acme/x'"]),
        ('tenants = ["acme*"]', ["'acme*'"]),
        ('tenants = [""]', ["''"]),
        ('tenants = "acme"', ["list of strings"]),
        ('subjects = ["a b"]', ["'a b'", "no spaces"]),
        ('subjects = ["*@acme"]', ["only '*' alone"]),
        ('subjects = [""]', ["''"]),
        ("subjects = []", ["must not be empty"]),
        (f'subjects = ["{"x" * 256}"]', ["255"]),
    ],
)
def test_bad_tenants_and_subjects(who: str, words: list[str]):
    refused(grant(who=who), 3, *words)


@pytest.mark.parametrize("actions", ['["write"]', '["*"]', '["Pull"]', "[]", '"pull"', "[1]"])
def test_bad_actions(actions: str):
    refused(grant(actions=actions), 4, "'actions'")


@pytest.mark.parametrize(
    ("tags", "words"),
    [
        ('["v/1"]', ["letters, digits"]),
        ('[".x"]', ["cannot start"]),
        ('["-x"]', ["cannot start"]),
        ('[""]', ["letters"]),
        (f'["{"a" * 129}"]', ["longer"]),
        ("[]", ["must not be empty"]),
    ],
)
def test_bad_tag_patterns(tags: str, words: list[str]):
    refused(f'[[immutable]]\nrepositories = ["a/**"]\ntags = {tags}\n', 3, "'tags'", *words)


@pytest.mark.parametrize("value", ['"7 days"', '"0h"', '"1y"', '"h"', "7", '"1.5h"', '"-1d"'])
def test_bad_durations(value: str):
    text = f'[[retention]]\nrepositories = ["a/**"]\n\nuntagged_after = {value}\n'
    refused(text, 4, "'untagged_after'", "duration")


@pytest.mark.parametrize("value", ["-1", "1.5", '"3"', "true"])
def test_bad_keep_last(value: str):
    refused(f'[[retention]]\nrepositories = ["a/**"]\nkeep_last = {value}\n', 3, "'keep_last'")


def test_bad_protected_tags():
    text = '[[retention]]\nrepositories = ["a/**"]\nkeep_last = 1\nprotected_tags = ["a b"]\n'
    refused(text, 4, "'protected_tags'")


@pytest.mark.parametrize("value", ['"1 GB"', '"10gib"', '"GiB"', "-1", "1.5", "true", '"1.5GiB"'])
def test_bad_sizes(value: str):
    refused(f'[[quota]]\ntenants = ["a"]\nbytes = {value}\n', 3, "'bytes'")


def test_a_tenant_in_two_quotas_is_an_error():
    text = '[[quota]]\ntenants = ["a", "b"]\nbytes = 1\n\n[[quota]]\ntenants = ["b"]\nbytes = 2\n'
    refused(text, 5, "'b' already has a quota at line 1")
    text = '[[quota]]\ntenants = ["*"]\nbytes = 1\n[[quota]]\ntenants = ["*"]\nbytes = 2\n'
    refused(text, 4, "'*'")


def test_lines_are_found_past_multi_line_strings_and_arrays():
    """A PEM key's base64 line ending in `=` and a `[`-line inside an array are neither a key
    nor a header: the error still names the right line."""
    text = (
        '[[require_signature]]\nrepositories = ["a/**"]\nkeys = [\n  """'
        + P256
        + '""",\n]\n'
        + 'x = """\n[[grant]]\ny = 1\n"""\n'
    )
    line = text.split("\n").index('x = """') + 1
    refused(text, line, "unknown key 'x'")
    text = '[[grant]]\nrepositories = [\n  "a/**",\n]\ntenants = [\n "b",\n]\nactions = ["x"]\n'
    refused(text, 8, "'actions'")
    text = "[[grant]]\nrepositories = [\n  [\"a\"],\n]\nactions = ['pull']\ntenants = ['b']\n"
    refused(text, 2, "list of strings")


def test_quoted_keys_and_spaced_headers_are_located():
    refused('[[ grant ]]\n"repositories" = ["A"]\n', 2, "'repositories'")
    refused("[[grant]]\n'tenants' = ['a']\nrepositories = ['a/**']\nactions = ['x']\n", 4)


def test_the_source_names_the_file():
    refused("a = \n", 1, source="/etc/tabbify/policy.toml")


def test_load_errors(tmp_path: Path):
    with pytest.raises(PolicyError, match=r"^.*/none\.toml: cannot read: No such file"):
        policy.load(tmp_path / "none.toml")
    bad = tmp_path / "bad.toml"
    bad.write_bytes(b"# ok\n# \xff\n")
    with pytest.raises(PolicyError, match=r"bad\.toml:2: not UTF-8"):
        policy.load(bad)
    with pytest.raises(PolicyError, match="cannot read"):
        policy.load(tmp_path)


# --- signature keys ----------------------------------------------------------------------------


def signed(keys: str) -> str:
    return f'[[require_signature]]\nrepositories = ["acme/**"]\nkeys = {keys}\n'


def test_signature_keys_inline_and_from_files(tmp_path: Path):
    (tmp_path / "keys").mkdir()
    ed = pem(ed25519.Ed25519PrivateKey.generate().public_key())
    (tmp_path / "keys" / "ed.pub").write_text(ed)
    p384 = pem(ec.generate_private_key(ec.SECP384R1()).public_key())
    rsa2048 = pem(rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key())
    text = signed(f'["""{P256}""", "keys/ed.pub", """{p384}""", """{rsa2048}"""]')
    (tmp_path / "policy.toml").write_text(text)
    p = policy.load(tmp_path / "policy.toml")
    (rule,) = p.signature_rules("acme/app")
    assert rule.keys == (P256, ed, p384, rsa2048)
    assert len(rule.public_keys) == 4
    assert isinstance(rule.public_keys[0], ec.EllipticCurvePublicKey)
    assert p.files == (tmp_path / "keys" / "ed.pub",)  # the reloader watches it
    assert p.signature_rules("globex/app") == ()


def test_relative_key_paths_follow_base_dir(tmp_path: Path):
    (tmp_path / "k.pub").write_text(P256)
    assert parse(signed('["k.pub"]'), "x.toml", base_dir=tmp_path).signatures[0].keys == (P256,)
    refused(signed('["k.pub"]'), 3, "cannot read key file", "k.pub")


@pytest.mark.parametrize(
    ("make", "why"),
    [
        (lambda: "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n", "not a PEM"),
        (lambda: pem(ec.generate_private_key(ec.SECP256K1()).public_key()), "unsupported"),
        (lambda: pem(rsa.generate_private_key(65537, 1024).public_key()), "unsupported"),
        (lambda: pem(dsa.generate_private_key(2048).public_key()), "unsupported"),
    ],
)
def test_bad_signature_keys(make, why: str):
    message = refused(signed(f'["""{make()}"""]'), 3, "'keys'", "(inline PEM key)", why)
    assert "BEGIN" not in message


def test_a_private_key_file_is_not_a_public_key(tmp_path: Path):
    private = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    (tmp_path / "k.pem").write_bytes(private)
    refused(signed('["k.pem"]'), 3, "'k.pem'", "not a PEM public key", source=str(tmp_path / "p"))


# --- globs and tag patterns --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("glob", "repository", "expected"),
    [
        ("acme/*", "acme/app", True),
        ("acme/*", "acme/app/x", False),
        ("acme/*", "acme", False),
        ("acme/**", "acme/app", True),
        ("acme/**", "acme/a/b/c", True),
        ("acme/**", "acme", False),  # `**` is one or more segments: never the bare parent
        ("acme/**", "acmex/app", False),
        ("acme/**", "acme.x/app", False),
        ("acme/base/**", "acme/base", False),
        ("acme/base/**", "acme/baseline/x", False),
        ("acme/**/app", "acme/x/app", True),
        ("acme/**/app", "acme/x/y/app", True),
        ("acme/**/app", "acme/app", False),
        ("*/app", "acme/app", True),
        ("*/app", "acme/x/app", False),
        ("**", "acme", True),
        ("**", "acme/a/b", True),
        ("*", "acme", True),
        ("*", "acme/a", False),
        ("acme", "acme", True),
        ("acme", "acme/a", False),
        ("a.b/c", "axb/c", False),  # literal segments are not regexes
        ("*/*/**", "a/b", False),
        ("*/*/**", "a/b/c", True),
    ],
)
def test_glob_semantics(glob: str, repository: str, expected: bool):
    assert glob_error(glob) is None
    assert glob_matches(glob, repository) is expected


@pytest.mark.parametrize(
    ("pattern", "tag", "expected"),
    [
        ("v*", "v1.2.3", True),
        ("v*", "v", True),  # `*` may be empty
        ("v*", "V1", False),  # tags are case-sensitive
        ("v*", "latest", False),
        ("*", "anything", True),
        ("stable", "stable", True),
        ("stable", "stable2", False),
        ("v*.*", "v1.2", True),
        ("v*.*", "v12", False),
        ("*-rc*", "1.0-rc1", True),
        ("*-rc*", "1.0-rc", True),
        ("*-rc*", "1.0", False),
        ("a*a", "a", False),  # prefix and suffix may not overlap
        ("a*a", "aa", True),
        ("**", "x", True),
    ],
)
def test_tag_patterns(pattern: str, tag: str, expected: bool):
    assert tag_pattern_error(pattern) is None
    assert tag_matches(pattern, tag) is expected


def test_tag_matching_is_linear():
    """Many stars against a long tag that almost matches: a backtracking regex would take
    minutes; the literal-part search does not."""
    assert not tag_matches("*a*a*a*a*a*a*a*b", "a" * 128)


# --- decisions ---------------------------------------------------------------------------------


def decide(p: policy.Policy, tenant: str, repo: str, action: str, subject: str | None = None):
    return p.decide(tenant, subject, repo, action)


def test_empty_policy_is_the_owner_rule():
    for action in ("pull", "push", "delete"):
        assert decide(EMPTY, "acme", "acme/app", action) == Decision(True, "owner")
        assert decide(EMPTY, "acme", "acme/a/b/c", action).allowed
        assert decide(EMPTY, "acme", "acme", action) == Decision(False, "no rule")
        assert not decide(EMPTY, "acme", "acmex/app", action).allowed
        assert not decide(EMPTY, "acmex", "acme/app", action).allowed
        assert not decide(EMPTY, "acme", "globex/acme", action).allowed
    assert parse("", F).decide("acme", None, "acme/x", "push") == Decision(True, "owner")


def test_invalid_input_is_denied_or_refused():
    assert decide(EMPTY, "acme", "acme/../x", "pull") == Decision(False, "invalid repository name")
    assert decide(EMPTY, "acme", "acme/" + "a" * 260, "pull").rule == "invalid repository name"
    assert decide(EMPTY, "Acme", "Acme/x", "pull") == Decision(False, "invalid tenant")
    assert decide(EMPTY, "acme/base", "acme/base/x", "pull").rule == "invalid tenant"
    assert decide(EMPTY, "", "/x", "pull").rule == "invalid tenant"
    with pytest.raises(ValueError, match="unknown action"):
        EMPTY.decide("acme", None, "acme/x", "*")


def test_grants_name_the_first_matching_rule():
    text = grant('["acme/base/*"]') + "\n" + grant('["acme/**"]', actions='["pull", "push"]')
    p = parse(text, F)
    assert decide(p, "globex", "acme/base/x", "pull") == Decision(True, f"grant {F}:1")
    assert decide(p, "globex", "acme/other", "pull") == Decision(True, f"grant {F}:6")
    assert decide(p, "globex", "acme/base/x", "push") == Decision(True, f"grant {F}:6")
    assert decide(p, "globex", "acme/x", "delete") == Decision(False, "no rule")
    assert decide(p, "initech", "acme/x", "pull") == Decision(False, "no rule")
    assert decide(p, "globex", "acme", "pull") == Decision(False, "no rule")
    assert decide(p, "acme", "acme/x", "pull") == Decision(True, "owner")  # owner first


def test_the_first_grant_in_the_file_is_named_whichever_glob_kind_matches():
    wild_first = grant('["*/base/**"]') + grant('["acme/base/**"]')
    assert parse(wild_first, F).decide("globex", None, "acme/base/x", "pull").rule == f"grant {F}:1"
    literal_first = grant('["acme/base/**"]') + grant('["*/base/**"]')
    p = parse(literal_first, F)
    assert p.decide("globex", None, "acme/base/x", "pull").rule == f"grant {F}:1"
    assert p.decide("globex", None, "initech/base/x", "pull").rule == f"grant {F}:5"


def test_grant_by_subject_and_by_both():
    text = grant('["acme/a/**"]', 'subjects = ["ci@globex"]') + grant(
        '["acme/b/**"]', 'tenants = ["globex"]\nsubjects = ["bot"]'
    )
    p = parse(text, F)
    assert decide(p, "globex", "acme/a/x", "pull", "ci@globex").allowed
    assert decide(p, "initech", "acme/a/x", "pull", "ci@globex").allowed  # any tenant
    assert not decide(p, "globex", "acme/a/x", "pull", "other").allowed
    assert not decide(p, "globex", "acme/a/x", "pull").allowed  # unknown subject
    assert decide(p, "globex", "acme/b/x", "pull", "bot").allowed  # both match
    assert not decide(p, "initech", "acme/b/x", "pull", "bot").allowed  # tenant does not
    assert not decide(p, "globex", "acme/b/x", "pull", "ci@globex").allowed  # subject does not


def test_star_means_any_authenticated_caller():
    p = parse(grant('["acme/public/**"]', 'tenants = ["*"]'), F)
    assert decide(p, "anyone", "acme/public/x", "pull").allowed
    p = parse(grant('["acme/public/**"]', 'subjects = ["*"]'), F)
    assert decide(p, "anyone", "acme/public/x", "pull").allowed  # even with no known subject
    assert decide(p, "anyone", "acme/public/x", "pull", "s").allowed


def test_restrict_narrows_owner_and_grants():
    text = grant('["globex/shared/**"]', 'tenants = ["acme"]', '["pull", "push"]') + (
        '\n[[restrict]]\nsubjects = ["viewer@acme"]\nactions = ["pull"]\n'
    )
    p = parse(text, F)
    viewer = "viewer@acme"
    assert decide(p, "acme", "acme/app", "pull", viewer) == Decision(True, "owner")
    assert decide(p, "acme", "acme/app", "push", viewer) == Decision(False, f"restrict {F}:6")
    assert decide(p, "acme", "acme/app", "delete", viewer).rule == f"restrict {F}:6"
    assert decide(p, "acme", "globex/shared/x", "pull", viewer) == Decision(True, f"grant {F}:1")
    assert not decide(p, "acme", "globex/shared/x", "push", viewer).allowed
    assert decide(p, "acme", "globex/shared/x", "push", "other").allowed
    assert decide(p, "acme", "globex/other", "pull", viewer) == Decision(False, "no rule")


def test_restrict_with_repositories_and_several_restricts():
    text = (
        '[[restrict]]\ntenants = ["acme"]\nactions = ["pull", "push"]\n'
        'repositories = ["acme/ci/**", "acme/base/**"]\n\n'
        '[[restrict]]\nsubjects = ["bot"]\nactions = ["pull", "push", "delete"]\n'
        'repositories = ["acme/ci/**"]\n'
    )
    p = parse(text, F)
    assert decide(p, "acme", "acme/ci/x", "push").allowed
    assert decide(p, "acme", "acme/base/x", "pull").allowed
    assert decide(p, "acme", "acme/app", "pull") == Decision(False, f"restrict {F}:1")
    assert decide(p, "acme", "acme/ci/x", "delete") == Decision(False, f"restrict {F}:1")
    assert decide(p, "acme", "acme/ci/x", "push", "bot").allowed  # both restricts allow
    assert decide(p, "acme", "acme/base/x", "pull", "bot") == Decision(False, f"restrict {F}:6")
    assert decide(p, "globex", "globex/app", "delete", "x").allowed  # not restricted
    assert decide(p, "globex", "globex/app", "delete", "bot").rule == f"restrict {F}:6"


def test_restrict_never_grants():
    p = parse('[[restrict]]\ntenants = ["*"]\nactions = ["pull"]\nrepositories = ["**"]\n', F)
    assert decide(p, "acme", "globex/app", "pull") == Decision(False, "no rule")
    assert decide(p, "acme", "acme/app", "push").rule == f"restrict {F}:1"


def test_pullable_is_the_catalog_filter():
    p = parse(grant('["acme/base/**"]') + '[[restrict]]\nsubjects = ["v"]\nactions = ["push"]\n', F)
    names = ["acme", "acme/app", "acme/base/x", "globex/app", "initech/x", "acme/base"]
    assert [n for n in names if p.pullable("globex", None)(n)] == ["acme/base/x", "globex/app"]
    assert [n for n in names if p.pullable("acme", None)(n)] == [
        "acme/app",
        "acme/base/x",
        "acme/base",
    ]
    assert [n for n in names if p.pullable("globex", "v")(n)] == []


def test_immutable():
    text = '[[immutable]]\nrepositories = ["acme/releases/**", "*/stable"]\ntags = ["v*", "prod"]\n'
    p = parse(text, F)
    assert p.is_immutable("acme/releases/app", "v1") == f"immutable {F}:1"
    assert p.is_immutable("acme/releases/app", "prod") == f"immutable {F}:1"
    assert p.is_immutable("globex/stable", "v2") == f"immutable {F}:1"
    assert p.is_immutable("acme/releases/app", "latest") is None
    assert p.is_immutable("acme/releases", "v1") is None
    assert p.is_immutable("acme/app", "v1") is None
    assert p.is_immutable("acme/../x", "v1") is None
    assert EMPTY.is_immutable("acme/app", "v1") is None


def test_retention_combines_to_keep_more():
    text = (
        '[[retention]]\nrepositories = ["acme/**"]\nkeep_last = 5\nprotected_tags = ["latest"]\n'
        '[[retention]]\nrepositories = ["acme/ci/*"]\nkeep_last = 2\nuntagged_after = "30m"\n'
        '[[retention]]\nrepositories = ["**"]\nuntagged_after = "2w"\nprotected_tags = ["v*"]\n'
    )
    p = parse(text, F)
    plan = p.retention("acme/ci/x")
    assert plan is not None
    assert plan.keep_last == 5
    assert plan.untagged_after == timedelta(weeks=2)
    assert plan.protected_tags == ("latest", "v*")
    assert plan.rules == (f"retention {F}:1", f"retention {F}:5", f"retention {F}:9")
    assert plan.protects("v1") and plan.protects("latest") and not plan.protects("dev")
    other = p.retention("globex/app")
    assert other is not None and other.keep_last is None and other.rules == (f"retention {F}:9",)
    assert EMPTY.retention("acme/app") is None


@pytest.mark.parametrize(
    ("value", "seconds"),
    [('"45s"', 45), ('"30m"', 1800), ('"24h"', 86400), ('"7d"', 604800), ('"1w"', 604800)],
)
def test_durations(value: str, seconds: int):
    p = parse(f'[[retention]]\nrepositories = ["a/**"]\nuntagged_after = {value}\n', F)
    assert p.retentions[0].untagged_after == timedelta(seconds=seconds)
    assert p.retentions[0].keep_last is None


@pytest.mark.parametrize(
    ("value", "size"),
    [
        ("0", 0),
        ("1234", 1234),
        ('"500MB"', 500 * 10**6),
        ('"10GiB"', 10 * 2**30),
        ('"1kB"', 1000),
        ('"1KiB"', 1024),
        ('"2TiB"', 2 * 2**40),
        ('"7B"', 7),
    ],
)
def test_quota_sizes(value: str, size: int):
    assert parse(f'[[quota]]\ntenants = ["a"]\nbytes = {value}\n', F).quotas[0].bytes == size


def test_quota_lookup_prefers_the_named_tenant():
    text = '[[quota]]\ntenants = ["*"]\nbytes = 10\n[[quota]]\ntenants = ["acme"]\nbytes = 99\n'
    p = parse(text, F)
    assert p.quota("acme") is not None and p.quota("acme").bytes == 99  # type: ignore[union-attr]
    assert p.quota("globex") is not None and p.quota("globex").bytes == 10  # type: ignore[union-attr]
    assert parse('[[quota]]\ntenants = ["a"]\nbytes = 1\n', F).quota("b") is None


def test_rules_are_frozen_dataclasses_with_their_line():
    p = parse("\n\n" + grant(), F)
    assert p.grants == (Grant(3, ("acme/**",), ("pull",), ("globex",), None),)
    with pytest.raises(AttributeError):
        p.grants[0].line = 1  # type: ignore[misc]
    assert p.name(p.grants[0]) == f"grant {F}:3"


def test_actions_are_canonical_and_deduplicated():
    p = parse(grant(actions='["delete", "pull", "pull"]'), F)
    assert p.grants[0].actions == ("pull", "delete")


def test_counts():
    p = parse(grant() + grant() + '[[quota]]\ntenants = ["a"]\nbytes = 1\n', F)
    assert p.counts() == {
        "grant": 2,
        "restrict": 0,
        "immutable": 0,
        "require_signature": 0,
        "retention": 0,
        "quota": 1,
    }


def test_views_are_cached_per_caller_and_bounded(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr("addons.decisions.policy.evaluate._VIEW_CACHE", 3)
    p = parse(grant(), F)
    for i in range(10):
        assert p.decide(f"t{i}", None, "acme/x", "pull") == Decision(False, "no rule")
    assert len(p._views) <= 3
    assert p.decide("globex", None, "acme/x", "pull").allowed


# --- token scopes ------------------------------------------------------------------------------


def test_granted_scopes_intersect_the_policy():
    p = parse(grant('["acme/base/**"]', actions='["pull", "push"]'), F)
    requested = [
        "repository:acme/base/x:pull,push,delete",
        "repository:globex/app:*",
        "repository:acme/other:pull",
        "registry:catalog:*",
        "repository:acme/base/x:pull",  # merged with the first
    ]
    assert granted_scopes(p, "globex", None, requested) == [
        "repository:acme/base/x:pull,push",
        "repository:globex/app:pull,push,delete",
        "registry:catalog:*",
    ]


def test_a_pull_request_gets_only_pull():
    """Least privilege: asking for pull gives pull even where push would be allowed."""
    assert granted_scopes(EMPTY, "acme", None, ["repository:acme/app:pull"]) == [
        "repository:acme/app:pull"
    ]
    assert granted_scopes(EMPTY, "acme", None, ["repository:acme/app:push,pull"]) == [
        "repository:acme/app:pull,push"
    ]
    assert granted_scopes(EMPTY, "acme", None, []) == []


def test_granted_scopes_follow_restricts_and_subjects():
    p = parse('[[restrict]]\nsubjects = ["v"]\nactions = ["pull"]\n', F)
    assert granted_scopes(p, "acme", "v", ["repository:acme/app:*"]) == ["repository:acme/app:pull"]
    assert granted_scopes(p, "acme", "v", ["repository:acme/app:push"]) == []


def test_scope_actions_reads_a_tokens_scopes_back():
    granted = granted_scopes(EMPTY, "acme", None, ["repository:acme/a:*", "registry:catalog:*"])
    assert scope_actions(granted) == {"acme/a": frozenset({"pull", "push", "delete"})}
    assert scope_actions(["repository:a/b:pull", "repository:a/b:push"]) == {
        "a/b": frozenset({"pull", "push"})
    }
    with pytest.raises(ScopeError):
        scope_actions(["repository:a/b:write"])


@pytest.mark.parametrize(
    "scope",
    [
        "repository:acme/app",
        "repository:acme/app:",
        "repository:acme/app:pull,",
        "repository:acme/app:write",
        "repository:acme/app:pull,write",
        "repository:Acme/app:pull",
        "repository:acme/app:8080:pull",
        "repository:acme:app:pull",
        "repository(plugin):acme/app:pull",
        "registry:catalog:search",
        "registry:catalog",
        "repository::pull",
        "repository:acme/app:pull ",
        "repository:" + "a/" * 130 + "a:pull",
        "",
    ],
)
def test_malformed_scopes_are_refused(scope: str):
    with pytest.raises(ScopeError) as info:
        granted_scopes(EMPTY, "acme", None, [scope])
    assert "\n" not in str(info.value)


# --- the example file --------------------------------------------------------------------------


def test_the_example_policy_is_valid_and_means_what_its_comments_say():
    p = policy.load(ROOT / "docs" / "policy.example.toml")
    assert all(p.counts().values())  # every rule type is shown
    assert p.decide("globex", None, "acme/base/debian", "pull").allowed
    assert not p.decide("globex", None, "acme/base/debian", "push").allowed
    assert p.decide("globex", "ci@globex", "acme/builds/app", "push").allowed
    assert not p.decide("globex", "ci@globex", "acme/builds/app/x", "push").allowed
    assert p.decide("someone", None, "acme/public/x", "pull").allowed
    assert not p.decide("acme", "viewer@acme", "acme/app", "push").allowed
    assert not p.decide("acme", None, "acme/app", "delete").allowed
    assert p.decide("acme", "release-bot@acme", "acme/releases/app", "push").allowed
    assert not p.decide("acme", "release-bot@acme", "acme/app", "push").allowed
    assert p.is_immutable("acme/releases/app", "v1.0") is not None
    assert p.signature_rules("acme/releases/app")
    assert p.quota("acme").bytes == 500 * 2**30  # type: ignore[union-attr]
    assert p.quota("globex").bytes == 10 * 2**30  # type: ignore[union-attr]


def test_pull_prefixes_are_the_ranges_a_caller_can_pull_from():
    p = parse(
        """
[[grant]]
repositories = ["acme/base/**", "acme/base/x/**", "shared/tools"]
tenants = ["globex"]
actions = ["pull"]

[[grant]]
repositories = ["initech/**"]
tenants = ["globex"]
actions = ["push"]
""",
        "p.toml",
    )
    assert p.pull_prefixes("globex", None) == ["acme/base/", "globex/", "shared/tools"]
    assert p.pull_prefixes("acme", None) == ["acme/"]
    anywhere = parse(
        '[[grant]]\nrepositories = ["*/public/**"]\ntenants = ["*"]\nactions = ["pull"]\n', "p.toml"
    )
    assert anywhere.pull_prefixes("globex", None) == [""]
