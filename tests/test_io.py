"""Artifacts are written atomically: an interrupted write never replaces an earlier result."""

from __future__ import annotations

import pytest

from lit_safety.io import atomic_dir, atomic_file, check_parent_exists


def test_interrupted_directory_write_keeps_previous(tmp_path):
    out = tmp_path / "model"
    with atomic_dir(out) as tmp:
        (tmp / "weights.bin").write_text("v1")
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(out) as tmp:
            (tmp / "weights.bin").write_text("partial")
            raise KeyboardInterrupt  # killed mid-save
    assert (out / "weights.bin").read_text() == "v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temp dir left
    with atomic_dir(out) as tmp:
        (tmp / "weights.bin").write_text("v2")
    assert (out / "weights.bin").read_text() == "v2"


def test_interrupted_file_write_keeps_previous(tmp_path):
    path = tmp_path / "summary.json"
    with atomic_file(path) as handle:
        handle.write("old")
    with pytest.raises(RuntimeError):
        with atomic_file(path) as handle:
            handle.write("half")
            raise RuntimeError("crash")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_missing_parent_is_named(tmp_path):
    check_parent_exists(tmp_path / "outputs" / "set")  # one missing level is created on write
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "no" / "such")):
        check_parent_exists(tmp_path / "no" / "such" / "out")


# -- issue 16: nothing lost, nothing leaked ----------------------------------------------------------------------
import json
import logging
import os
import stat
import subprocess
import sys


def dead_pid() -> int:
    """The PID of a process that has exited (and been reaped)."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask():
    """Set the process umask for one test (restored after)."""
    old = os.umask(0o022)
    os.umask(old)
    yield os.umask
    os.umask(old)


@pytest.mark.parametrize("mask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_published_artifacts_follow_the_umask(tmp_path, umask, mask, file_mode, dir_mode):
    """Temp files and directories are private while written; what is published gets the umask's modes."""
    from lit_safety.io import publish

    umask(mask)
    with atomic_file(tmp_path / "summary.json") as handle:
        handle.write("{}")
    with atomic_dir(tmp_path / "model") as tmp:
        (tmp / "weights.bin").write_text("v1")
    with publish(tmp_path / "run", job="test") as stage:
        (stage / "model").mkdir()
        with atomic_file(stage / "model" / "config.json") as handle:
            handle.write("{}")
        with atomic_file(stage / "summary.json") as handle:
            handle.write("{}")
    assert mode(tmp_path / "summary.json") == file_mode
    assert mode(tmp_path / "model") == dir_mode and mode(tmp_path / "model" / "weights.bin") == file_mode
    run = tmp_path / "run"
    assert mode(run / "model") == dir_mode and mode(run / "model" / "config.json") == file_mode
    assert mode(run / "summary.json") == file_mode
    assert mode(run / ".result") == dir_mode and mode(run / ".result" / "manifest.json") == file_mode


