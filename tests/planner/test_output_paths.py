"""Output paths: checked before any work (one line, exit 2), special files written through, symlinks followed.

CI runs as root, which ignores permission bits, so "not writable" is tested with a folder under /proc
(no file can be created there, root or not) and a regular file standing where a folder should be.
"""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest

from costmodels.errors import InputError, PodplanError
from planner.cli.main import main
from planner.ir import fileio
from planner.ir.fileio import check_output_path, write_atomic

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "plans" / "tiny-deepseek-v3.local-8.json")
PROC_DIR = Path("/proc")


def _one_line(capsys, argv: list[str], *fragments: str) -> str:
    rc = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2, (rc, err)
    assert len(lines) == 1 and "Traceback" not in err, err
    for frag in fragments:
        assert frag in lines[0], (frag, lines[0])
    return lines[0]


# --- bad file outputs, for every command that writes one file ---------------------------------------


def _bad_files(tmp: Path) -> list[tuple[str, str]]:
    """(path, what the one line says) for every kind of unusable file path."""
    (tmp / "a-dir").mkdir(exist_ok=True)
    (tmp / "a-file").write_text("x")
    loop_a, loop_b, dangling = tmp / "loop-a", tmp / "loop-b", tmp / "dangling"
    for link, target in ((loop_a, loop_b), (loop_b, loop_a), (dangling, tmp / "nowhere" / "x.json")):
        if not link.is_symlink():
            link.symlink_to(target)
    return [
        (str(tmp / "a-dir"), "is a directory"),
        (str(tmp / "missing" / "out.json"), "parent folder"),
        (str(tmp / "a-file" / "out.json"), "is a file, not a folder"),
        (str(tmp / "a-file" / "deeper" / "out.json"), "is a file, not a folder"),
        (str(PROC_DIR / "podplan-out.json"), "not writable"),
        (str(loop_a), "symlink loop"),
        (str(dangling), "does not exist"),
    ]


def _never(*_args, **_kwargs):
    raise AssertionError("the command did its work before checking its output path")


COMMANDS = {
    "compile": (["compile", "tiny-mixtral", "--topology", "local:8", "-o"], "planner.compile.compile_report"),
    "balance": (["balance", "uniform", "--layers", "2", "--experts", "8", "--devices", "2",
                 "--slots-per-device", "5", "-o"], "planner.balance.loads.read_loads"),
    "replan": (["replan", TINY, "--failed-devices", "5", "-o"], "planner.replan.replan"),
    "show": (["show", TINY, "--format", "html", "-o"], "planner.views.html.render_html"),
}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_bad_output_file_fails_before_the_work(command, capsys, tmp_path, monkeypatch):
    argv, work = COMMANDS[command]
    monkeypatch.setattr(work, _never)
    for path, says in _bad_files(tmp_path):
        line = _one_line(capsys, argv + [path], f"podplan {command}: error: -o {path}", says)
        assert "create it first" in line or "give" in line or "choose" in line, line
    assert not (tmp_path / "missing").exists()  # no folder is created on the way
    assert not (tmp_path / "nowhere").exists()  # nor at a dangling link's target


def test_compile_into_an_existing_folder_is_refused_at_once(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr("planner.compile.compile_report", _never)
    _one_line(capsys, ["compile", "tiny-mixtral", "--topology", "local:8", "-o", str(tmp_path)], "is a directory")


# --- bad folder outputs: export -o DIR, run --job-dir DIR ----------------------------------------------


def _bad_folders(tmp: Path) -> list[tuple[str, str]]:
    (tmp / "a-file").write_text("x")
    return [
        (str(tmp / "a-file"), "is a file, not a folder"),
        (str(tmp / "missing" / "sub"), "parent folder"),
        (str(tmp / "a-file" / "sub"), "is a file, not a folder"),
        (str(PROC_DIR / "podplan-dir"), "not writable"),
        (str(PROC_DIR / "self"), "not writable"),  # exists, but nothing can be created in it
    ]


@pytest.mark.parametrize("command", ["export", "run"])
def test_bad_output_folder_fails_before_the_work(command, capsys, tmp_path, monkeypatch):
    if command == "export":
        argv, flag = ["export", TINY, "--format", "sglang", "-o"], "-o"
        monkeypatch.setattr("planner.ir.plan.load_plan", _never)
    else:
        argv, flag = ["run", TINY, "--job-dir"], "--job-dir"
        monkeypatch.setattr("planner.cli.run.load_plan", _never)
    for path, says in _bad_folders(tmp_path):
        _one_line(capsys, argv + [path], f"podplan {command}: error: {flag} {path}", says)
    assert not (tmp_path / "missing").exists()


def test_missing_output_folder_is_created_when_its_parent_exists(capsys, tmp_path):
    out = tmp_path / "new-export"
    assert main(["export", TINY, "--format", "eplb", "-o", str(out)]) == 0
    assert (out / "manifest.json").is_file()


# --- a failing run never clobbers an existing output -----------------------------------------------


def test_failing_runs_keep_the_existing_output(capsys, tmp_path):
    keep = tmp_path / "out.json"
    keep.write_text("precious\n")
    bad_plan = tmp_path / "bad.json"
    bad_plan.write_text("{not json")
    runs = [
        ["show", str(bad_plan), "--format", "json", "-o", str(keep)],
        ["compile", "tiny-mixtral", "--topology", "nowhere:3", "-o", str(keep)],
        ["balance", "zipf:nan", "--layers", "2", "--experts", "8", "--devices", "2", "--slots-per-device", "5",
         "-o", str(keep)],
        ["replan", str(bad_plan), "--failed-devices", "1", "-o", str(keep)],
    ]
    for argv in runs:
        assert main(argv) == 2, argv
        capsys.readouterr()
        assert keep.read_text() == "precious\n", argv


# --- special files: written through, never replaced --------------------------------------------------


def test_dev_null_stays_a_device(capsys):
    assert main(["show", TINY, "--format", "json", "-o", "/dev/null"]) == 0
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    assert main(["balance", "uniform", "--layers", "2", "--experts", "8", "--devices", "2", "--slots-per-device", "5",
                 "-o", "/dev/null"]) == 0
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)


