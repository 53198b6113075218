"""Rewrite an OCI seccomp profile to trap our syscalls, and keep the original's verdicts.

libseccomp lets the first rule naming a syscall win, so a NOTIFY rule added after the
user's `allow openat` would never fire.  We take our syscalls out of every existing rule,
add NOTIFY rules, and remember what the original profile would have decided for them
(rules in order, argument conditions, default action).  The supervisor applies that
verdict itself to every notification: the profile is never widened.

Opens that cannot reach a file's content (O_DIRECTORY, O_CREAT|O_EXCL: directory listings,
lock and temp files) are not trapped at all where the filter can tell them apart and the
user's verdict does not depend on the arguments: they get a rule with the user's own action
(or fall to the user's default action), so the kernel answers them exactly as the original
profile would, without a round trip to the supervisor.
"""

from __future__ import annotations

import copy
import errno
import json
import os
from dataclasses import dataclass

from .syscalls import DENIED_ENOSYS, NUMBERS, OPEN_FLAGS_ARG, OPEN_REACH_MASK, OPENS_REACHING_FILES, TRAPPED_NAMES

EPERM = errno.EPERM
ALLOW_ACTIONS = frozenset({"SCMP_ACT_ALLOW", "SCMP_ACT_LOG"})
KILL_ACTIONS = frozenset({"SCMP_ACT_KILL", "SCMP_ACT_KILL_THREAD", "SCMP_ACT_KILL_PROCESS", "SCMP_ACT_TRAP"})
KILL = -1  # verdict: the original profile kills the caller
NOTIFY = "SCMP_ACT_NOTIFY"


@dataclass(frozen=True, slots=True)
class Cond:
    index: int
    value: int
    value_two: int
    op: str

    def matches(self, args: tuple[int, ...]) -> bool:
        a = args[self.index] if 0 <= self.index < 6 else 0
        v = self.value
        op = self.op
        if op == "SCMP_CMP_EQ":
            return a == v
        if op == "SCMP_CMP_NE":
            return a != v
        if op == "SCMP_CMP_LT":
            return a < v
        if op == "SCMP_CMP_LE":
            return a <= v
        if op == "SCMP_CMP_GT":
            return a > v
        if op == "SCMP_CMP_GE":
            return a >= v
        if op == "SCMP_CMP_MASKED_EQ":
            return (a & v) == self.value_two
        return False


def _action_errno(action: str, errno_ret: int | None, default_errno: int) -> int:
    if action in ALLOW_ACTIONS:
        return 0
    if action in KILL_ACTIONS:
        return KILL
    if action == "SCMP_ACT_ERRNO":
        return errno_ret if errno_ret is not None else default_errno
    return errno.ENOSYS  # TRACE with no tracer, NOTIFY to someone else: the kernel's answer


class Verdicts:
    """What the original profile decides for each trapped syscall."""

    def __init__(self, rules: dict[int, list[tuple[int, list[Cond]]]], default: int) -> None:
        self.rules = rules
        self.default = default
        # Most profiles decide a syscall by its number alone (an unconditional first rule, or
        # none): that verdict is looked up, not evaluated, on every notification.
        self._fixed = {nr: rs[0][0] for nr, rs in rules.items() if rs and not rs[0][1]}

    @classmethod
    def allow_all(cls) -> Verdicts:
        return cls({}, 0)

    def fixed_errno(self, nr: int) -> int | None:
        """The verdict for `nr` if it does not depend on the arguments (no rule names it, or
        the first one that does has no conditions), else None."""
        rs = self.rules.get(nr)
        if not rs:
            return self.default
        return rs[0][0] if not rs[0][1] else None

    def errno_for(self, nr: int, args: tuple[int, ...]) -> int:
        """0 to let the syscall run, an errno to fail it, KILL to kill the caller."""
        fixed = self._fixed.get(nr)
        if fixed is not None:
            return fixed
        for verdict, conds in self.rules.get(nr, ()):
            if all(c.matches(args) for c in conds):
                return verdict
        return self.default

    def to_json(self) -> str:
        return json.dumps({
            "default": self.default,
            "rules": {str(nr): [[v, [[c.index, c.value, c.value_two, c.op] for c in cs]] for v, cs in rs]
                      for nr, rs in self.rules.items()},
        })

    @classmethod
    def from_json(cls, text: str) -> Verdicts:
        d = json.loads(text)
        rules = {int(nr): [(v, [Cond(*c) for c in cs]) for v, cs in rs] for nr, rs in d["rules"].items()}
        return cls(rules, d["default"])


def _names(rule: dict) -> list[str]:
    names = list(rule.get("names") or [])
    if rule.get("name"):
        names.append(rule["name"])
    return names


def original_verdicts(profile: dict | None) -> Verdicts:
    if not profile:
        return Verdicts.allow_all()
    default_errno = profile.get("defaultErrnoRet") or EPERM
    default = _action_errno(profile.get("defaultAction", "SCMP_ACT_ALLOW"), default_errno, EPERM)
    rules: dict[int, list[tuple[int, list[Cond]]]] = {}
    for rule in profile.get("syscalls") or []:
        verdict = _action_errno(rule.get("action", ""), rule.get("errnoRet"), default_errno)
        conds = [Cond(int(a.get("index", 0)), int(a.get("value", 0)), int(a.get("valueTwo", 0)),
                      str(a.get("op", ""))) for a in rule.get("args") or []]
        for name in _names(rule):
            nr = NUMBERS.get(name)
            if nr is not None:
                rules.setdefault(nr, []).append((verdict, conds))
    return Verdicts(rules, default)


