"""A profile that hands syscalls to the user's own seccomp agent must be recognised, whatever
its shape, so lazyshim never takes the agent's listener away; lazyshim's own patched profile
is not foreign."""

from __future__ import annotations

import pytest

from runtime.agent_policy import POLICY_ANNOTATION, POLICY_ENV, agent_policy, check_allowed, foreign_reason
from seccomp.verdict import OWN_METADATA, foreign_agent, patch_profile
from shim.errors import LazyshimError

BASE = {"defaultAction": "SCMP_ACT_ALLOW", "architectures": ["SCMP_ARCH_X86_64"]}
NOTIFY_MKDIR = {"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_NOTIFY"}


@pytest.mark.parametrize("profile", [
    None, {}, BASE,
    {**BASE, "syscalls": [{"names": ["openat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]},
    {**BASE, "listenerPath": ""},
    # podman's default profile shape: no agent anywhere
    {"defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": 38,
     "syscalls": [{"names": ["read", "openat"], "action": "SCMP_ACT_ALLOW"}]},
], ids=["none", "empty", "allow", "errno-rule", "empty-listener", "podman-like"])
def test_profiles_without_an_agent_are_not_foreign(profile) -> None:
    assert foreign_agent(profile) is None


def test_a_listener_path_is_foreign_even_without_notify_rules() -> None:
    reason = foreign_agent({**BASE, "listenerPath": "/run/agent.sock"})
    assert reason is not None and "/run/agent.sock" in reason


@pytest.mark.parametrize("rule", [
    NOTIFY_MKDIR,
    {"name": "mknod", "action": "SCMP_ACT_NOTIFY"},  # the old single-name form
    {"names": ["openat"], "action": "SCMP_ACT_NOTIFY",
     "args": [{"index": 2, "value": 64, "valueTwo": 64, "op": "SCMP_CMP_MASKED_EQ"}]},
])
def test_any_notify_rule_is_foreign(rule) -> None:
    reason = foreign_agent({**BASE, "syscalls": [{"names": ["read"], "action": "SCMP_ACT_ALLOW"}, rule]})
    assert reason is not None and "SCMP_ACT_NOTIFY" in reason


def test_notify_as_default_action_is_foreign() -> None:
    assert foreign_agent({"defaultAction": "SCMP_ACT_NOTIFY"}) is not None


def test_lazyshims_own_patched_profile_is_not_foreign() -> None:
    ours, _ = patch_profile({**BASE, "syscalls": [{"names": ["chmod"], "action": "SCMP_ACT_ERRNO"}]},
                            "/run/lazyshim/c1/seccomp.sock", OWN_METADATA)
    assert foreign_agent(ours) is None


def test_lazyshims_flag_split_rules_are_its_own_and_a_forged_one_is_not() -> None:
    ours, _ = patch_profile({**BASE, "syscalls": [{"names": ["openat"], "action": "SCMP_ACT_ALLOW"}]},
                            "/s", OWN_METADATA)
    assert any(r.get("args") and r["action"] == "SCMP_ACT_NOTIFY" for r in ours["syscalls"])
    assert foreign_agent(ours) is None
    forged = {**ours, "syscalls": ours["syscalls"] + [
        {"names": ["read"], "action": "SCMP_ACT_NOTIFY", "args": [{"index": 0, "value": 1, "op": "SCMP_CMP_EQ"}]}]}
    assert foreign_agent(forged) is not None
    doubled = {**ours, "syscalls": ours["syscalls"] + [{"names": ["openat"], "action": "SCMP_ACT_NOTIFY"}]}
    assert foreign_agent(doubled) is not None


def test_a_user_notify_rule_beside_ours_is_still_foreign() -> None:
    """Only exactly the rule lazyshim writes is its own; the marker alone proves nothing."""
    ours, _ = patch_profile(BASE, "/s", OWN_METADATA)
    ours["syscalls"].insert(0, NOTIFY_MKDIR)
    assert foreign_agent(ours) is not None
    forged = {**BASE, "listenerPath": "/run/agent.sock", "listenerMetadata": OWN_METADATA,
              "syscalls": [NOTIFY_MKDIR]}
    assert foreign_agent(forged) is not None


@pytest.mark.parametrize("profile", [
    [], "SCMP_ACT_NOTIFY", 7,
    {"syscalls": "SCMP_ACT_NOTIFY"}, {"syscalls": [None, 3, "x"]},
    {"syscalls": [{"names": "mkdir", "action": None}]}, {"listenerPath": 5},
    {"syscalls": [{"names": [1, None], "action": "SCMP_ACT_NOTIFY"}]},
])
def test_hostile_shapes_never_raise(profile) -> None:
    reason = foreign_agent(profile)
    assert reason is None or isinstance(reason, str)


def test_wrongly_typed_notify_rule_still_counts() -> None:
    assert foreign_agent({"syscalls": [{"names": [1, None], "action": "SCMP_ACT_NOTIFY"}]}) is not None


def test_foreign_reason_reads_the_config() -> None:
    assert foreign_reason({"linux": {"seccomp": {**BASE, "syscalls": [NOTIFY_MKDIR]}}})
    assert foreign_reason({"linux": {"seccomp": BASE}}) is None
    assert foreign_reason({"linux": "x"}) is None and foreign_reason({}) is None


def test_policy_annotation_wins_over_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(POLICY_ENV, raising=False)
    assert agent_policy({}) == "fill"
    monkeypatch.setenv(POLICY_ENV, "refuse")
    assert agent_policy({}) == "refuse"
    assert agent_policy({"annotations": {POLICY_ANNOTATION: "fill"}}) == "fill"
    monkeypatch.setenv(POLICY_ENV, "sometimes")
    with pytest.raises(LazyshimError, match="sometimes"):
        agent_policy({})


def test_refuse_is_one_line_naming_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(POLICY_ENV, "refuse")
    with pytest.raises(LazyshimError) as err:
        check_allowed({}, "its seccomp profile has its own agent", "container c1")
    msg = str(err.value)
    assert "\n" not in msg and "container c1" in msg and "own agent" in msg and "refuse" in msg
    monkeypatch.setenv(POLICY_ENV, "fill")
    check_allowed({}, "reason", "container c1")  # no error


def test_fill_progress_prints_a_line_per_tenth(capsys: pytest.CaptureFixture[str]) -> None:
    from runtime.agent_policy import _Progress

    p = _Progress()
    for done in range(0, 101):
        p(done, 100, done * 1000)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 9 and lines[0] == "lazyshim: fetching the image: 10/100 files, 0.0 MB"
    p(0, 0, 0)  # nothing to do: no line, no division by zero
    assert capsys.readouterr().err == ""
