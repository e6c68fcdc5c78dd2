"""TLS to the collector: its certificate and key from TOKEN_METER_TLS_CERT_FILE and
TOKEN_METER_TLS_KEY_FILE, and the plugin's client verifying it against `collector_ca_bundle`.
Certificates are made per test by the `openssl` command line (a test CA, a server certificate
for 127.0.0.1 and localhost, and a CA that signed nothing the collector has)."""

from __future__ import annotations

import asyncio
import json
import shutil
import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import SECRETS, make_settings, run_collector_app
from tests.factories import usage_event
from token_meter_collector.settings import Settings, SettingsError
from token_meter_plugin.blocklist import BlocklistSettings
from token_meter_plugin.config import PluginConfig
from token_meter_plugin.delivery.client import CollectorClient
from token_meter_plugin.delivery.settings import DeliverySettings

BATCH_HEADERS = {"Content-Type": "application/cloudevents-batch+json"}


@dataclass(frozen=True)
class Certificates:
    ca: Path  # the CA bundle that trusts `cert`
    cert: Path  # for IP 127.0.0.1 and DNS localhost
    key: Path
    other_ca: Path  # a CA that signed nothing the collector has
    other_name_cert: Path  # signed by `ca`, for collector.example only
    other_name_key: Path
    encrypted_key: Path  # `key`, encrypted with a passphrase


def openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=60)


def make_ca(directory: Path, name: str) -> tuple[Path, Path]:
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", key, "-out", cert, "-days", "2", "-subj", f"/CN=token-meter test {name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    return cert, key


def make_server_cert(directory: Path, name: str, ca: Path, ca_key: Path, san: str) -> Path:
    key, csr, cert = (directory / f"{name}{suffix}" for suffix in (".key", ".csr", ".pem"))
    extensions = directory / f"{name}.ext"
    extensions.write_text(
        f"subjectAltName={san}\nbasicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
    )
    openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", key, "-out", csr, "-subj", f"/CN={name}",
    )  # fmt: skip
    openssl(
        "x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
        "-out", cert, "-days", "2", "-extfile", extensions,
    )  # fmt: skip
    return cert


@pytest.fixture
def certificates(tmp_path: Path) -> Certificates:
    if shutil.which("openssl") is None:
        pytest.fail("the TLS tests need the openssl command line (Debian package openssl)")
    directory = tmp_path / "tls"
    directory.mkdir()
    ca, ca_key = make_ca(directory, "ca")
    other_ca, _ = make_ca(directory, "other-ca")
    cert = make_server_cert(directory, "server", ca, ca_key, "IP:127.0.0.1,DNS:localhost")
    other = make_server_cert(directory, "elsewhere", ca, ca_key, "DNS:collector.example")
    encrypted = directory / "encrypted.key"
    openssl("pkey", "-in", directory / "server.key", "-out", encrypted, "-aes256",
            "-passout", "pass:a passphrase")  # fmt: skip
    for key in directory.glob("*.key"):  # no log line may ever show a private key
        SECRETS.register(*(line for line in key.read_text().splitlines() if len(line) > 40))
    return Certificates(
        ca=ca,
        cert=cert,
        key=directory / "server.key",
        other_ca=other_ca,
        other_name_cert=other,
        other_name_key=directory / "elsewhere.key",
        encrypted_key=encrypted,
    )


def tls_env(cert: Path, key: Path) -> dict[str, str]:
    return {"TOKEN_METER_TLS_CERT_FILE": str(cert), "TOKEN_METER_TLS_KEY_FILE": str(key)}


# -- settings ------------------------------------------------------------------------------------


def test_both_tls_files_or_neither_and_they_must_load(
    certificates: Certificates, tmp_path: Path
) -> None:
    base = {"TOKEN_METER_DATA_DIR": str(tmp_path)}
    plain = Settings.from_env(base)
    assert plain.server_ssl_context() is None
    served = Settings.from_env({**base, **tls_env(certificates.cert, certificates.key)})
    context = served.server_ssl_context()
    assert context is not None and context.minimum_version >= ssl.TLSVersion.TLSv1_2
    refused = {
        "set both": {"TOKEN_METER_TLS_CERT_FILE": str(certificates.cert)},
        "No such file": tls_env(tmp_path / "missing.pem", certificates.key),
        "KEY_VALUES_MISMATCH": tls_env(certificates.cert, certificates.other_name_key),
        "PEM": tls_env(certificates.key, certificates.key),  # a key is not a certificate
        # Never a passphrase prompt on the terminal: an encrypted key is a configuration error.
        "encrypted": tls_env(certificates.cert, certificates.encrypted_key),
    }
    for expected, env in refused.items():
        with pytest.raises(SettingsError) as info:
            Settings.from_env({**base, **env})
        (problem,) = info.value.problems
        assert "TOKEN_METER_TLS" in problem and expected.lower() in problem.lower(), problem