def test_interrupted_directory_swap_is_restored_by_the_next_writer(tmp_path, caplog):
    """What a SIGKILL between the two renames of an older atomic_dir left behind: the previous result
    moved aside and a finished or half-written temp dir, no ``model``. The next writer (or a run
    starting in the directory) puts the previous result back and removes the temp dir."""
    from lit_safety.io import recover_interrupted

    pid = dead_pid()
    (tmp_path / f".model.old-{pid}").mkdir()
    (tmp_path / f".model.old-{pid}" / "weights.bin").write_text("v1")
    (tmp_path / f".model.{pid}.k2j4x8.tmp").mkdir()
    (tmp_path / f".model.{pid}.k2j4x8.tmp" / "weights.bin").write_text("par")
    (tmp_path / f".summary.json.{pid}.ab12cd.tmp").write_text("{")
    with caplog.at_level(logging.WARNING, logger="lit_safety.io"):
        messages = recover_interrupted(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert (tmp_path / "model" / "weights.bin").read_text() == "v1"
    assert messages == [
        f"{tmp_path / 'model'}: restored the previous version from {tmp_path / f'.model.old-{pid}'} (left by "
        f"process {pid}, which died while replacing it)",
        f"{tmp_path}: removed {tmp_path / f'.model.{pid}.k2j4x8.tmp'} (unfinished write of process {pid}, which died)",
        f"{tmp_path}: removed {tmp_path / f'.summary.json.{pid}.ab12cd.tmp'} (unfinished write of process {pid}, "
        "which died)"]
    assert caplog.messages == messages
    # a swap that finished but did not remove the old copy: the old copy goes
    (tmp_path / f".model.old-{pid}").mkdir()
    with atomic_dir(tmp_path / "model") as tmp:
        (tmp / "weights.bin").write_text("v2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert (tmp_path / "model" / "weights.bin").read_text() == "v2"


def test_live_writers_leftovers_are_kept(tmp_path):
    """Temp files of a process that still runs are its work in progress, not leftovers."""
    from lit_safety.io import recover_interrupted

    busy = tmp_path / f".model.{os.getpid()}.abcdef.tmp"
    busy.mkdir()
    assert recover_interrupted(tmp_path) == [] and busy.is_dir()


def test_publish_replaces_the_whole_result_in_one_step(tmp_path):
    from lit_safety.io import publish, published_result, verify_published

    out = tmp_path / "out"
    with publish(out, job="A") as stage:
        (stage / "model").mkdir()
        (stage / "model" / "w.bin").write_text("a")
        (stage / "summary.json").write_text('{"run": "a"}')
    first = verify_published(out)
    assert first["job"] == "A" and sorted(first["files"]) == ["model/w.bin", "summary.json"]
    assert published_result(out)["job"] == "A"
    with pytest.raises(RuntimeError, match="crash"):
        with publish(out, job="B") as stage:
            (stage / "summary.json").write_text('{"run": "b"}')
            raise RuntimeError("crash")
    assert verify_published(out) == first and (out / "model" / "w.bin").read_text() == "a"
    with publish(out, job="C") as stage:  # a result without model/: the old model/ goes with the old result
        (stage / "summary.json").write_text('{"run": "c"}')
    assert verify_published(out)["job"] == "C" and (out / "summary.json").read_text() == '{"run": "c"}'
    assert not os.path.lexists(out / "model")
    units = [p.name for p in out.iterdir() if p.name.startswith(".result-")]
    assert sorted(p.name for p in out.iterdir()) == [".lit-safety.lock", ".result", *units, "summary.json"]
    assert len(units) == 1 and os.readlink(out / ".result") == units[0]


def test_publish_takes_over_an_earlier_versions_result(tmp_path):
    """Output of an earlier lit-safety (plain files, no manifest) counts as a finished result and is
    replaced as a whole too."""
    from lit_safety.io import publish, published_result, verify_published

    out = tmp_path / "out"
    (out / "model").mkdir(parents=True)
    (out / "model" / "w.bin").write_text("old")
    (out / "summary.json").write_text("old")
    (out / "mask.safetensors").write_text("old")
    (out / "eval").mkdir()  # not a result artifact: stays
    legacy = published_result(out, artifacts=("model", "summary.json", "mask.safetensors", "hparams.yaml"))
    assert legacy == {"job": None, "files": ["mask.safetensors", "model", "summary.json"]}
    with publish(out, job="new", artifacts=("model", "summary.json", "mask.safetensors", "hparams.yaml")) as stage:
        (stage / "summary.json").write_text("new")
        (stage / "hparams.yaml").write_text("new")
    assert verify_published(out)["job"] == "new"
    assert (out / "summary.json").read_text() == "new" and (out / "hparams.yaml").read_text() == "new"
    assert not os.path.lexists(out / "model") and not os.path.lexists(out / "mask.safetensors")
    assert (out / "eval").is_dir()


HOLD_LOCK = """
import sys, time
from lit_safety.io import try_lock
lock = try_lock(sys.argv[1])
print("locked", flush=True)
time.sleep(60)
"""


def test_second_run_in_one_output_dir_is_refused_naming_the_holder(tmp_path):
    from lit_safety.io import OutputDirError, try_lock

    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(OutputDirError) as info:
            try_lock(out)
        assert str(info.value) == (f"output_dir {out} is in use by another lit-safety run (process {holder.pid}, "
                                   f"lock {out / '.lit-safety.lock'}); wait for it to finish or choose another "
                                   "output_dir")
    finally:
        holder.kill()
        holder.wait()
    with try_lock(out):  # the holder died: its lock went with it
        pass


def test_unwritable_output_location_is_found_by_the_check(read_only_dir):
    for target, where in ((read_only_dir / "out", read_only_dir), (read_only_dir / "a" / "out", read_only_dir)):
        with pytest.raises(PermissionError) as info:
            check_parent_exists(target, "output_dir")
        assert str(info.value).startswith(f"output_dir {target}: cannot create files in {where} (")
    assert sorted(read_only_dir.iterdir()) == []


def test_claim_refuses_another_jobs_result_and_cleans_dead_runs_leftovers(tmp_path):
    """ESI scoring's policy: it replaces an earlier ESI result (also one of an earlier version), never a
    SET/SPA run's; a claim also removes the unpublished units and temp files of dead processes."""
    from lit_safety.io import OutputDirError, claim_output_dir, publish

    esi = {"job": "ESIScoringModule", "artifacts": ("mask.safetensors", "report.json"),
           "replaces": ("ESIScoringModule", None), "advice": "Choose another --model.output_dir."}
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "mask.safetensors").write_text("old")
    claim_output_dir(legacy, **esi).release()
    out = tmp_path / "set"
    with publish(out, job="SafetyInterventionModule") as stage:
        (stage / "summary.json").write_text("{}")
    created = json.loads((out / ".result" / "manifest.json").read_text())["created"]
    pid = dead_pid()
    (out / f".result-{pid}-abcd1234").mkdir()  # a run killed while staging its result
    (out / f".hparams.yaml.{pid}.x1y2z3.tmp").write_text("half")
    with pytest.raises(OutputDirError) as info:
        claim_output_dir(out, **esi)
    assert str(info.value) == (f"output_dir {out} already holds the finished result of another run "
                               f"(SafetyInterventionModule, {created}: summary.json); nothing was written. Choose "
                               "another --model.output_dir.")
    units = [p.name for p in out.iterdir() if p.name.startswith(".result-")]
    assert sorted(p.name for p in out.iterdir()) == [".lit-safety.lock", ".result", *units, "summary.json"]
    assert len(units) == 1 and os.readlink(out / ".result") == units[0]
    claim_output_dir(out, **{**esi, "overwrite": True}).release()
