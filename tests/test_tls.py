"""Transport security against real servers with certificates made here (cryptography): TLS with a
given CA, mTLS, the server name override, a bad certificate reported as one clear log line,
unreadable or mismatched certificate files as config errors, and headers (from config, environment
and a headers file) sent but never logged or printed."""
import re
import signal
import time

import pytest

from agent.components import Config
from agent.config import Duration
from agent.export import RetryableError
from agent.export.factory import EXPORTERS
from agent.export.otlp import OtlpExporterConfig, TlsConfig
from agent.selfmetrics import SelfMetrics
from tests.helpers import agent_log, base_config, clean_env, grpc_tls_receiver, hostagent, https_receiver, payload


# --- certificates -----------------------------------------------------------------------------------


def exporter(protocol, endpoint, **tls):
    cfg = OtlpExporterConfig(protocol=protocol, endpoint=endpoint, timeout=Duration(3), connections=1,
                             tls=TlsConfig(**tls))
    return EXPORTERS["otlp"].create(cfg, SelfMetrics())


RECEIVERS = {"grpc": grpc_tls_receiver, "http/protobuf": https_receiver}


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_tls_with_a_given_ca_and_mtls(pki, protocol, caplog):
    rec, endpoint = RECEIVERS[protocol](pki, mtls=True)
    try:
        ok = exporter(protocol, endpoint, ca_file=pki.ca, cert_file=pki.client[0], key_file=pki.client[1])
        ok.send(payload())
        ok.close()
        assert len(rec.metrics) == 1
        # the server wants a client certificate: without one the handshake fails, retryably
        anonymous = exporter(protocol, endpoint, ca_file=pki.ca)
        with pytest.raises(RetryableError):
            anonymous.send(payload())
        anonymous.close()
        assert len(rec.metrics) == 1
    finally:
        rec.stop()


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_server_name_override(pki, protocol):
    rec, endpoint = RECEIVERS[protocol](pki, which="named")  # valid for collector.test, not 127.0.0.1
    try:
        plain = exporter(protocol, endpoint, ca_file=pki.ca)
        with pytest.raises(RetryableError):
            plain.send(payload())
        plain.close()
        named = exporter(protocol, endpoint, ca_file=pki.ca, server_name_override="collector.test")
        named.send(payload())
        named.close()
        assert len(rec.metrics) == 1
    finally:
        rec.stop()


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_bad_certificate_is_one_clear_error_line(tmp_path, start_agent, pki, protocol):
    rec, endpoint = RECEIVERS[protocol](pki)
    try:
        cfg = base_config(tmp_path, exporter={"type": "otlp", "otlp": {
            "protocol": protocol, "endpoint": endpoint, "tls": {"ca_file": pki.other_ca}}},
            collection_interval="500ms", shutdown_timeout="1s", state_dir=str(tmp_path / "state"))
        proc = start_agent(cfg)
        deadline = time.monotonic() + 30
        while "tls_error" not in agent_log(proc) and time.monotonic() < deadline:
            assert proc.poll() is None, agent_log(proc)
            time.sleep(0.2)
        time.sleep(3)  # several more attempts fail the same way
        assert proc.poll() is None, agent_log(proc)
        text = agent_log(proc)
        errors = [line for line in text.splitlines() if "level=error" in line]
        assert len(errors) == 1, text
        assert f"tls_error endpoint={endpoint}" in errors[0]
        assert re.search(r"CERTIFICATE_VERIFY_FAILED|certificate verify failed", errors[0]), errors[0]
        assert "Traceback" not in text
        assert all(line.startswith("ts=") for line in text.splitlines()), text  # nothing unstructured
        assert rec.metrics == []
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        rec.stop()


def check(tmp_path, tls=None, **otlp):
    path = tmp_path / "agent.yaml"
    import yaml
    path.write_text(yaml.safe_dump({"exporter": {"otlp": {**otlp, **({"tls": tls} if tls else {})}}}))
    return hostagent("check-config", str(path))


def test_unreadable_or_mismatched_certificate_files_are_config_errors(tmp_path, pki):
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    cases = [
        ({"ca_file": str(tmp_path / "missing.pem")}, "exporter.otlp.tls.ca_file", "No such file"),
        ({"ca_file": str(tmp_path / "junk.pem")}, "exporter.otlp.tls.ca_file", "no PEM certificate"),
        ({"cert_file": pki.client[0]}, "exporter.otlp.tls.key_file", "go together"),
        ({"cert_file": pki.client[0], "key_file": str(tmp_path / "nokey")},
         "exporter.otlp.tls.key_file", "No such file"),
        ({"cert_file": pki.client[0], "key_file": pki.server[1]},
         "exporter.otlp.tls.cert_file", "matching private key"),
    ]
    for tls, key, words in cases:
        res = check(tmp_path, tls=tls)
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 2 and len(lines) == 1, res.stderr
        assert key in lines[0] and words in lines[0], lines[0]
    res = check(tmp_path, tls={"ca_file": pki.ca, "cert_file": pki.client[0], "key_file": pki.client[1]})
    assert res.returncode == 0, res.stderr


def test_headers_from_config_environment_and_file_are_sent_never_logged(tmp_path, start_agent, grpc_receiver):
    headers_file = tmp_path / "headers"
    headers_file.write_text("# API credentials\napi-key: s3cr3t-from-file\nx-scope = team-a\n")
    cfg = base_config(tmp_path, exporter={"type": "otlp", "otlp": {
        "endpoint": grpc_receiver.endpoint, "headers": {"x-tenant": "t1", "api-key": "overridden"},
        "headers_file": str(headers_file)}}, logging={"level": "debug"}, state_dir=str(tmp_path / "state"))
    env = clean_env(OTEL_EXPORTER_OTLP_HEADERS="x-env=s3cr3t-from-env")
    proc = start_agent(cfg, env=env)
    assert grpc_receiver.wait_for(lambda r: r.metrics), agent_log(proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0
    sent = grpc_receiver.headers[0]
    assert sent["api-key"] == "s3cr3t-from-file" and sent["x-scope"] == "team-a" and sent["x-tenant"] == "t1"
    assert sent["x-env"] == "s3cr3t-from-env"
    assert "s3cr3t" not in agent_log(proc)
    res = hostagent("check-config", str(tmp_path / "agent-0.yaml"), env=env)
    assert res.returncode == 0 and "s3cr3t" not in res.stdout and str(headers_file) in res.stdout
    # a malformed file is a config error that does not echo its content
    headers_file.write_text("api-key s3cr3t-oops\n")
    res = hostagent("check-config", str(tmp_path / "agent-0.yaml"))
    assert res.returncode == 2 and "exporter.otlp.headers_file" in res.stderr and "line 1" in res.stderr
    assert "s3cr3t" not in res.stderr


def test_standard_environment_variables_set_the_tls_files(pki):
    from agent import config
    cfg = config.load(None, {"OTEL_EXPORTER_OTLP_CERTIFICATE": pki.ca,
                             "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE": pki.client[0],
                             "OTEL_EXPORTER_OTLP_CLIENT_KEY": pki.client[1]}, schema=Config)
    tls = cfg.exporter.otlp.tls
    assert (tls.ca_file, tls.cert_file, tls.key_file) == (pki.ca, pki.client[0], pki.client[1])
