"""The runc CLI's own parsing: Go flag rules, the `run` dispatch rule, list re-alignment."""

from __future__ import annotations

from pathlib import Path

import pytest

from runtime import oci
from runtime.paths import oci_state_dir, valid_id


def test_parse_flags_like_go() -> None:
    items, i = oci.parse_flags(["--bundle", "b", "-pid-file=p", "--no-pivot", "id", "--bogus"], oci.CREATE_VALUE)
    assert [(n, v) for n, v, _, _ in items] == [("bundle", "b"), ("pid-file", "p"), ("no-pivot", "true")]
    assert i == 4
    items, i = oci.parse_flags(["-b", "x", "--", "-id"], oci.CREATE_VALUE)
    assert i == 3 and oci._last(items, "bundle", "b") == "x"
    with pytest.raises(oci.Usage):
        oci.parse_flags(["--bundle"], oci.CREATE_VALUE)
    with pytest.raises(oci.Usage):
        oci.parse_flags(["---x"], oci.CREATE_VALUE)


@pytest.mark.parametrize("argv, runc", [
    (["state", "x"], True),
    (["--root", "/r", "run", "x"], True),
    (["run", "--bundle", "b", "x"], True),
    (["run", "-d", "x"], False),                        # podman's -d; runc's needs ./config.json
    (["run", "-d", "--bundle", "b", "x"], True),
    (["run", "busybox"], False),                        # no ./config.json here
    (["run", "--rm", "busybox", "sh"], False),
    (["run", "127.0.0.1:5000/busybox:esgz"], False),
    (["run", "x", "echo", "hi"], False),
    (["pull", "busybox"], False),
    ([], False),
    (["--help"], False),
    (["--version"], True),
    (["features"], True),
])
def test_dispatch(argv: list[str], runc: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert oci.wants_oci(argv) is runc


def test_run_in_a_bundle_dir_is_runc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "config.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    assert oci.wants_oci(["run", "mycontainer"]) is True
    assert oci.wants_oci(["run", "-d", "mycontainer"]) is True
    assert oci.wants_oci(["run", "docker.io/library/busybox"]) is False


def test_ids_are_path_safe() -> None:
    for bad in ("", ".", "..", "a/b", "../x", "a b", "x\n"):
        assert not valid_id(bad)
        with pytest.raises(ValueError):
            oci_state_dir("/run/runc", bad)
    assert valid_id("abc-1.2_3+4")


def test_retable_keeps_runc_alignment() -> None:
    out = (b"ID          PID         STATUS      BUNDLE                     CREATED   OWNER\n"
           b"a           1           created     /run/lazyshim/x/bundle     T         root\n")
    got = oci._retable(out, [("/run/lazyshim/x/bundle", "/b")])
    assert got == (b"ID          PID         STATUS      BUNDLE      CREATED     OWNER\n"
                   b"a           1           created     /b          T           root\n")


def test_rewrite_create_argv_keeps_everything_else() -> None:
    argv = ["--root", "/r", "create", "-b", "rel", "--console-socket", "s.sock", "--pid-file", "p", "id"]
    g, vi = oci.parse_flags(argv, oci.GLOBAL_VALUE)
    ctx = oci.Ctx(argv, g, vi)
    items, pi = oci.parse_flags(ctx.rest, oci.CREATE_VALUE)
    out = oci._rewrite_create_argv(ctx, items, pi, "/priv", "/abs/rel")
    assert out == ["--root", "/r", "create", "--bundle", "/priv", "--console-socket=/abs/rel/s.sock",
                   "--pid-file", "p", "id"]


def test_every_lazyshim_verb_is_routed_to_lazyshim() -> None:
    """A verb added to lazyshim's own parser but not to IMAGE_VERBS would go to runc."""
    from runtime.main import _parser
    from runtime.oci import IMAGE_VERBS

    sub = next(a for a in _parser()._actions if a.dest == "verb")
    ours = set(sub.choices) - {"run", "help"} - oci.SHARED_VERBS
    assert ours <= IMAGE_VERBS, ours - IMAGE_VERBS


@pytest.mark.parametrize("argv, runc", [
    (["ps"], False), (["ps", "-a", "--format", "json"], False), (["ps", "c1"], True),
    (["ps", "--format", "json", "c1"], True), (["--root", "/r", "ps"], True),
    (["exec", "nosuchcontainer", "true"], True), (["--root", "/r", "exec", "x", "true"], True),
])
def test_verbs_runc_shares_with_podman(argv: list[str], runc: bool, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LAZYSHIM_ROOT", str(tmp_path))
    assert oci.wants_oci(argv) is runc
    (tmp_path / "containers" / "mine").mkdir(parents=True)
    assert oci.wants_oci(["exec", "mine", "true"]) is False


def test_bash_completion_knows_every_verb_and_flag(tmp_path: Path) -> None:
    import subprocess

    from runtime.completion import bash_script
    from runtime.main import _parser

    script = tmp_path / "c.bash"
    script.write_text(bash_script(_parser()))

    def complete(*words: str) -> list[str]:
        cmd = (f"source {script}; COMP_WORDS=({' '.join(words)}); COMP_CWORD={len(words) - 1}; _lazyshim; "
               'printf "%s\\n" "${COMPREPLY[@]}"')
        return subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=30,
                              cwd=tmp_path).stdout.split()
    assert complete("lazyshim", "ru") == ["run"]
    assert {"ps", "logs", "stop", "rm", "exec", "gc", "info", "pull"} <= set(complete("lazyshim", "''"))
    assert "--volume" in complete("lazyshim", "run", "--vo") and "--detach" in complete("lazyshim", "run", "--de")
    assert complete("lazyshim", "stop", "-") == ["--help", "--time", "-h", "-t"]
