"""SIGKILL at any moment of a write leaves the previous result or the new one, complete, never a mix.

- ``atomic_dir``: a child process rewrites a two-file directory in a loop and is killed at random
  moments, 200 times.
- ``lit-safety fit``: a real fit (tiny organism, one SET step, random 1% selection, CPU) is killed
  at a random moment of its final export (0 to 1.3x the export's measured duration after its
  staging directory appears), 20 times; after each kill ``output_dir`` must show the previous
  result, file for file, or the new run's complete result (every artifact of that run, each file as
  its manifest says). The first kill hits a ``python -m lit_safety.cli fit`` process; the other 19
  hit processes forked from a server that has imported lit-safety once and calls the same
  ``lit_safety.cli.main``: a fresh interpreter spends ~7 s of each run on imports on 2 busy cores,
  which would make 20 runs take ~2.5 min; this way the test took 38-61 s (export ~90 ms per run).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from lit_safety.io import atomic_dir

REPO = Path(__file__).resolve().parents[1]
MODEL = "organism-dense-unaligned:tiny"
ARTIFACTS = ("hparams.yaml", "mask.safetensors", "model", "summary.json")


def test_atomic_dir_survives_sigkill_at_any_moment(tmp_path):
    out = tmp_path / "model"
    with atomic_dir(out) as tmp:
        (tmp / "a").write_text("0")
        (tmp / "b").write_text("0")
    rng = random.Random(0)
    versions = set()
    for i in range(200):
        ready_r, ready_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the writer: new versions until killed
            try:
                os.close(ready_r)
                n = 0
                while True:
                    with atomic_dir(out) as tmp:
                        (tmp / "a").write_text(f"{i}:{n}")
                        (tmp / "b").write_text(f"{i}:{n}")
                    if ready_w is not None:  # one version of its own written: the kill may come any time now
                        os.write(ready_w, b"1")
                        os.close(ready_w)
                        ready_w = None
                    n += 1
            finally:
                os._exit(0)
        os.close(ready_w)
        # a slow machine may not finish a forked writer's first write within the delay below: wait for
        # it, so that every kill falls after a version of this writer (random moments of later writes)
        assert os.read(ready_r, 1) == b"1"
        os.close(ready_r)
        time.sleep(rng.uniform(0.001, 0.01))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        a, b = (out / "a").read_text(), (out / "b").read_text()  # never missing
        assert a == b  # never a mix
        assert a.startswith(f"{i}:")  # a version of the writer just killed (it had finished one before)
        versions.add(a)
    assert len({v.split(":")[1] for v in versions}) > 1  # and the kills fell in different writes of theirs
    with atomic_dir(out) as tmp:  # the next writer removes what the killed ones left
        (tmp / "a").write_text("last")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert sorted(p.name for p in out.iterdir()) == ["a"]


# -- lit-safety fit ----------------------------------------------------------------------------------------------
SERVER = r"""
import json, os, sys, traceback
import lit_safety.cli, lit_safety.modules.intervention, lit_safety.data.datamodules, lit_safety.esi.api
import transformers.models.llama.modeling_llama
print("ready", flush=True)
for line in sys.stdin:
    argv, log = json.loads(line)
    pid = os.fork()
    if pid == 0:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        code = 0
        try:
            lit_safety.cli.main(argv)
        except SystemExit as done:
            code = done.code if isinstance(done.code, int) else 1
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    print(pid, flush=True)
    print(os.waitpid(pid, 0)[1], flush=True)
"""


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def visible(out: Path) -> dict[str, str]:
    """relative path -> SHA-256 of every file a reader of ``out`` sees among the run's artifacts."""
    seen = {}
    for name in ARTIFACTS:
        path = out / name
        if path.is_dir():
            seen.update({f"{name}/{p.name}": sha256(p) for p in sorted(path.iterdir()) if p.is_file()})
        elif path.is_file():
            seen[name] = sha256(path)
    return seen


def hidden_entries(out: Path) -> set[str]:
    return {name for name in os.listdir(out) if name.startswith(".")} if out.is_dir() else set()


