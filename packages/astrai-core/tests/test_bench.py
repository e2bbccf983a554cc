import importlib
import textwrap

import pytest

from astrai.cli.bench import BenchRow, discover, format_table, run_benchmark

cli_main = importlib.import_module("astrai.cli.main")


def _write(tmp_path, name, body):
    path = tmp_path / f"bench_{name}.py"
    path.write_text(textwrap.dedent(body))
    return path


GOOD = """
def main(argv=None):
    quick = "--quick" in (argv or [])
    return [dict(metric="decode", unit="tok/s", ours=200.0 if quick else 300.0, peer=100.0, peer_name="HF",
                 limit=400.0, limit_name="bandwidth bound")]
"""


def test_row_ratios():
    row = BenchRow("x", "m", "tok/s", ours=300.0, peer=100.0, limit=600.0)
    assert row.ratio == 3.0 and row.share_of_limit == 0.5
    assert BenchRow("x", "m", "tok/s", ours=1.0).ratio is None


def test_run_and_table(tmp_path):
    rows = run_benchmark(_write(tmp_path, "decode", GOOD), ["--quick"])
    assert rows == [BenchRow("decode", "decode", "tok/s", 200.0, 100.0, "HF", 400.0, "bandwidth bound")]
    table = format_table(rows)
    assert "2.00x" in table and "50%" in table and "HF / bandwidth bound" in table


def test_discover_filters_and_rejects_unknown(tmp_path):
    _write(tmp_path, "a", GOOD)
    _write(tmp_path, "b", GOOD)
    assert [p.stem for p in discover(tmp_path, None)] == ["bench_a", "bench_b"]
    assert [p.stem for p in discover(tmp_path, ["b"])] == ["bench_b"]
    with pytest.raises(ValueError, match=r"unknown benchmark\(s\) \['c'\]; available: \['a', 'b'\]"):
        discover(tmp_path, ["c"])
    with pytest.raises(ValueError, match="does not exist"):
        discover(tmp_path / "nope", None)


def test_bad_rows_and_missing_main(tmp_path):
    bad = _write(tmp_path, "bad", "def main(argv=None):\n    return [dict(metric='m', unit='u', ours=1, speed=2)]\n")
    with pytest.raises(ValueError, match=r"unknown keys \['speed'\]"):
        run_benchmark(bad, [])
    with pytest.raises(ValueError, match="has no main"):
        run_benchmark(_write(tmp_path, "nomain", "x = 1\n"), [])


def test_command_prints_table_and_reports_failures(tmp_path, capsys):
    _write(tmp_path, "good", GOOD)
    _write(tmp_path, "broken", "def main(argv=None):\n    raise RuntimeError('boom')\n")
    assert cli_main.main(["bench", "--dir", str(tmp_path)]) == 1
    captured = capsys.readouterr()
    assert "300" in captured.out and "3.00x" in captured.out
    assert "boom" in captured.err and "bench_broken.py" in captured.err
    assert cli_main.main(["bench", "good", "--dir", str(tmp_path), "--quick"]) == 0


def test_benchmark_module_may_define_dataclasses(tmp_path):
    body = """
    from dataclasses import dataclass

    @dataclass
    class Point:
        x: float

    def main(argv=None):
        return [dict(metric="m", unit="u", ours=Point(2.0).x)]
    """
    assert run_benchmark(_write(tmp_path, "dc", body), [])[0].ours == 2.0


def test_benchmark_missing_a_distribution_is_skipped_with_what_to_install(tmp_path, capsys):
    _write(tmp_path, "good", GOOD)
    _write(tmp_path, "train", "import astrai.not_here\n\ndef main(argv=None):\n    return []\n")
    _write(tmp_path, "peer", "import peer_not_here.models\n\ndef main(argv=None):\n    return []\n")
    assert cli_main.main(["bench", "--dir", str(tmp_path)]) == 0  # the installed benchmark still measured
    captured = capsys.readouterr()
    assert "300" in captured.out
    assert "bench_peer.py needs peer_not_here: pip install peer_not_here" in captured.err  # the first missing package
    assert "bench_train.py needs astrai.not_here, which no AstrAI distribution ships" in captured.err
    assert "skipped (not installed here): bench_peer.py, bench_train.py" in captured.err
    assert cli_main.main(["bench", "train", "--dir", str(tmp_path)]) == 1  # nothing could be measured


def test_missing_astrai_module_names_its_distribution():
    from astrai.cli.bench import missing_requirement

    exc = ModuleNotFoundError("No module named 'astrai.trainer'", name="astrai.trainer")
    assert missing_requirement(exc) == "needs astrai.trainer: pip install astrai-train"