# -- the plugin's view of the config -------------------------------------------------------------


def test_the_ca_bundle_reaches_the_shipper_and_the_blocklist() -> None:
    config = PluginConfig.from_kong(
        "token-meter",
        {
            "collector_url": "https://collector:8787",
            "collector_token": "t" * 20,
            "collector_ca_bundle": "/etc/token-meter/ca.pem",
        },
    )
    assert DeliverySettings.of(config).collector_ca_bundle == "/etc/token-meter/ca.pem"
    assert BlocklistSettings.of(config).collector_ca_bundle == "/etc/token-meter/ca.pem"
    unset = PluginConfig.from_kong(
        "token-meter-log", {"collector_url": "http://c:1", "collector_token": "t" * 20}
    )
    assert unset.collector_ca_bundle is None


# -- end to end ----------------------------------------------------------------------------------


def post_batch(client: CollectorClient) -> tuple[int, Any]:
    body = json.dumps([usage_event("tls-1")]).encode()
    answer = client.request("POST", "/v1/events", timeout=10, body=body, headers=BATCH_HEADERS)
    return answer.status, json.loads(answer.body)


async def test_the_plugin_client_posts_over_https_with_its_ca_bundle_only(
    certificates: Certificates, database_url: str, tmp_path: Path
) -> None:
    settings = make_settings(database_url, tmp_path, **tls_env(certificates.cert, certificates.key))
    trusted = ssl.create_default_context(cafile=certificates.ca)
    async with run_collector_app(settings, client_ssl=trusted) as collector:
        assert collector.base_url.startswith("https://127.0.0.1:")
        status, _, headers = await collector.get("/healthz")
        assert status == 200 and headers["Server"] == "token-meter"
        port = collector.base_url.rsplit(":", 1)[1]

        def client(url: str, ca_bundle: str | Path | None) -> CollectorClient:
            bundle = None if ca_bundle is None else str(ca_bundle)
            return CollectorClient(url, collector.ingest_token, ca_bundle=bundle)

        for host in ("127.0.0.1", "localhost"):
            good = client(f"https://{host}:{port}", certificates.ca)
            status, result = await asyncio.to_thread(post_batch, good)
            good.close()
            assert status == 200 and result["accepted"] + result["duplicates"] == 1, host
        for bundle in (certificates.other_ca, None):  # another CA, or the system's
            refused = client(collector.base_url, bundle)
            with pytest.raises(ssl.SSLCertVerificationError):
                await asyncio.to_thread(post_batch, refused)
        missing = client(collector.base_url, tmp_path / "no-such-ca.pem")
        with pytest.raises(OSError, match=r"collector_ca_bundle .*no-such-ca\.pem"):
            await asyncio.to_thread(post_batch, missing)
        plain = client(collector.base_url.replace("https", "http"), None)
        with pytest.raises(ConnectionError):
            await asyncio.to_thread(post_batch, plain)
        # A config push pointing at the right bundle takes effect on the next request.
        pushed = client(collector.base_url, certificates.other_ca)
        pushed.trust(str(certificates.ca))
        status, _ = await asyncio.to_thread(post_batch, pushed)
        assert status == 200


async def test_a_certificate_for_another_name_is_refused(
    certificates: Certificates, database_url: str, tmp_path: Path
) -> None:
    env = tls_env(certificates.other_name_cert, certificates.other_name_key)
    async with run_collector_app(make_settings(database_url, tmp_path, **env)) as collector:
        client = CollectorClient(
            collector.base_url, collector.ingest_token, ca_bundle=str(certificates.ca)
        )
        with pytest.raises(ssl.SSLCertVerificationError, match=r"127\.0\.0\.1"):
            await asyncio.to_thread(post_batch, client)


def test_the_collector_process_serves_https_from_the_tls_files(
    certificates: Certificates, database_url: str, collector_process_factory: Any
) -> None:
    proc = collector_process_factory(
        database_url,
        TOKEN_METER_INGEST_TOKEN="tls-ingest-token-0123456789",
        TOKEN_METER_ADMIN_TOKEN="tls-admin-token-0123456789",
        **tls_env(certificates.cert, certificates.key),
    )
    proc.start()
    client = CollectorClient(
        f"https://127.0.0.1:{proc.port}",
        "tls-ingest-token-0123456789",
        ca_bundle=str(certificates.ca),
    )
    status, result = post_batch(client)
    client.close()
    assert status == 200 and result["accepted"] == 1
    assert proc.stop() == 0
    listening = [
        json.loads(line) for line in proc.log().splitlines() if "collector_listening" in line
    ]
    assert listening[0]["url"] == f"https://127.0.0.1:{proc.port}"