def patch_profile(profile: dict | None, listener_path: str, metadata: str = "") -> tuple[dict, Verdicts]:
    """The profile to give runc/crun, and the verdicts the supervisor must apply."""
    verdicts = original_verdicts(profile)
    out = copy.deepcopy(profile) if profile else {
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
    }
    taken = set(TRAPPED_NAMES)
    enosys = [n for n in DENIED_ENOSYS if verdicts.errno_for(NUMBERS[n], (0,) * 6) == 0]
    taken.update(enosys)
    kept = []
    for rule in out.get("syscalls") or []:
        names = [n for n in _names(rule) if n not in taken]
        if not names:
            continue
        rule = dict(rule)
        rule.pop("name", None)
        rule["names"] = names
        kept.append(rule)
    if enosys:
        kept.insert(0, {"names": enosys, "action": "SCMP_ACT_ERRNO", "errnoRet": errno.ENOSYS})
    split = {name: rule for name in OPEN_FLAGS_ARG if (rule := _fixed_rule(profile, name)) is not False}
    whole = [n for n in TRAPPED_NAMES if n not in split]
    kept.append({"names": whole, "action": NOTIFY})
    for name, rule in split.items():
        kept.extend(_flag_split_rules(name, OPEN_FLAGS_ARG[name], rule))
    out["syscalls"] = kept
    out["listenerPath"] = listener_path
    out["listenerMetadata"] = metadata
    return out, verdicts


def _fixed_rule(profile: dict | None, name: str) -> dict | None | bool:
    """The rule that decides `name` whatever its arguments: the first rule naming it if that
    has no argument conditions, None if no rule names it (the default action decides), False
    if the first rule has conditions (the verdict depends on the arguments: trap it whole)."""
    for rule in (profile or {}).get("syscalls") or []:
        if name in _names(rule):
            return False if rule.get("args") else rule
    return None


def _masked_eq(index: int, mask: int, value: int) -> dict:
    return {"index": index, "value": mask, "valueTwo": value, "op": "SCMP_CMP_MASKED_EQ"}


def _flag_split_rules(name: str, index: int, user_rule: dict | None) -> list[dict]:
    """Rules that trap the opens of `name` that can reach a file and give the others the
    user's own verdict: one NOTIFY rule per flag combination that reaches a file (libseccomp
    takes one test per argument in a rule, and an unconditional rule would override every
    conditional one), and for the others the user's rule's action, or nothing when the user's
    default action decides them anyway.  Every flag combination is covered exactly once."""
    rules = []
    if user_rule is not None:
        action = {k: user_rule[k] for k in ("action", "errnoRet") if k in user_rule}
        rules.append({"names": [name], **action, "args": [_masked_eq(index, os.O_DIRECTORY, os.O_DIRECTORY)]})
        rules.append({"names": [name], **action,
                      "args": [_masked_eq(index, OPEN_REACH_MASK, os.O_CREAT | os.O_EXCL)]})
    rules.extend({"names": [name], "action": NOTIFY, "args": [_masked_eq(index, OPEN_REACH_MASK, v)]}
                 for v in OPENS_REACHING_FILES)
    return rules


# The listenerMetadata lazyshim writes next to its own listenerPath: how a profile that
# lazyshim already patched is told apart from one that names someone else's agent.
OWN_METADATA = "run.lazyshim.supervisor"


def foreign_agent(profile: object) -> str | None:
    """Why `profile` hands syscalls to a seccomp agent other than lazyshim's, or None.

    The kernel gives a filter exactly one listener, so a profile with its own
    `listenerPath`, or any SCMP_ACT_NOTIFY rule lazyshim did not write, cannot share the
    notifications with the supervisor: replacing the listener would silently bypass (and,
    for a policy agent, widen) the user's profile.  Reads untrusted JSON: wrong types
    count as absent, never raise.
    """
    if not isinstance(profile, dict):
        return None
    if profile.get("listenerMetadata") == OWN_METADATA and _only_own_notify(profile):
        return None
    path = profile.get("listenerPath")
    if isinstance(path, str) and path:
        return f"its seccomp profile sends notifications to its own agent (listenerPath {path})"
    if profile.get("defaultAction") == NOTIFY:
        return "its seccomp profile notifies a seccomp agent by default (defaultAction SCMP_ACT_NOTIFY)"
    for rule in _rules(profile):
        if rule.get("action") == NOTIFY:
            names = ", ".join(n for n in _rule_names(rule)) or "no syscall"
            return f"its seccomp profile has an SCMP_ACT_NOTIFY rule for a seccomp agent ({names})"
    return None


def _rules(profile: dict) -> list[dict]:
    rules = profile.get("syscalls")
    return [r for r in rules if isinstance(r, dict)] if isinstance(rules, list) else []


def _rule_names(rule: dict) -> list[str]:
    names = rule.get("names")
    out = [n for n in names if isinstance(n, str)] if isinstance(names, list) else []
    if isinstance(rule.get("name"), str):
        out.append(rule["name"])
    return out


def _only_own_notify(profile: dict) -> bool:
    """Exactly the NOTIFY rules `patch_profile` appends (our trapped syscalls, each in one
    unconditional rule or in flag-split rules), and nothing else notifies."""
    if profile.get("defaultAction") == NOTIFY:
        return False
    whole: set[str] = set()
    split: set[str] = set()
    for rule in _rules(profile):
        if rule.get("action") != NOTIFY:
            continue
        names = _rule_names(rule)
        if not set(names) <= set(TRAPPED_NAMES):
            return False
        if rule.get("args"):
            if len(names) != 1 or names[0] not in OPEN_FLAGS_ARG:
                return False
            split.add(names[0])
        else:
            whole.update(names)
    return not whole & split and whole | split == set(TRAPPED_NAMES)
