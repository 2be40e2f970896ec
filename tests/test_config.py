"""Config: broken configs fail with exit 2 and one line naming the key; env vars and
${env:...} apply with the documented precedence; docs/configuration.md matches the schema."""
import ast
import dataclasses
import os
import re

import pytest
import yaml

from agent import config
from agent.components import SCRAPERS, Config, ScrapersConfig
from tests.helpers import ROOT, clean_env, hostagent

BROKEN = [
    # (config, key the message must name, words it must contain)
    ({"collection_interval": 10}, "collection_interval", "duration"),
    ({"collection_interval": "10 parsecs"}, "collection_interval", "duration"),
    ({"collection_interval": "10ms"}, "collection_interval", "at least"),
    ({"shutdown_timeout": "soon"}, "shutdown_timeout", "duration"),
    ({"colection_interval": "10s"}, "colection_interval", "did you mean 'collection_interval'"),
    ({"scrapers": {"cpuu": {}}}, "scrapers.cpuu", "did you mean 'cpu'"),
    ({"scrapers": {"cpu": {"enabled": "yes"}}}, "scrapers.cpu.enabled", "true or false"),
    ({"scrapers": {"cpu": {"metrics": {"system.cpu.utilisation": {"enabled": True}}}}},
     "scrapers.cpu.metrics.system.cpu.utilisation", "did you mean 'system.cpu.utilization'"),
    ({"scrapers": {"process": {"include": ["(unclosed"]}}}, "scrapers.process.include[0]", "regular expression"),
    ({"scrapers": {"network": {"exclude": "lo"}}}, "scrapers.network.exclude", "list of strings"),
    ({"batch": {"max_size": 0}}, "batch.max_size", "at least 1"),
    ({"batch": {"max_size": "big"}}, "batch.max_size", "integer"),
    ({"exporter": {"type": "kafka"}}, "exporter.type", "one of file, otlp"),
    ({"exporter": {"otlp": {"protocol": "http/json"}}}, "exporter.otlp.protocol", "one of grpc, http/protobuf"),
    ({"exporter": {"otlp": {"compression": "brotli"}}}, "exporter.otlp.compression", "one of gzip, none"),
    ({"exporter": {"otlp": {"endpoint": "http://[::1"}}}, "exporter.otlp.endpoint", "malformed"),
    ({"exporter": {"otlp": {"endpoint": "ftp://collector:4317"}}}, "exporter.otlp.endpoint", "http:// or https://"),
    ({"exporter": {"otlp": {"endpoint": "collector"}}}, "exporter.otlp.endpoint", "needs a port"),
    ({"exporter": {"otlp": {"endpoint": "http://collector:99999"}}}, "exporter.otlp.endpoint", "malformed"),
    ({"exporter": {"otlp": {"timeout": "-1s"}}}, "exporter.otlp.timeout", "duration"),
    ({"exporter": {"otlp": {"headers": ["api-key"]}}}, "exporter.otlp.headers", "mapping"),
    ({"exporter": {"file": {"path": "/dev/null/metrics.jsonl"}}}, "exporter.file.path", "not writable"),
    ({"exporter": {"file": {"max_size": "12 potatoes"}}}, "exporter.file.max_size", "size"),
    ({"exporter": {"retry": {"multiplier": 0.5}}}, "exporter.retry.multiplier", "at least 1"),
    ({"ebpf": {"probes": {"proces": {"enabled": True}}}}, "ebpf.probes.proces", "did you mean 'process'"),
    ({"logging": {"level": "verbose"}}, "logging.level", "one of debug"),
    ({"resource": {"attributes": "team=sre"}}, "resource.attributes", "mapping"),
    (["not", "a", "mapping"], "", "mapping"),
    # configs that parse but could not run: every number has a range, NaN and infinity are errors
    ({"collection_interval": "9" * 400 + "s"}, "collection_interval", "duration"),
    ({"shutdown_timeout": "9999999999999h"}, "shutdown_timeout", "at most 1h"),
    ({"exporter": {"file": {"path": ""}}}, "exporter.file.path", "file path"),
    ({"exporter": {"file": {"path": "/tmp/a\0b"}}}, "exporter.file.path", "NUL"),
    ({"exporter": {"file": {"max_size": "4KiB", "max_backups": 10**12}}}, "exporter.file.max_backups",
     "at most 1000"),
    ({"exporter": {"retry": {"multiplier": float("nan")}}}, "exporter.retry.multiplier", "finite"),
]


