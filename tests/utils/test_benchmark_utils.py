"""utils.benchmark: the CPU memory measure counts the call's tensors and prints nothing of its own."""

import torch

from lnlm_ssm.utils.benchmark import peak_extra_memory


def test_cpu_peak_counts_the_call_and_keeps_the_profiler_quiet(capfd):
    x = torch.randn(1 << 16)
    peak_extra_memory(lambda: x * 2, "cpu")  # first call: one-time initialisation
    capfd.readouterr()
    measured = peak_extra_memory(lambda: x * 2, "cpu")
    out, err = capfd.readouterr()
    # The profiler used to print "USDT: ... profiler_start" / "profiler_stop" into the benchmark's output.
    assert "USDT" not in out + err and "profiler_st" not in out + err
    assert measured["torch_bytes"] >= x.numel() * 4
    print("still printing")
    assert capfd.readouterr().out == "still printing\n"
