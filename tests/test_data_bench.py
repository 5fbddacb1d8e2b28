"""The throughput script runs and reports both loaders and the consumption rate."""
from tmd_megatron.data.bench import main
from tmd_megatron.data.loader_dali import dali_available


def test_bench_quick_prints_the_table(capsys):
    main(["--quick", "--repeat", "1"])
    out = capsys.readouterr().out
    assert "| loader torch | synthetic" in out and "| consumption | tiny Wan" in out
    assert ("| loader dali | paper-size" in out) == dali_available()