@pytest.mark.parametrize("raw,key,words", BROKEN, ids=[b[1] or "top-level" for b in BROKEN])
def test_broken_config_exits_2_with_one_line_naming_the_key(tmp_path, raw, key, words):
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(raw))
    for args in (["check-config", str(path)], ["run", "--config", str(path)]):
        res = hostagent(*args)
        assert res.returncode == 2, res.stderr
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1, res.stderr
        assert "Traceback" not in res.stderr
        assert key in lines[0] and words in lines[0], lines[0]


def test_invalid_yaml_and_missing_file(tmp_path):
    path = tmp_path / "agent.yaml"
    path.write_text("exporter:\n  type: [file\n")
    res = hostagent("check-config", str(path))
    assert res.returncode == 2 and "invalid YAML" in res.stderr and len(res.stderr.splitlines()) == 1
    res = hostagent("run", "--config", str(tmp_path / "missing.yaml"))
    assert res.returncode == 2 and "missing.yaml" in res.stderr and len(res.stderr.splitlines()) == 1


def test_bad_flags_exit_2_with_one_line():
    for args in (["run", "--bogus"], ["frobnicate"], [], ["check-config"]):
        res = hostagent(*args)
        assert res.returncode == 2, (args, res.stderr)
        assert len(res.stderr.strip().splitlines()) == 1, res.stderr


def test_help_everywhere():
    for args in (["--help"], ["run", "--help"], ["check-config", "--help"], ["probes", "--help"],
                 ["version", "--help"]):
        res = hostagent(*args)
        assert res.returncode == 0 and "usage: hostagent" in res.stdout


def test_version():
    res = hostagent("version")
    assert res.returncode == 0 and re.fullmatch(r"hostagent \d+\.\d+\.\d+\n", res.stdout)


def test_check_config_prints_effective_config_with_env_and_redacted_headers(tmp_path):
    path = tmp_path / "agent.yaml"
    path.write_text("collection_interval: ${env:HA_INTERVAL:-30s}\n"
                    "exporter:\n  otlp:\n    headers:\n      api-key: ${env:HA_KEY}\n")
    res = hostagent("check-config", str(path), env=clean_env(HA_KEY="s3cr3t", OTEL_EXPORTER_OTLP_ENDPOINT="http://localhost:4317"))
    assert res.returncode == 0, res.stderr
    eff = yaml.safe_load(res.stdout)
    assert eff["collection_interval"] == "30s"
    assert eff["exporter"]["type"] == "otlp"
    assert eff["exporter"]["otlp"]["headers"] == {"api-key": "<redacted>"}
    assert "s3cr3t" not in res.stdout
    res = hostagent("check-config", str(path), env=clean_env())
    assert res.returncode == 2 and "HA_KEY is not set" in res.stderr


def test_otel_environment_variables():
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": "https://collector.example:4318",
        "OTEL_EXPORTER_OTLP_LOGS_ENDPOINT": "https://logs.example/custom/logs",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_EXPORTER_OTLP_HEADERS": "api-key=a%3Db,tenant=t1",
        "OTEL_EXPORTER_OTLP_COMPRESSION": "none",
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
        "OTEL_EXPORTER_OTLP_TIMEOUT": "2500",
        "OTEL_METRIC_EXPORT_INTERVAL": "15000",
        "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment.name=prod,team=sre",
        "OTEL_SERVICE_NAME": "edge-agent",
    }
    cfg = config.load(None, env, schema=Config)
    otlp = cfg.exporter.otlp
    assert cfg.exporter.type == "otlp" and otlp.protocol == "http/protobuf"
    assert otlp.signal_url("metrics") == "https://collector.example:4318/v1/metrics"
    assert otlp.signal_url("logs") == "https://logs.example/custom/logs"
    assert dict(otlp.headers) == {"api-key": "a=b", "tenant": "t1"}
    assert otlp.compression == "none" and otlp.insecure is True and otlp.timeout == 2.5
    assert cfg.collection_interval == 15.0
    assert dict(cfg.resource.attributes) == {"deployment.environment.name": "prod", "team": "sre"}
    assert cfg.resource.service_name == "edge-agent"
    # the metrics-specific variable wins over the base endpoint, and is used as is
    cfg = config.load(None, {"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
                             "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": "http://m.example:9999/ingest"}, schema=Config)
    assert cfg.exporter.otlp.signal_url("metrics") == "http://m.example:9999/ingest"


