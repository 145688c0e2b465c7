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
