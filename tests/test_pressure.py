"""Pressure stall information: the host's and each workload's, against the kernel's own files.

Workloads are cgroups the tests make under the cgroup v2 mount (named like docker's and systemd's)
and move processes into. Values are checked against the files read right before and right after
the scrape (a counter lies between the two readings); the file parsers take hostile text."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from hypothesis import given, settings, strategies as st

from agent.model import Resource
from agent.procfs import cgroupfs
from agent.selfmetrics import SelfMetrics
from agent.sources.cgroups import PressureScraper, PressureScraperConfig
from tests.helpers import ROOT, OwnCgroups, finishes, scrape_points, wait_until

RESOURCE = Resource((("service.name", "test"),))
STALL = "system.linux.pressure.stall_type"
BUSY = "import sys; sys.stdin.readline()\nwhile True: pass"
SLEEPER = "import sys, time; sys.stdin.readline(); print('asleep', flush=True); time.sleep(600)"


@pytest.fixture
def cgroups():
    cg = OwnCgroups()
    yield cg
    cg.close()


def scraper(telemetry=None, **cfg) -> PressureScraper:
    return PressureScraper(PressureScraperConfig(**cfg), telemetry or SelfMetrics(), RESOURCE)


def of(scraped: dict, metric: str, stall: str, cgroup: str | None = None) -> float:
    """The value of one series: the host's (no workload attributes) or the workload's at `cgroup`."""
    found = [v for (name, attrs), v in scraped.items() if name == metric and (STALL, stall) in attrs and
             (dict(attrs).get("process.linux.cgroup") == (cgroup and "0::" + cgroup))]
    assert len(found) == 1, (metric, stall, cgroup, found)
    return found[0]


def kernel(path) -> dict:
    return cgroupfs.parse_pressure(open(path).read())


def test_host_pressure_is_proc_pressure():
    source = scraper(workloads=False)
    resources = [r for r in ("cpu", "memory", "io", "irq") if os.path.exists(f"/proc/pressure/{r}")]
    before = {r: kernel(f"/proc/pressure/{r}") for r in resources}
    scraped = scrape_points(source)
    after = {r: kernel(f"/proc/pressure/{r}") for r in resources}
    assert {name for name, _ in scraped} == {f"system.{r}.linux.pressure.total" for r in resources}
    for r in resources:
        assert before[r].keys() == after[r].keys() and "some" in after[r] or r == "irq"
        for stall in after[r]:
            value = of(scraped, f"system.{r}.linux.pressure.total", stall)
            assert type(value) is float
            assert before[r][stall] <= round(value * 1e6) <= after[r][stall], (r, stall)
    # the host's points carry no workload attributes
    assert all(dict(attrs).keys() == {STALL} for _, attrs in scraped)


def test_a_busy_workloads_cpu_pressure_grows_and_a_sleepers_does_not(cgroups):
    """6 busy loops on this machine's CPUs in container A, a sleeper in service B: A's tasks wait
    for a CPU nearly all the time (cpu `some` grows about as fast as the clock), B's never run."""
    tag = f"hostagent-psi-{os.getpid()}"
    a = f"/{tag}.slice/docker-{os.getpid():064x}.scope"
    b = f"/{tag}.slice/{tag}-sleeper.service"
    cgroups.make(a)
    cgroups.make(b)
    # B's first scrape once its task sleeps: its start-up, under the load of A (and of whatever
    # else this host runs), may wait for a CPU too
    assert finishes(cgroups.start(b, SLEEPER).stdout.readline) == "asleep\n"
    source = scraper()
    v2 = cgroups.v2
    first = scrape_points(source)
    busy = [cgroups.start(a, BUSY) for _ in range(max(6, 3 * os.cpu_count()))]
    assert wait_until(lambda: kernel(f"{v2}{a}/cpu.pressure")["some"] - of(first, "system.cpu.linux.pressure.total",
                                                                          "some", a) * 1e6 >= 1e6, 60)
    before = {w: kernel(f"{v2}{w}/cpu.pressure") for w in (a, b)}
    second = scrape_points(source)
    after = {w: kernel(f"{v2}{w}/cpu.pressure") for w in (a, b)}
    for proc in busy:
        proc.kill()
    grew = {w: of(second, "system.cpu.linux.pressure.total", "some", w) - of(first, "system.cpu.linux.pressure.total",
                                                                             "some", w) for w in (a, b)}
    print(f"cpu some grew: container A {grew[a]:.3f} s, sleeper B {grew[b]:.6f} s")
    assert grew[a] >= 1.0
    assert grew[b] <= grew[a] / 100  # B's one task sleeps: never runnable, never stalled (0 here)
    for w in (a, b):
        for stall in ("some", "full"):
            value = of(second, "system.cpu.linux.pressure.total", stall, w)
            assert before[w][stall] <= round(value * 1e6) <= after[w][stall], (w, stall)
    # A is a container, B a service: each series names its workload
    a_attrs = next(attrs for (name, attrs) in second if dict(attrs).get("process.linux.cgroup") == "0::" + a)
    assert dict(a_attrs)["container.id"] == f"{os.getpid():064x}"
    b_attrs = next(attrs for (name, attrs) in second if dict(attrs).get("process.linux.cgroup") == "0::" + b)
    assert dict(b_attrs)["linux.systemd.unit"] == f"{tag}-sleeper.service"
    # and memory and io pressure of each workload are there too
    for resource in ("memory", "io"):
        for w in (a, b):
            of(second, f"system.{resource}.linux.pressure.total", "some", w)


