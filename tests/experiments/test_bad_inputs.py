"""Every bad input listed in docs/bad_inputs.md is refused as the table says: its exit code and
ONE line "error: <message>" on stderr, no traceback (the table is the test's data, so the
documentation cannot drift from the behaviour)."""
import gzip
import io
import re
import shlex
import shutil
import tarfile
from pathlib import Path

import pytest
import torch

from experiments import compare as compare_cli
from experiments import probe as probe_cli
from experiments import train as train_cli
from experiments.config import preset
from experiments.trainer import train

ROOT = Path(__file__).resolve().parents[2]
TABLE = ROOT / "docs" / "bad_inputs.md"
BASE = ["--preset", "cpu-tiny", "--epochs", "2", "--no-progress", "--out", "{new}"]
ROW = re.compile(r"^\|\s*(\d+)\s*\|\s*(train|probe|compare)\s*\|\s*`([^`]*)`\s*\|\s*(\d+)\s*\|\s*(.*?)\s*\|\s*$")


def rows() -> list[tuple]:
    out = []
    for line in TABLE.read_text().splitlines():
        m = ROW.match(line)
        if m:
            number, tool, args, code, message = m.groups()
            out.append((int(number), tool, args, int(code), message.replace("\\|", "|").strip("`")))
    return out


class _Evil:
    def __reduce__(self):
        return (Path.touch, (Path("PWNED-by-a-checkpoint"),))


def _flipped(src: Path, dst: Path) -> Path:
    data = bytearray(src.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 64):
        data[i] ^= 0xFF
    dst.write_bytes(bytes(data))
    return dst


def make_files(root: Path) -> dict[str, str]:
    """The files the table's placeholders name, under `root`."""
    root.mkdir(parents=True, exist_ok=True)
    run = root / "run"
    train(preset("cpu-tiny", epochs=2, out=str(run), progress=False))
    ckpt, final = run / "checkpoints" / "last.pt", run / "final.pt"
    (root / "started").mkdir()
    (root / "started" / "config.json").write_text("{}")
    (root / "dir").mkdir()
    (root / "empty.pt").write_bytes(b"")
    (root / "text.pt").write_text("not a checkpoint\n")
    (root / "trunc.pt").write_bytes(ckpt.read_bytes()[:2000])
    torch.save({"format": "localsgd-checkpoint-v2", "x": _Evil()}, root / "evil.pt")
    torch.save({"format": "localsgd-checkpoint-v1", "params": torch.zeros(1)}, root / "v1.pt")
    bad = root / "badcifar"
    bad.mkdir()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo("cifar-10-batches-bin/data_batch_1.bin")
        info.size = 5
        tar.addfile(info, io.BytesIO(b"hello"))
    (bad / "cifar-10-binary.tar.gz").write_bytes(buf.getvalue())
    garbage = root / "gzgarbage"
    garbage.mkdir()
    (garbage / "cifar-10-binary.tar.gz").write_bytes(gzip.compress(b"x" * 100)[:40] + b"\x00" * 64)
    return {"new": str(root / "new"), "run": str(run), "final": str(final), "ckpt": str(ckpt),
            "flipped": str(_flipped(ckpt, root / "flipped.pt")),
            "flipped_final": str(_flipped(final, root / "flipped_final.pt")),
            "trunc": str(root / "trunc.pt"), "empty": str(root / "empty.pt"), "text": str(root / "text.pt"),
            "evil": str(root / "evil.pt"), "v1": str(root / "v1.pt"), "missing": str(root / "missing.pt"),
            "dir": str(root / "dir"), "started": str(root / "started"), "badcifar": str(bad),
            "gzgarbage": str(garbage)}


def run_row(tool: str, args: str, files: dict[str, str], capsys) -> tuple[int, list[str]]:
    argv = [a.format(**files) for a in shlex.split(args)]
    if tool == "train":
        argv = [a.format(**files) for a in BASE] + argv
    capsys.readouterr()
    code = {"train": train_cli.main, "probe": probe_cli.main, "compare": compare_cli.main}[tool](argv)
    return code, capsys.readouterr().err.strip().splitlines()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return make_files(tmp_path_factory.mktemp("bad_inputs"))


def test_the_table_lists_at_least_40_bad_inputs():
    numbers = [r[0] for r in rows()]
    assert len(numbers) >= 40 and numbers == list(range(1, len(numbers) + 1))


@pytest.mark.parametrize("number,tool,args,code,message", rows(), ids=lambda v: str(v)[:30])
def test_each_bad_input_gives_its_line_and_exit_code(files, capsys, monkeypatch, tmp_path,
                                                     number, tool, args, code, message):
    if "--device cuda" in args and torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the row is about a machine without it")
    monkeypatch.chdir(tmp_path)          # the evil pickle would touch a file here
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    got, err = run_row(tool, args, files, capsys)
    assert len(err) == 1 and err[0].startswith("error: "), err
    expected = message.format(**files).split("…")
    line, at = err[0][len("error: "):], 0
    for part in expected:                # the table elides variable parts (hashes) with "…"
        found = line.find(part.strip(), at)
        assert found >= 0, f"row {number}: {part.strip()!r} not in {line!r}"
        at = found + len(part.strip())
    assert got == code, (number, err)
    assert not (tmp_path / "PWNED-by-a-checkpoint").exists()
    assert not Path(files["new"]).exists() or not any(Path(files["new"]).iterdir())
    shutil.rmtree(files["new"], ignore_errors=True)


def test_debug_shows_the_exception_and_unexpected_errors_say_so(files, capsys, monkeypatch):
    with pytest.raises(ValueError, match="lr must be a finite number"):
        train_cli.main(["--preset", "cpu-tiny", "--lr", "inf", "--debug"])
    # a bug (not a user error) is exit 1 with a line that says how to see the traceback
    import experiments.trainer as trainer_mod

    def broken(*a, **k):
        raise ZeroDivisionError("boom")
    monkeypatch.setattr(trainer_mod, "load_datasets", broken)
    assert train_cli.main([a.format(**files) for a in BASE]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: internal error ZeroDivisionError: boom (run again with --debug for the traceback)"]


def test_a_signal_before_training_stops_at_once_and_a_second_one_during_training_too():
    import signal as sig
    from experiments.divergence import Interrupted
    stop = train_cli._SignalStop()
    with pytest.raises(Interrupted, match="stopped by SIGTERM before training started") as info:
        stop(sig.SIGTERM, None)
    assert info.value.exit_code == 143

    class FakeTrainer:
        stop_signal, last_checkpoint = None, "run/checkpoints/last.pt"

        def request_stop(self, signum):
            self.stop_signal = signum
    stop.trainer = FakeTrainer()
    stop(sig.SIGINT, None)                          # the first asks for a graceful stop
    assert stop.trainer.stop_signal == sig.SIGINT
    with pytest.raises(Interrupted, match="second SIGINT without a checkpoint; last checkpoint: run/") as info:
        stop(sig.SIGINT, None)
    assert info.value.exit_code == 130
