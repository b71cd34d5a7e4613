"""Mutual TLS: certificates made offline, and every refusal ends in a clear line, never a hang."""
import datetime
import os
import stat
import subprocess
import sys
import time

import pytest
import yaml
from cryptography import x509

import roots
from conftest import ROOT
from localfed.federation import LocalFederation, tail
from security import certs as pki_tools

ENVOY = ["--director-host", "localhost", "--envoy-config-path", "envoy_config.yaml"]


def test_make_writes_a_ca_and_node_certificates_with_private_keys(tmp_path):
    written = pki_tools.make(tmp_path, ["localhost", "127.0.0.1", "fl.example.org"], ["site_a"])
    names = {p.name for p in written}
    assert names == {f"{n}.{ext}" for n in ("ca", "director", "researcher", "site_a") for ext in ("crt", "key")}
    for path in tmp_path.iterdir():
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o600 if path.suffix == ".key" else 0o644), path.name
    director = x509.load_pem_x509_certificate((tmp_path / "director.crt").read_bytes())
    sans = director.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["localhost", "fl.example.org"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    pki_tools.check("site_a", tmp_path / "site_a.crt", tmp_path / "site_a.key", tmp_path / "ca.crt")


def test_existing_files_are_kept_unless_forced(tmp_path):
    pki_tools.make(tmp_path, envoys=["envoy_1"])
    before = (tmp_path / "envoy_1.crt").read_bytes()
    added = pki_tools.make(tmp_path, envoys=["envoy_1", "envoy_2"])
    assert added == [tmp_path / "envoy_2.crt", tmp_path / "envoy_2.key"]
    assert (tmp_path / "envoy_1.crt").read_bytes() == before
    pki_tools.make(tmp_path, envoys=["envoy_1"], force=True)
    assert (tmp_path / "envoy_1.crt").read_bytes() != before


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A good CA with its nodes, another CA, and an expired envoy certificate from the good CA."""
    root = tmp_path_factory.mktemp("pki")
    pki_tools.make(root / "good", envoys=["envoy_1", "envoy_2"])
    pki_tools.make(root / "other", envoys=["envoy_2"])
    expired = root / "expired"
    expired.mkdir()
    for name in ("ca.crt", "ca.key"):
        (expired / name).write_bytes((root / "good" / name).read_bytes())
    pki_tools.make(expired, envoys=["envoy_2"], days=1,
                  not_before=datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=3))
    return root


@pytest.mark.parametrize("folder,name,message", [
    ("other", "envoy_2", "was not signed by the CA"),
    ("good", "envoy_9", "is for 'envoy_1', not 'envoy_9'"),
    ("expired", "envoy_2", "is valid only from"),
])
def test_check_refuses_in_one_line(pki, folder, name, message):
    certs = pki / folder
    cert = certs / ("envoy_1.crt" if name == "envoy_9" else f"{name}.crt")
    with pytest.raises(pki_tools.CertError, match=message):
        pki_tools.check(name, cert, cert.with_suffix(".key"), pki / "good" / "ca.crt")


@pytest.fixture(scope="module")
def tls_federation(pki, tmp_path_factory, tiny_file):
    data_dir = tiny_file("bloodmnist").parent
    shards = {"envoy_1": {"flag": "bloodmnist", "size": 28, "data_dir": str(data_dir), "rank_worldsize": "1,2",
                          "download": False}}
    with LocalFederation(tmp_path_factory.mktemp("tls"), shards, [28, 28, 3], [1], pki / "good") as fed:
        fed.config_dir = fed.workdir / "nodes" / "envoy_1"
        yield fed


def _fx_envoy(fed, name, tls_args):
    """An envoy started with fx directly, skipping start_envoy.sh's own checks: OpenFL must refuse it."""
    env = {**os.environ, "PYTHONPATH": roots.pythonpath("node")}
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "node", "envoy", "start", "--shard-name", name,
                             *tls_args, "--director-port", str(fed.port), *ENVOY], cwd=fed.config_dir, env=env,
                            capture_output=True, text=True, timeout=90)
    return result, time.monotonic() - started


def _tls(folder, name):
    return ["--root-cert-path", str(folder.parent / "good" / "ca.crt"), "--private-key-path",
            str(folder / f"{name}.key"), "--public-cert-path", str(folder / f"{name}.crt")]