def test_a_fifo_is_written_through_to_its_reader(capsys, tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got: list[bytes] = []

    def reader() -> None:
        with open(fifo, "rb") as f:
            got.append(f.read())

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    assert main(["show", TINY, "--format", "json", "-o", str(fifo)]) == 0
    t.join(timeout=30)
    assert not t.is_alive()
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)  # still a pipe, not a regular file
    assert got and got[0] == Path(TINY).read_bytes()  # canonical JSON of a golden plan is the file itself
    assert [p.name for p in tmp_path.iterdir()] == ["pipe"]  # no temp file left beside it


def test_a_symlink_is_followed_and_stays_a_link(capsys, tmp_path):
    real = tmp_path / "real" / "plan.json"
    real.parent.mkdir()
    real.write_text("old\n")
    os.chmod(real, 0o600)
    link = tmp_path / "link.json"
    link.symlink_to(real)
    chain = tmp_path / "chain.json"
    chain.symlink_to(link)
    assert main(["show", TINY, "--format", "json", "-o", str(chain)]) == 0
    assert link.is_symlink() and chain.is_symlink()
    assert real.read_text() == Path(TINY).read_text()
    assert stat.S_IMODE(os.stat(real).st_mode) == 0o600  # a replaced file keeps its permissions
    assert sorted(p.name for p in real.parent.iterdir()) == ["plan.json"]


def test_dangling_symlinks_and_loops_are_refused(tmp_path):
    dangling = tmp_path / "dangling.json"
    dangling.symlink_to(tmp_path / "gone.json")
    with pytest.raises(InputError, match="does not exist"):
        check_output_path(dangling)
    with pytest.raises(InputError, match="does not exist"):
        write_atomic(dangling, "x")
    assert not (tmp_path / "gone.json").exists()
    a, b = tmp_path / "a", tmp_path / "b"
    a.symlink_to(b)
    b.symlink_to(a)
    with pytest.raises(InputError, match="symlink loop"):
        check_output_path(a)
    with pytest.raises(InputError, match="symlink loop"):
        write_atomic(a, "x")


def test_write_atomic_needs_an_existing_folder_and_says_so(tmp_path):
    with pytest.raises(PodplanError, match="cannot write"):
        write_atomic(tmp_path / "missing" / "x.json", "x")
    assert not (tmp_path / "missing").exists()


def test_write_atomic_refuses_a_folder_and_a_socket(tmp_path):
    import socket

    with pytest.raises(InputError, match="directory"):
        write_atomic(tmp_path, "x")
    sock_path = tmp_path / "s.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(sock_path))
        with pytest.raises(InputError, match="socket"):
            check_output_path(sock_path)
        with pytest.raises(InputError, match="socket"):
            write_atomic(sock_path, "x")


def test_check_output_path_accepts_the_ordinary_cases(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert check_output_path("plain.json") == Path("plain.json")  # parent "." exists
    (tmp_path / "exists.json").write_text("x")
    check_output_path("exists.json")
    check_output_path("new-folder", folder=True)
    check_output_path(".", folder=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists.json"]  # the probes leave nothing behind
    assert fileio._writes_through(os.stat("/dev/null").st_mode)
