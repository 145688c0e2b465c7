"""``host_info``: what every report records about the machine it ran on."""
from pathlib import Path

import pytest

from leanvit import host
from leanvit.bench.report import host_lines

_EPYC = """processor\t: {n}
vendor_id\t: AuthenticAMD
cpu family\t: {family}
model\t\t: {model}
model name\t: AMD EPYC
stepping\t: {stepping}
microcode\t: {microcode}
flags\t\t: fpu avx2 fma avx512f
"""


def _two_cpus(**ident):
    return "\n".join(_EPYC.format(n=n, **ident) for n in range(2))


@pytest.fixture
def fake_host(monkeypatch, tmp_path):
    """host_info on a made-up /proc/cpuinfo, with a fixed load."""
    monkeypatch.setattr(host.platform, "processor", lambda: "x86_64")
    monkeypatch.setattr(host.os, "getloadavg", lambda: (1.234, 0.5, 0.25))

    def on(cpuinfo):
        path = tmp_path / "cpuinfo"
        path.write_text(cpuinfo)
        monkeypatch.setattr(host, "Path", lambda name: path if str(name) == "/proc/cpuinfo" else Path(name))
        return host.host_info()

    return on


def test_two_epyc_generations_are_told_apart_and_the_load_is_recorded(fake_host):
    """Both name themselves "AMD EPYC": the family, model, stepping and microcode differ."""
    rome = fake_host(_two_cpus(family=23, model=49, stepping=0, microcode="0x830107a"))
    turin = fake_host(_two_cpus(family=26, model=2, stepping=1, microcode="0x1000065"))
    assert rome["cpu"] == turin["cpu"] == "AMD EPYC"  # the existing keys as before
    assert rome["cpu_flags"] == ["avx2", "fma", "avx512f"] and isinstance(rome["logical_cpus"], int)
    assert rome["cpu_id"] == {"vendor": "AuthenticAMD", "family": 23, "model": 49, "stepping": 0,
                              "microcode": "0x830107a"}
    assert turin["cpu_id"]["family"] == 26 and turin["cpu_id"] != rome["cpu_id"]
    assert turin["loadavg"] == [1.23, 0.5, 0.25]
    assert host_lines(turin)[0].startswith("- CPU: AMD EPYC (")  # the reports' reader of "cpu"


def test_missing_facts_are_left_out(fake_host, monkeypatch):
    """A virtual CPU without microcode, a system without load averages: nothing is made up."""
    info = fake_host("vendor_id\t: GenuineIntel\ncpu family\t: 6\nmodel name\t: Intel Xeon\n")
    assert info["cpu"] == "Intel Xeon" and info["cpu_id"] == {"vendor": "GenuineIntel", "family": 6}

    def no_load():
        raise OSError("load average unobtainable")

    monkeypatch.setattr(host.os, "getloadavg", no_load)
    assert "loadavg" not in fake_host("")
    monkeypatch.delattr(host.os, "getloadavg")  # Windows
    assert "loadavg" not in fake_host("")


def test_the_cpu_is_described_by_its_first_core(fake_host):
    """Where cores differ (Arm's big.LITTLE; here a made-up pair), the facts are CPU 0's, not the last one read."""
    first = _EPYC.format(n=0, family=23, model=49, stepping=0, microcode="0x1").replace("avx2 fma avx512f", "avx2")
    second = _EPYC.format(n=1, family=26, model=2, stepping=1, microcode="0x2")
    facts = fake_host(first + "\n" + second)
    assert (facts["cpu_id"]["family"], facts["cpu_id"]["model"]) == (23, 49)
    assert facts["cpu_flags"] == ["avx2"]


def test_usable_cpus_are_the_affinity_not_the_machines(fake_host, monkeypatch):
    """In a container or under taskset the process may use 2 of 8 CPUs: threads default to 2, the report says both."""
    monkeypatch.setattr(host.os, "sched_getaffinity", lambda pid: {0, 3}, raising=False)
    monkeypatch.setattr(host.os, "cpu_count", lambda: 8)
    assert host.usable_cpus() == 2
    info = fake_host(_two_cpus(family=23, model=49, stepping=0, microcode="0x1"))
    assert (info["usable_cpus"], info["logical_cpus"]) == (2, 8)


def test_the_versions_and_the_time_of_the_load_are_recorded(fake_host):
    import importlib.metadata

    info = fake_host("")
    assert info["versions"]["leanvit"] == importlib.metadata.version("leanvit")
    assert info["versions"]["torch"] == importlib.metadata.version("torch")
    assert info["loadavg_at"]
    assert host_lines(info)[1].startswith(f"- load average (1, 5, 15 min) at {info['loadavg_at']}: 1.23, 0.5, 0.25")


def test_without_proc_cpuinfo_the_platforms_name_is_kept(monkeypatch, tmp_path):
    """Windows and macOS have no /proc/cpuinfo: the CPU is what the platform calls it, with no flags nor identity."""
    monkeypatch.setattr(host.platform, "processor", lambda: "Intel64 Family 6 Model 85 Stepping 7, GenuineIntel")
    missing = tmp_path / "missing"
    monkeypatch.setattr(host, "Path", lambda name: missing if str(name) == "/proc/cpuinfo" else Path(name))
    info = host.host_info()
    assert info["cpu"] == "Intel64 Family 6 Model 85 Stepping 7, GenuineIntel"
    assert info["cpu_flags"] == [] and info["cpu_id"] == {}


def test_the_flags_of_interest_are_listed_in_one_order_whatever_the_cpus(fake_host):
    """Reports of two hosts compare line by line: the flags in the project's order, not /proc/cpuinfo's."""
    info = fake_host("model name\t: X\nflags\t\t: avx512f sse fma avx2 amx_tile\n")
    assert info["cpu_flags"] == ["avx2", "fma", "avx512f", "amx_tile"]


def test_a_gpu_is_named_where_torch_sees_one(fake_host, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "gpu" not in fake_host("")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: "Test GPU")
    assert fake_host("")["gpu"] == "Test GPU"