@pytest.mark.slow
@pytest.mark.parametrize("case", ["other CA", "wrong name", "expired", "plaintext"])
def test_the_director_refuses_bad_envoys_without_hanging(tls_federation, pki, case):
    tls_args, name = {
        "other CA": (_tls(pki / "other", "envoy_2"), "envoy_2"),
        "wrong name": (_tls(pki / "good", "envoy_1"), "envoy_2"),
        "expired": (_tls(pki / "expired", "envoy_2"), "envoy_2"),
        "plaintext": (["--disable-tls"], "envoy_2"),
    }[case]
    result, seconds = _fx_envoy(tls_federation, name, tls_args)
    output = result.stdout + result.stderr
    assert result.returncode != 0 and seconds < 60
    if case == "wrong name":
        assert "Report shard info was not accepted" in output
        assert "Refused envoy 'envoy_2': its certificate is for 'envoy_1'" in tail(tls_federation.components[0].log, 80)
    else:  # the handshake fails: the envoy gives up, the director logs why
        assert "Failed to report shard info" in output and "UNAVAILABLE" in output
        reason = {"other CA": "certificate signature failure", "expired": "certificate has expired",
                  "plaintext": "WRONG_VERSION_NUMBER"}[case]
        assert reason in tail(tls_federation.components[0].log, 200)
    assert tls_federation.components[0].process.poll() is None  # the director carries on


@pytest.mark.slow
@pytest.mark.parametrize("folder,name,message", [("other", "envoy_2", "was not signed by the CA"),
                                                 ("expired", "envoy_2", "is valid only from")])
def test_start_envoy_says_why_before_starting(tls_federation, pki, folder, name, message, tmp_path):
    certs = tmp_path / "certs"
    certs.mkdir()
    for file in ("ca.crt",):
        (certs / file).write_bytes((pki / "good" / file).read_bytes())
    for ext in ("crt", "key"):
        (certs / f"{name}.{ext}").write_bytes((pki / folder / f"{name}.{ext}").read_bytes())
    env = {**os.environ, "CERTS": str(certs), "DIRECTOR_PORT": str(tls_federation.port)}
    result = subprocess.run(["bash", str(ROOT / "envoy" / "start_envoy.sh"), name,
                             str(tls_federation.config_dir / "envoy_config.yaml")], env=env, capture_output=True,
                            text=True, timeout=90)
    assert result.returncode == 2 and message in result.stderr
    assert "Starting the Envoy" not in result.stdout


@pytest.mark.slow
def test_a_plaintext_notebook_client_is_refused_quickly(tls_federation):
    code = ("import sys; from openfl.interface.interactive_api.federation import Federation\n"
            "try:\n    Federation(client_id='frontend', director_node_fqdn='localhost', director_port=int(sys.argv[1]),"
            " tls=False)\nexcept Exception as exc:\n    print(type(exc).__name__, exc)\n    sys.exit(3)")
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-c", code, str(tls_federation.port)], capture_output=True, text=True,
                            timeout=90)
    assert result.returncode == 3 and "UNAVAILABLE" in result.stdout and time.monotonic() - started < 60


@pytest.mark.slow
def test_the_director_refuses_an_envoy_serving_other_data_naming_it(tls_federation, pki, tiny_file, tmp_path):
    # PathMNIST at 28 px has BloodMNIST's shapes ([28, 28, 3], one label): only what the envoy says it serves differs.
    data_dir = tiny_file("pathmnist").parent
    config = {"params": {"cuda_devices": [], "install_requirements": False},
              "shard_descriptor": {"template": "medmnist_shard.MedMNISTShardDescriptor",
                                   "params": {"flag": "pathmnist", "size": 28, "data_dir": str(data_dir),
                                              "download": False}}}
    (tmp_path / "envoy_config.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "PYTHONPATH": roots.pythonpath("node")}
    result = subprocess.run([sys.executable, "-m", "node", "envoy", "start", "--shard-name", "envoy_2",
                             *_tls(pki / "good", "envoy_2"), "--director-port", str(tls_federation.port), *ENVOY],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=90)
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "The director refused this envoy" in output
    assert ("refused envoy_2: it serves pathmnist at 28 px with 9 classes, but envoy_1 serves bloodmnist at 28 px "
            "with 8 classes") in tail(tls_federation.components[0].log, 80)
    assert tls_federation.components[0].process.poll() is None  # the director carries on