def check_new_result(out: Path, previous: dict[str, str], now: dict[str, str], lr: float, seed: int) -> None:
    """``out`` holds the complete result of the run with learning rate ``lr`` and selection seed ``seed``."""
    from lit_safety.io import verify_published

    assert sorted(now) == sorted(previous)  # every artifact, every file of model/
    hparams = yaml.safe_load((out / "hparams.yaml").read_text())
    summary = json.loads((out / "summary.json").read_text())
    assert hparams["learning_rate"] == lr and hparams["selection"]["seed"] == seed
    assert summary["steps"] == 1 and summary["selection"]["seed"] == seed
    assert now["model/model.safetensors"] != previous["model/model.safetensors"]
    assert now["mask.safetensors"] != previous["mask.safetensors"]
    manifest = verify_published(out)  # every file as the run wrote it
    assert {k: v["sha256"] for k, v in manifest["files"].items()} == now


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="watches the runs through /proc (Linux)")
def test_sigkill_during_export_leaves_the_old_or_the_new_result(tmp_path, tiny_dense_aligned):
    from lit_safety.organism import organism_path

    organism_path(MODEL)  # built before the clock starts
    started = time.perf_counter()
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({
        "seed_everything": 0,
        "model": {"class_path": "lit_safety.modules.intervention.SafetyInterventionModule",
                  "init_args": {"model": MODEL, "intervention": "set", "selection": {"method": "random", "ratio": 0.01},
                                "overwrite": True}},
        "data": {"class_path": "lit_safety.data.datamodules.RefusalDataModule",
                 "init_args": {"num_samples": 8, "batch_size": 4, "max_length": 32}},
        "trainer": {"max_steps": 1, "accelerator": "cpu", "devices": 1, "logger": False, "enable_checkpointing": False,
                    "enable_progress_bar": False, "enable_model_summary": False, "limit_val_batches": 0,
                    "default_root_dir": str(tmp_path / "logs")}}))
    out = tmp_path / "out"
    log = tmp_path / "runs.log"

    def argv(i: int) -> tuple[list[str], float]:
        lr = round(1e-3 * (i + 2), 6)
        return ["fit", "--config", str(config), "--model.output_dir", str(out), "--model.learning_rate", str(lr),
                "--model.selection.seed", str(i)], lr

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    server = subprocess.Popen([sys.executable, "-c", SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              cwd=REPO, env=env)
    try:
        assert server.stdout.readline() == "ready\n"

        def start(i: int) -> int:
            server.stdin.write(json.dumps([argv(i)[0], str(log)]) + "\n")
            server.stdin.flush()
            return int(server.stdout.readline())

        def reaped() -> int:
            return int(server.stdout.readline())

        def wait_for_export(pid: int, poll) -> float | None:
            """Seconds until run ``pid`` starts its export (its staging directory ``.result-<pid>-*``
            appears in ``out``); None if it ended first."""
            t0 = time.perf_counter()
            while poll() is None:
                if any(name.startswith(f".result-{pid}-") for name in hidden_entries(out)):
                    return time.perf_counter() - t0
                time.sleep(0.0005)
            return None

        # the previous result, and how long an export takes (its staging directory appears -> the process ends)
        pid = start(0)
        assert wait_for_export(pid, lambda: None if _running(pid) else 1) is not None
        t_export = time.perf_counter()
        assert reaped() == 0, log.read_text()[-3000:]
        export_seconds = time.perf_counter() - t_export
        previous = visible(out)
        assert sorted({k.split("/")[0] for k in previous}) == list(ARTIFACTS)

        rng = random.Random(16)
        outcomes = []
        for i in range(1, 21):
            args, lr = argv(i)
            delay = rng.uniform(0, 1.3 * export_seconds)
            if i == 1:  # a real `python -m lit_safety.cli fit` process
                proc = subprocess.Popen([sys.executable, "-m", "lit_safety.cli", *args], cwd=REPO, env=env,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                hit = wait_for_export(proc.pid, proc.poll)
                time.sleep(delay)
                proc.send_signal(signal.SIGKILL)
                status = proc.wait()
                killed = status == -signal.SIGKILL
                assert killed or status == 0, f"kill {i}: the run failed on its own (exit status {status})"
            else:
                pid = start(i)
                hit = wait_for_export(pid, lambda pid=pid: None if _running(pid) else 1)
                time.sleep(delay)
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:  # it finished (and the server reaped it) before the kill
                    pass
                status = reaped()
                killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
                assert killed or status == 0, f"kill {i}: the run failed on its own: {log.read_text()[-3000:]}"
            now = visible(out)
            assert now, f"kill {i}: nothing left in {out}"
            if now == previous:
                outcomes.append("old")
            else:
                check_new_result(out, previous, now, lr, i)
                outcomes.append("new")
                previous = now
            assert hit is not None or not killed, f"kill {i} came before the export"
        assert "old" in outcomes and "new" in outcomes, outcomes

        # one more run, not killed: what the killed runs left behind is gone
        pid = start(21)
        assert reaped() == 0, log.read_text()[-3000:]
        check_new_result(out, previous, visible(out), argv(21)[1], 21)
        units = sorted(n for n in os.listdir(out) if n.startswith(".result-"))
        assert sorted(os.listdir(out)) == [".lit-safety.lock", ".result", *units, *ARTIFACTS] and len(units) == 1
        print(f"\n20 kills during export: {outcomes.count('old')} old, {outcomes.count('new')} new result; export "
              f"{export_seconds * 1000:.0f} ms; {time.perf_counter() - started:.1f} s")
    finally:
        server.stdin.close()
        server.kill()
        server.wait()


def _running(pid: int) -> bool:
    """Whether ``pid`` still runs (a zombie waiting for its parent's waitpid counts as ended)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