SCRAPE_AND_REPORT = """
import json
from agent.model import Resource
from agent.selfmetrics import SelfMetrics
from agent.sources.cgroups import PressureScraper, PressureScraperConfig
telemetry = SelfMetrics()
source = PressureScraper(PressureScraperConfig(), telemetry, Resource(()))
series = [[m.name, dict(p.attributes)] for g in source.collect() for m in g.metrics for p in m.points]
skipped = telemetry.counter("hostagent.scraper.cgroup.skipped", "{item}", "")
print(json.dumps({"series": series, "unreadable": skipped.value((("scraper", "pressure"), ("reason", "unreadable")))}))
"""


def test_an_unreadable_pressure_file_is_counted_and_the_rest_still_reported(cgroups):
    """Root without CAP_DAC_OVERRIDE (as a hardened unit may run) cannot read a file of mode 000."""
    if shutil.which("setpriv") is None:
        pytest.skip("needs setpriv")
    tag = f"hostagent-psi-denied-{os.getpid()}"
    denied, fine = f"/{tag}.slice/denied.service", f"/{tag}.slice/fine.service"
    cgroups.make(denied)
    cgroups.make(fine)
    os.chmod(f"{cgroups.v2}{denied}/cpu.pressure", 0)
    out = subprocess.run(["setpriv", "--inh-caps=-all", "--bounding-set=-all", sys.executable, "-c", SCRAPE_AND_REPORT],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    series = {(name, attrs.get("process.linux.cgroup")) for name, attrs in report["series"]}
    assert ("system.cpu.linux.pressure.total", "0::" + denied) not in series
    assert ("system.memory.linux.pressure.total", "0::" + denied) in series  # only that file is lost
    assert ("system.cpu.linux.pressure.total", "0::" + fine) in series
    assert ("system.cpu.linux.pressure.total", None) in series  # the host's
    assert report["unreadable"] >= 1


def test_a_workload_with_pressure_switched_off_has_no_pressure_and_no_error(cgroups):
    """cgroup.pressure=0 hides a cgroup's *.pressure files (6.x): nothing to read, nothing lost."""
    tag = f"hostagent-psi-off-{os.getpid()}"
    off, on = f"/{tag}.slice/off.service", f"/{tag}.slice/on.service"
    cgroups.make(off)
    cgroups.make(on)
    try:
        with open(f"{cgroups.v2}{off}/cgroup.pressure", "w") as f:
            f.write("0")
    except OSError as e:
        pytest.skip(f"cgroup.pressure cannot be switched off here: {e}")
    telemetry = SelfMetrics()
    skipped = telemetry.counter("hostagent.scraper.cgroup.skipped", "{item}", "")
    scraped = scrape_points(scraper(telemetry))
    assert not [attrs for _, attrs in scraped if dict(attrs).get("process.linux.cgroup") == "0::" + off]
    of(scraped, "system.cpu.linux.pressure.total", "some", on)
    if not os.path.exists(f"{cgroups.v2}{off}/cpu.pressure"):
        assert skipped.value((("scraper", "pressure"), ("reason", "unreadable"))) == 0


def test_workloads_off_reads_the_host_only(cgroups):
    cgroups.make(f"/hostagent-psi-host-{os.getpid()}.slice")
    assert all(dict(attrs).keys() == {STALL} for _, attrs in scrape_points(scraper(workloads=False)))


# --- the parser against hostile text ------------------------------------------------------------------

def test_pressure_file_format():
    text = ("some avg10=1.50 avg60=0.25 avg300=0.00 total=123456789\n"
            "full avg10=0.00 avg60=0.00 avg300=0.00 total=42\n")
    assert cgroupfs.parse_pressure(text) == {"some": 123456789, "full": 42}
    assert cgroupfs.parse_pressure("some avg10=0.00 avg60=0.00 avg300=0.00 total=7\n") == {"some": 7}  # old cpu
    for bad in ("some total=nan", "some total=-1", "some total=1e9", f"some total={1 << 64}", "some total=",
                "some total=١٢", "nothing total=5", "total=5", "some", ""):
        assert cgroupfs.parse_pressure(bad) == {}, bad


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("somefultavg0123456789.= \nxNaN-\x00\u00e9")), max_size=400))
def test_pressure_parser_never_raises_and_returns_counters(text):
    out = cgroupfs.parse_pressure(text)
    assert set(out) <= {"some", "full"}
    assert all(type(v) is int and 0 <= v < 1 << 64 for v in out.values())


@settings(max_examples=100, deadline=None)
@given(st.integers(min_value=0, max_value=(1 << 64) - 1), st.integers(min_value=0, max_value=(1 << 64) - 1))
def test_pressure_parser_takes_every_64_bit_total(some, full):
    text = f"some avg10=0.00 avg60=0.00 avg300=0.00 total={some}\nfull avg10=0.00 avg60=0.00 avg300=0.00 total={full}\n"
    assert cgroupfs.parse_pressure(text) == {"some": some, "full": full}