def test_config_file_wins_over_environment(tmp_path):
    path = tmp_path / "agent.yaml"
    path.write_text("collection_interval: 20s\nexporter:\n  type: file\n  file:\n"
                    f"    path: {tmp_path}/m.jsonl\n    logs_path: {tmp_path}/l.jsonl\n"
                    "  otlp:\n    endpoint: http://file.example:4317\n")
    cfg = config.load(str(path), {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://env.example:4317",
                                  "OTEL_METRIC_EXPORT_INTERVAL": "5000"}, schema=Config)
    assert cfg.collection_interval == 20.0
    assert cfg.exporter.type == "file"
    assert cfg.exporter.otlp.endpoint == "http://file.example:4317"


def test_bad_environment_variable_is_named():
    with pytest.raises(config.ConfigError, match="OTEL_EXPORTER_OTLP_PROTOCOL"):
        config.load(None, {"OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"}, schema=Config)
    with pytest.raises(config.ConfigError, match="OTEL_METRIC_EXPORT_INTERVAL"):
        config.load(None, {"OTEL_METRIC_EXPORT_INTERVAL": "ten"}, schema=Config)


def test_tls_by_default_except_loopback_and_http():
    otlp = config.load(None, {"OTEL_EXPORTER_OTLP_ENDPOINT": "collector.example:4317"}, schema=Config).exporter.otlp
    assert not otlp.is_insecure(otlp.signal_url("metrics"))
    otlp = config.load(None, {"OTEL_EXPORTER_OTLP_ENDPOINT": "127.0.0.1:4317"}, schema=Config).exporter.otlp
    assert otlp.is_insecure(otlp.signal_url("metrics"))
    otlp = config.load(None, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector.example:4317"},
                       schema=Config).exporter.otlp
    assert otlp.is_insecure(otlp.signal_url("metrics"))


def test_durations_and_sizes_round_trip():
    assert config.Duration.parse("250ms", "k") == 0.25 and str(config.Duration(0.25)) == "250ms"
    assert config.Duration.parse("5m", "k") == 300 and str(config.Duration(300)) == "5m"
    assert config.Size.parse("256MiB", "k") == 256 * 2**20 and str(config.Size(256 * 2**20)) == "256MiB"
    assert config.Size.parse("1GB", "k") == 10**9


def test_documentation_covers_every_key_and_default():
    doc = open(os.path.join(ROOT, "docs", "configuration.md")).read()
    rows = {m.group(1): m.group(2).strip() for m in re.finditer(r"^\| `([a-z0-9_.]+)` \| ([^|]*) \|", doc, re.M)}
    keys = dict(config.schema_keys(Config))
    assert set(rows) == set(keys), f"undocumented: {set(keys) - set(rows)}; not in schema: {set(rows) - set(keys)}"
    for key, default in keys.items():
        shown = yaml.safe_dump(config.to_plain(default), default_flow_style=True, width=10**6).strip()
        shown = shown.removesuffix("\n...").removesuffix(" ...").strip()
        assert rows[key] == f"`{shown}`", f"{key}: documented default {rows[key]} but the code has `{shown}`"


def test_config_sits_at_the_bottom_of_the_imports():
    """config.py is the generic machinery every component builds its config with: it imports no
    agent module but the bottom layer, and nothing inside a function (where a cycle would hide)."""
    tree = ast.parse(open(os.path.join(ROOT, "agent", "config.py")).read())
    top = {id(node) for node in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            assert id(node) in top, f"agent/config.py line {node.lineno}: an import inside a function"
            names = [node.module] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
            for name in names:
                if name == "agent" or name.startswith("agent."):
                    assert name in ("agent.model", "agent.component"), f"agent/config.py imports {name}"


def test_the_scrapers_section_is_the_scraper_table():
    """A scraper is its module and one line in SCRAPERS: the section, its defaults and the metric
    names its switches are checked against all follow from that line."""
    assert [f.name for f in dataclasses.fields(ScrapersConfig)] == list(SCRAPERS)
    for name, factory in SCRAPERS.items():
        assert type(getattr(ScrapersConfig(), name)) is factory.config
        with pytest.raises(config.ConfigError, match=rf"^scrapers.{name}.metrics.no.such: unknown metric"):
            config.build(Config, {"scrapers": {name: {"metrics": {"no.such": {"enabled": True}}}}})
